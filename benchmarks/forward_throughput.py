"""Forward throughput (images/s) of VGG16 and the small convnet: convlens vs Keras
on JAX vs PyTorch (channels_last, oneDNN), same machine, same run, same weights.

Each configuration runs in its own process, because XLA reads its flags once per
process. Timing: one warm-up call (compilation) excluded, then the best of
``--reps`` calls, each ended by ``block_until_ready`` (or the torch call returning).
Ratios are to PyTorch where it is installed, else to Keras-on-JAX, both measured
in the same run.

    python benchmarks/forward_throughput.py            # full table (~10 min on 2 cores)
    python benchmarks/forward_throughput.py --quick    # batch 8 only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, best_time as _time, explain_fn, forward_fn, load_arrays as _arrays, torch_model, weights_file  # noqa: E402
MODELS = {"vgg16": ((224, 224), (1, 8, 32)), "smallcnn": ((150, 150), (1, 8, 64)),
          "resnet50": ((224, 224), (1, 8, 32)), "mobilenet_v2": ((224, 224), (1, 8, 32)),
          "efficientnet_b0": ((224, 224), (1, 8, 32)), "inception_v3": ((299, 299), (1, 8, 32)),
          "convnext_tiny": ((224, 224), (1, 8, 32))}
# Keras applications for the Keras-on-JAX rows, and the layer whose ReLU/activation output
# Captum's LayerGradCam takes (Keras's default Grad-CAM layer: the last spatial one).
KERAS_APPS = {"vgg16": "VGG16", "resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2",
              "efficientnet_b0": "EfficientNetB0", "inception_v3": "InceptionV3", "convnext_tiny": "ConvNeXtTiny"}


def _probe(size):
    import numpy as np
    return np.random.default_rng(1).uniform(0, 255, (1, *size, 3)).astype("float32")


def worker(framework: str, model_name: str, batches: list[int], reps: int, what: str = "forward") -> dict:
    import numpy as np

    size, _ = MODELS[model_name]
    weights = _arrays(model_name)
    out = {}
    if framework == "convlens":
        import jax
        from convlens.models.registry import build_model
        model = build_model(model_name)
        params = jax.tree.map(jax.numpy.asarray, weights)
        if what == "forward":
            f = forward_fn(model)
            # One unit: convlens's logits are the two-class view [-z, z]; PyTorch's output is sigmoid(z).
            out["probe"] = np.asarray(jax.nn.sigmoid(f(params, _probe(size))[..., -1:]) if model_name == "smallcnn" else
                                      jax.nn.softmax(f(params, _probe(size)))).ravel()[:10].tolist()
        else:
            g = explain_fn(model, "gradcam", {}, 1)
            f = lambda p, x: g(p, x)["cam"]  # noqa: E731  (the map at the layer, as Captum's)
            out["probe"] = np.asarray(f(params, _probe(size))).ravel()[:10].tolist()
        for b in batches:
            x = jax.numpy.asarray(np.random.default_rng(0).uniform(0, 255, (b, *size, 3)).astype("float32"))
            jax.block_until_ready(f(params, x))  # compiles (and, tuned, measures the settings) outside the timing
            out[b] = b / _time(lambda: jax.block_until_ready(f(params, x)), reps)
        return out
    if framework == "keras-jax":
        os.environ["KERAS_BACKEND"] = "jax"
        import jax
        import keras
        from convlens.models import smallnets
        if model_name in KERAS_APPS:
            km = getattr(keras.applications, KERAS_APPS[model_name])(weights=None)
        else:
            km = keras.Sequential.from_config(smallnets.smallcnn_config()["config"])
        for layer in km.layers:
            if layer.name in weights:
                layer.set_weights([weights[layer.name][v] for v in weights[layer.name]])
        tv = [v.value for v in km.trainable_variables]
        ntv = [v.value for v in km.non_trainable_variables]
        from convlens.models.registry import build_model
        pre = build_model(model_name).preprocess

        @jax.jit
        def f(tv, ntv, x):
            return km.stateless_call(tv, ntv, pre(x), training=False)[0]
        out["probe"] = np.asarray(f(tv, ntv, _probe(size))).ravel()[:10].tolist()
        for b in batches:
            x = jax.numpy.asarray(np.random.default_rng(0).uniform(0, 255, (b, *size, 3)).astype("float32"))
            out[b] = b / _time(lambda: f(tv, ntv, x).block_until_ready(), reps)
        return out
    if framework == "torch":
        import torch
        torch.set_num_threads(2)
        from convlens.models.registry import build_model
        cmodel = build_model(model_name)
        if model_name in ("vgg16", "smallcnn"):  # hand-written nn.Sequential twins
            net = torch_model(model_name, weights, squash=what == "forward", inplace=what == "forward")
        else:  # the graph run op by op in PyTorch (tests/torch_twin.py), identical weights
            sys.path.insert(0, str(HERE.parent))
            from tests.torch_twin import twin
            net = twin(cmodel, weights, logits=what != "forward")
        net = net.to(memory_format=torch.channels_last)

        def pixels(x):
            x = torch.from_numpy(np.asarray(cmodel.preprocess(x.numpy().transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
                                 .copy()) if model_name not in ("vgg16", "smallcnn") else (
                x / 255.0 if model_name == "smallcnn" else
                x.flip(1) - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1))
            return x.contiguous(memory_format=torch.channels_last)

        def as_torch(a):
            return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
        if what == "forward":
            torch.set_grad_enabled(False)
            out["probe"] = net(pixels(as_torch(_probe(size)))).numpy().ravel()[:10].tolist()
            for b in batches:
                x = pixels(as_torch(np.random.default_rng(0).uniform(0, 255, (b, *size, 3)).astype("float32")))
                out[b] = b / _time(lambda: net(x), reps)
            return out
        import captum.attr as ca
        for p in net.parameters():
            p.requires_grad_(False)
        # Keras's default Grad-CAM layer: the last conv's ReLU output.
        if model_name in CONVS:
            layer = [m for m in net if isinstance(m, torch.nn.ReLU)][CONVS[model_name] - 1]
            if model_name == "smallcnn":  # one unit: explain the predicted class of [-z, z], as convlens
                net = TwoClass(net)
            algo = ca.LayerGradCam(net, layer)
        else:
            algo = None

        def gradcam(x):
            if algo is None:  # Grad-CAM by hand at the twin's default layer (Captum needs a module)
                return twin_gradcam(net, cmodel, pixels(x))
            return algo.attribute(pixels(x), target=net(pixels(x)).argmax(-1), relu_attributions=True)
        out["probe"] = gradcam(as_torch(_probe(size))).detach().numpy().ravel()[:10].tolist()
        for b in batches:
            x = as_torch(np.random.default_rng(0).uniform(0, 255, (b, *size, 3)).astype("float32"))
            out[b] = b / _time(lambda: gradcam(x), reps)
        return out
    raise SystemExit(f"unknown framework {framework}")


CONVS = {"vgg16": 13, "smallcnn": 4}
TWIN_GRADCAM = "PyTorch twin, Grad-CAM by a hook (channels_last)"


def TwoClass(net):
    """A one-unit network as the two-class view ``[-z, z]`` convlens explains."""
    import torch

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            z = self.net(x)
            return torch.cat([-z, z], 1)
    return Two()


def twin_gradcam(net, cmodel, x):
    """Grad-CAM on a twin at convlens's default layer: activations and gradients taken with
    a hook on the graph's value, as Captum's LayerGradCam does on a module."""
    import torch
    from convlens.kernels.common import default_layer
    layer = default_layer(cmodel)
    net.capture = (layer,)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)  # the parameters are frozen: the graph starts at the input
        logits = net(x)
        a = net.outputs[layer]
        t = logits.argmax(-1)
        g, = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    return torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))


def run_worker(framework, model_name, batches, reps, env_extra, what) -> dict | None:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(env_extra)
    cmd = [sys.executable, __file__, "--worker", framework, "--model", model_name, "--reps", str(reps),
           "--batches", ",".join(map(str, batches)), "--what", what]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    if r.returncode != 0:
        print(f"  {framework} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return None
    res = json.loads(r.stdout.strip().splitlines()[-1])
    probe = res.pop("probe")
    return {"probe": probe, **{int(k): v for k, v in res.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--batches")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--what", default="forward", choices=["forward", "gradcam"])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--only", default="forward,gradcam", help="forward, gradcam or both (comma-separated)")
    ap.add_argument("--rows", default="tuned,default,ynn-dot,keras,torch",
                    help="which rows to measure: tuned, default, ynn-dot (convlens's XLA settings), keras, torch")
    ap.add_argument("--merge", action="store_true", help="add to the results file's models instead of replacing it")
    ap.add_argument("--out", help="JSON results (default: results/forward_throughput[_quick].json)")
    a = ap.parse_args()
    a.out = a.out or str(HERE / "results" / ("forward_throughput_quick.json" if a.quick else "forward_throughput.json"))
    if a.worker:
        res = worker(a.worker, a.model, [int(b) for b in a.batches.split(",")], a.reps, a.what)
        print(json.dumps(res))
        return
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    import tempfile
    tuned_cache = tempfile.mkdtemp(prefix="convlens-bench-cache-")  # measured afresh in this run
    results = {"machine": machine(), "models": {}}
    for what in a.only.split(","):
        rows_wanted = set(a.rows.split(","))
        configs = [c for key, c in (
            ("tuned", ("convlens", "convlens (tuned per computation)", {"CONVLENS_XLA": "auto",
                                                                       "CONVLENS_CACHE": tuned_cache})),
            ("default", ("convlens", "convlens (XLA's default settings)", {"CONVLENS_XLA": "default"})),
            ("ynn-dot", ("convlens", "convlens (YNNPACK dots only, 0.1's flag)", {"CONVLENS_XLA": "ynn-dot"})))
            if key in rows_wanted]
        if what == "forward" and "keras" in rows_wanted:
            configs.append(("keras-jax", "Keras 3 on JAX (XLA default flags)", {}))
        if have_torch and "torch" in rows_wanted:
            configs.append(("torch", "PyTorch channels_last (oneDNN)" if what == "forward" else
                            "Captum LayerGradCam (PyTorch channels_last)", {}))
        for model_name in a.models.split(","):
            size, batches = MODELS[model_name]
            weights_file(model_name)
            if a.quick:
                batches = (8,)
            print(f"\n{what}: {model_name} {size[0]}x{size[1]}, images/s (best of {a.reps}, warm-up excluded)")
            rows, probes = {}, {}
            for fw, label, env in configs:
                if fw == "torch" and what == "gradcam" and model_name not in CONVS:
                    label = TWIN_GRADCAM  # no module to hand Captum: the same computation by a hook
                res = run_worker(fw, model_name, batches, a.reps, env, what)
                if res:
                    probes[label] = res.pop("probe")
                    rows[label] = res
                    print(f"  {label:44s} " + "  ".join(f"b{b}: {res[b]:7.2f}" for b in batches), flush=True)
            ref = next(iter(probes.values()))
            diff = max(max(abs(a - b) for a, b in zip(p, ref)) for p in probes.values())
            print(f"  same weights, same input: max |output difference| across frameworks = {diff:.2e}")
            base_label = next((k for k in rows if k.startswith(("PyTorch", "Captum"))), None) or \
                "Keras 3 on JAX (XLA default flags)"
            base = rows.get(base_label)
            print(f"  ratio to {base_label}:")
            for label, res in rows.items():
                if base:
                    print(f"  {label:44s} " + "  ".join(f"b{b}: {res[b] / base[b]:5.2f}x" for b in batches))
            results["models"][f"{model_name}/{what}" if what != "forward" else model_name] = {
                "size": size, "batches": list(batches), "images_per_s": rows, "max_output_difference": diff,
                "baseline": base_label, "what": what}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if a.merge and Path(a.out).exists():  # rows measured in another run on this machine
        old = json.loads(Path(a.out).read_text())
        if old.get("machine") == results["machine"]:
            results["models"] = {**old["models"], **results["models"]}
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
