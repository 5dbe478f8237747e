"""Per layer type: convlens's layer against PyTorch's (oneDNN, channels_last), on the zoo's
real layer shapes, forward and backward (the VJP with respect to the layer's input), at
batch 1, 8 and 32.

Every layer of the chosen models (the small convnet, VGG16, ResNet50, InceptionV3,
MobileNetV2, EfficientNetB0, ConvNeXt-Tiny by default) is reduced to a signature — its
Keras class, options and input shape — and each distinct signature is timed once, as
one jitted layer (the layer's own `apply`, the code the models run) and as the layer of
the PyTorch twin (`tests/torch_twin.py`: the same operation, the same weights). Layers
with more than one lowering (`convlens.models.layers.LOWERINGS`: grouped and depthwise
convolutions, and convolutions of few input channels) are timed in each; a layer's convlens time is its best lowering (what the
executor's measurement picks), and the table also shows the native one.

Ratios are PyTorch's time over convlens's (above 1: convlens is faster), measured in the
same process and run, one framework at a time (2 threads each). Timing: one warm-up
call, then the best of ``--reps`` calls ended by ``block_until_ready``. This is how a
regression in a new jax/XLA release shows: per layer type, not hidden in a model's total.

    python benchmarks/layers.py             # the full table (about 20 minutes on 2 cores)
    python benchmarks/layers.py --quick     # batch 8, two models, the first shapes per type
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import machine  # noqa: E402

MODELS = ("smallcnn", "vgg16", "resnet50", "inception_v3", "mobilenet_v2", "efficientnet_b0", "convnext_tiny")
# Layer classes that compute nothing worth timing on their own (reshapes, identities).
SKIP = {"InputLayer", "Flatten", "Reshape", "Dropout", "Rescaling", "Normalization", "ZeroPadding2D", "Cropping2D"}


def _best(fn, reps):
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def signatures(model_names, per_type: int | None, classes=None):
    """``{signature: (model, node, input shapes)}``: one entry per distinct (class, options,
    input shapes) over the models, at most ``per_type`` per class and model (of ``classes``
    only, when given)."""
    from convlens.models.registry import build_model
    out = {}
    for name in model_names:
        model = build_model(name)
        shapes = model.output_shapes(1)
        count: dict[str, int] = {}
        for node in model.graph.nodes:
            if node.cls in SKIP or (classes and node.cls not in classes) or node.kind in ("identity", "container", "input") or \
                    (node.cls == "Activation" and node.config.get("activation") == "linear"):
                continue  # nothing to compute (PyTorch returns its input as it is)
            ins = tuple(tuple(shapes[i][1:]) for i in node.inputs)
            sig = (node.cls, node.cfg, ins)
            if sig in out:
                continue
            if per_type is not None and count.get(node.cls, 0) >= per_type:
                continue
            count[node.cls] = count.get(node.cls, 0) + 1
            out[sig] = (name, model, node, ins)
    return out


def layer_label(node, ins) -> str:
    c = node.config
    shape = "x".join(map(str, ins[0]))
    if node.cls in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
        k = "x".join(map(str, c["kernel_size"]))
        extra = f" s{c['strides'][0]}" if tuple(c["strides"]) != (1, 1) else ""
        extra += f" g{c['groups']}" if c.get("groups", 1) > 1 else ""
        extra += f" ->{c['filters']}" if "filters" in c else ""
        return f"{k}{extra} on {shape}"
    if node.cls in ("MaxPooling2D", "AveragePooling2D"):
        return f"{'x'.join(map(str, c['pool_size']))} s{c['strides'][0]} on {shape}"
    if node.cls == "Dense":
        return f"{shape} -> {c['units']}"
    return f"on {' + '.join('x'.join(map(str, s)) for s in ins)}"


def time_convlens(model, node, ins, batch, reps, lowering):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from convlens.models import layers
    params = model.init(0).get(node.name, {})
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(batch, *s)).astype(np.float32)) for s in ins]
    apply = node.layer_type.apply

    # Weights, inputs and cotangent are arguments, never constants: XLA would fold them.
    def fwd(params, xs):  # as the model runs it: float32 at full precision
        with layers.lowering(lowering), jax.default_matmul_precision("highest"):
            return apply(node.config, params, xs)
    f = jax.jit(fwd)
    out = f(params, xs)
    ct = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    g = jax.jit(lambda params, xs, ct: jax.vjp(lambda xs: fwd(params, xs), xs)[1](ct)[0])
    t_f = _best(lambda: jax.block_until_ready(f(params, xs)), reps)
    t_b = _best(lambda: jax.block_until_ready(g(params, xs, ct)), reps)
    return t_f, t_b, np.asarray(out)


def time_torch(model, node, ins, batch, reps):
    import numpy as np
    import torch

    from tests.torch_twin import Twin
    params = {node.name: {k: np.asarray(v) for k, v in model.init(0).get(node.name, {}).items()}}
    net = Twin(model, params).eval()
    rng = np.random.default_rng(0)

    def tensor(s):
        a = rng.normal(size=(batch, *s)).astype(np.float32)
        t = torch.from_numpy(a.transpose(0, 3, 1, 2).copy() if a.ndim == 4 else a)
        return t.contiguous(memory_format=torch.channels_last) if a.ndim == 4 else t
    xs = [tensor(s) for s in ins]
    with torch.no_grad():
        out = net._node(node, xs, False)
        t_f = _best(lambda: net._node(node, xs, False), reps)
    xg = [x.detach().requires_grad_(True) for x in xs]
    y = net._node(node, xg, False)
    ct = torch.ones_like(y)

    def back():
        y = net._node(node, xg, False)
        return torch.autograd.grad(y, xg, ct)
    t_b = _best(back, reps)
    o = out.detach().numpy()
    return t_f, t_b, (o.transpose(0, 2, 3, 1) if o.ndim == 4 else o)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--per-type", type=int, default=None, help="at most this many shapes per layer class and model")
    ap.add_argument("--classes", help="only these Keras layer classes, comma-separated (e.g. Conv2D)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="JSON results (default: results/layers[_quick].json)")
    a = ap.parse_args()
    if a.quick:
        a.models, a.batches, a.per_type = "smallcnn,mobilenet_v2", "8", a.per_type or 2
    a.out = a.out or str(HERE / "results" / ("layers_quick.json" if a.quick else "layers.json"))
    import torch
    torch.set_num_threads(2)
    from convlens.models.layers import IM2COL_MAX_CHANNELS
    sigs = signatures(a.models.split(","), a.per_type, a.classes.split(",") if a.classes else None)
    print(f"{len(sigs)} distinct layers", flush=True)
    rows = []
    for (cls, _cfg, _ins), (mname, model, node, ins) in sigs.items():
        # The lowerings that trace this layer differently (`convlens.models.layers.LOWERINGS`).
        if cls in ("DepthwiseConv2D", "SeparableConv2D") or node.config.get("groups", 1) > 1:
            lowerings = ("shifted", "native")
        elif cls == "Conv2D" and ins[0][-1] <= IM2COL_MAX_CHANNELS:
            lowerings = ("im2col", "native")
        else:
            lowerings = ("native",)
        for b in map(int, a.batches.split(",")):
            row = {"model": mname, "layer": node.name, "type": cls, "shape": layer_label(node, ins), "batch": b}
            tf, tb, ref = time_torch(model, node, ins, b, a.reps)
            row["torch"] = {"forward": tf, "backward": tb}
            for lo in lowerings:
                f, bk, out = time_convlens(model, node, ins, b, a.reps, lo)
                err = float(abs(out - ref).max() / max(abs(ref).max(), 1e-12))
                row[lo] = {"forward": f, "backward": bk, "rel_err": err}
            best = min(lowerings, key=lambda lo: row[lo]["forward"] + row[lo]["backward"])
            row["best"] = best
            row["ratio_forward"] = tf / row[best]["forward"]
            row["ratio_backward"] = tb / row[best]["backward"]
            rows.append(row)
            print(f"{mname:16s} {cls:22s} {row['shape']:32s} b{b:<3d} fwd {row['ratio_forward']:5.2f}x  "
                  f"bwd {row['ratio_backward']:5.2f}x  ({best})", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": machine(), "batches": a.batches, "rows": rows}, indent=1))
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
