"""Methods that share a pass, computed together against one run each, same process.

    python benchmarks/cam_family.py [--batch 8] [--reps 3]

Five gradient CAMs on VGG16's default layer (Grad-CAM, Grad-CAM++, HiRes-CAM, Layer-CAM,
XGrad-CAM) and the gradient pair (gradient, gradient x input) at 224x224: the time of
dispatching them together (the executor runs one `Shared` computation: one forward and
one backward pass per batch) over the sum of dispatching each alone. Warm-up
(compilation) excluded, best of --reps, results fetched (``block_until_ready``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_time, load_arrays, machine  # noqa: E402

from convlens.api import resolve  # noqa: E402
from convlens.engine.executor import Batch, Executor, Explain  # noqa: E402
from convlens.models.registry import build_model  # noqa: E402

CAMS = ("gradcam", "gradcampp", "hirescam", "layercam", "xgradcam")
GRADS = ("gradient", "gradient_x_input")


def measure(model, params, methods, batch, reps):
    x = np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 3)).astype(np.float32)
    comps = {m: Explain(model, m, resolve(model, m, {}), 1) for m in methods}
    b = Batch({"images": x}, np.arange(batch))
    with Executor(params, batch=batch, tune=False) as ex:
        def together():
            jax.block_until_ready(ex.submit(comps, b).outputs)

        def alone():
            for m, c in comps.items():
                jax.block_until_ready(ex.submit({m: c}, b).outputs)
        t_all = best_time(together, reps)
        t_each = best_time(alone, reps)
    return {"methods": list(methods), "batch": batch, "together_s": t_all, "separately_s": t_each,
            "speedup": t_each / t_all}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    model = build_model("vgg16")
    params = jax.tree.map(jnp.asarray, load_arrays("vgg16"))
    res = {"machine": machine(), "model": "vgg16 224x224"}
    for name, methods in (("cam_family", CAMS), ("gradient_family", GRADS)):
        res[name] = measure(model, params, methods, a.batch, a.reps)
        print(name, res[name], flush=True)
    out = HERE / "results" / "cam_family.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
