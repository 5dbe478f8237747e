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
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, best_time as _time, load_arrays as _arrays, torch_model, weights_file  # noqa: E402
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"  # convlens's choice, see convlens/_xla.py
MODELS = {"vgg16": ((224, 224), (1, 8, 32)), "smallcnn": ((150, 150), (1, 8, 64))}


def _probe(size):
    import numpy as np
    return np.random.default_rng(1).uniform(0, 255, (1, *size, 3)).astype("float32")


def worker(framework: str, model_name: str, batches: list[int], reps: int) -> dict:
    import numpy as np

    size, _ = MODELS[model_name]
    weights = _arrays(model_name)
    out = {}
    if framework == "convlens":
        import convlens  # noqa: F401 - applies convlens's XLA defaults first
        import jax
        from convlens.models.registry import build_model
        model = build_model(model_name)
        params = jax.tree.map(jax.numpy.asarray, weights)
        f = jax.jit(lambda p, x: model.apply(p, x)[0])
        out["probe"] = np.asarray(f(params, _probe(size))).ravel()[:10].tolist()
        for b in batches:
            x = jax.numpy.asarray(np.random.default_rng(0).uniform(-100, 100, (b, *size, 3)).astype("float32"))
            out[b] = b / _time(lambda: f(params, x).block_until_ready(), reps)
        return out
    if framework == "keras-jax":
        os.environ["KERAS_BACKEND"] = "jax"
        import jax
        import keras
        from convlens.models import smallnets
        if model_name == "vgg16":
            km = keras.applications.VGG16(weights=None)
        else:
            km = keras.Sequential.from_config(smallnets.smallcnn_config()["config"])
        for layer in km.layers:
            if layer.name in weights:
                layer.set_weights([weights[layer.name]["kernel"], weights[layer.name]["bias"]])
        tv = [v.value for v in km.trainable_variables]
        ntv = [v.value for v in km.non_trainable_variables]

        @jax.jit
        def f(tv, ntv, x):
            return km.stateless_call(tv, ntv, x, training=False)[0]
        out["probe"] = np.asarray(f(tv, ntv, _probe(size))).ravel()[:10].tolist()
        for b in batches:
            x = jax.numpy.asarray(np.random.default_rng(0).uniform(-100, 100, (b, *size, 3)).astype("float32"))
            out[b] = b / _time(lambda: f(tv, ntv, x).block_until_ready(), reps)
        return out
    if framework == "torch":
        import torch
        torch.set_grad_enabled(False)
        net = torch_model(model_name, weights)
        net = net.to(memory_format=torch.channels_last)
        probe = torch.from_numpy(_probe(size).transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
        out["probe"] = net(probe).numpy().ravel()[:10].tolist()
        for b in batches:
            x = torch.from_numpy(np.random.default_rng(0).uniform(-100, 100, (b, 3, *size)).astype("float32"))
            x = x.contiguous(memory_format=torch.channels_last)
            out[b] = b / _time(lambda: net(x), reps)
        return out
    raise SystemExit(f"unknown framework {framework}")


CONVLENS_FLAGS = "convlens"  # let convlens choose its XLA flags itself


def run_worker(framework, model_name, batches, reps, xla_flags) -> dict | None:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("CONVLENS_XLA_DEFAULTS", None)
    if xla_flags != CONVLENS_FLAGS:
        env["XLA_FLAGS"] = xla_flags
        env["CONVLENS_XLA_DEFAULTS"] = "0"
    cmd = [sys.executable, __file__, "--worker", framework, "--model", model_name, "--reps", str(reps),
           "--batches", ",".join(map(str, batches))]
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
    ap.add_argument("--out", help="JSON results (default: results/forward_throughput[_quick].json)")
    a = ap.parse_args()
    a.out = a.out or str(HERE / "results" / ("forward_throughput_quick.json" if a.quick else "forward_throughput.json"))
    if a.worker:
        res = worker(a.worker, a.model, [int(b) for b in a.batches.split(",")], a.reps)
        print(json.dumps(res))
        return
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    configs = [("convlens", "convlens (its XLA flags)", CONVLENS_FLAGS),
               ("convlens", "convlens (XLA default flags)", ""),
               ("keras-jax", "Keras 3 on JAX (XLA default flags)", ""),
               ("keras-jax", "Keras 3 on JAX (convlens's XLA flags)", YNN_OFF)]
    if have_torch:
        configs.append(("torch", "PyTorch channels_last (oneDNN)", ""))
    results = {"machine": machine(), "models": {}}
    for model_name, (size, batches) in MODELS.items():
        weights_file(model_name)
        if a.quick:
            batches = (8,)
        print(f"\n{model_name} {size[0]}x{size[1]}, images/s (best of {a.reps}, warm-up excluded)")
        rows, probes = {}, {}
        for fw, label, flags in configs:
            res = run_worker(fw, model_name, batches, a.reps, flags)
            if res:
                probes[label] = res.pop("probe")
                rows[label] = res
                print(f"  {label:40s} " + "  ".join(f"b{b}: {res[b]:7.2f}" for b in batches), flush=True)
        ref = next(iter(probes.values()))
        diff = max(max(abs(a - b) for a, b in zip(p, ref)) for p in probes.values())
        print(f"  same weights, same input: max |output difference| across frameworks = {diff:.2e}")
        base_label = "PyTorch channels_last (oneDNN)" if have_torch else "Keras 3 on JAX (XLA default flags)"
        base = rows.get(base_label)
        print(f"  ratio to {base_label}:")
        for label, res in rows.items():
            if base:
                print(f"  {label:40s} " + "  ".join(f"b{b}: {res[b] / base[b]:5.2f}x" for b in batches))
        results["models"][model_name] = {"size": size, "batches": list(batches), "images_per_s": rows,
                                         "max_output_difference": diff,
                                         "baseline": base_label}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
