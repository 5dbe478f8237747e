"""Cost of the audit's faithfulness metrics per image, as a multiple of the explanation's
own cost (Grad-CAM), on VGG16 at 224x224 and on the demo's small convnet, same run.

    python benchmarks/metrics_cost.py

Deletion + insertion with ``steps`` slices cost ``2 (steps + 1)`` forward passes per map,
average drop one more; Grad-CAM one forward and a partial backward. Timing: warm-up
excluded, best of --reps, ``block_until_ready``.
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
from common import best_time, load_arrays, machine, explain_fn  # noqa: E402

from convlens import demo  # noqa: E402
from convlens.engine.quality import Plan  # noqa: E402
from convlens.kernels.metrics.registry import METRICS  # noqa: E402
from convlens.models.registry import build_model  # noqa: E402


def measure(model, params, size, batch, steps, reps):
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (batch, *size, 3)).astype(np.float32))
    fn = explain_fn(model, "gradcam", {}, 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(batch))
    out = fn(params, x, None, keys)
    t_exp = best_time(lambda: jax.block_until_ready(fn(params, x, None, keys)), reps)
    names = ("deletion", "insertion", "average_drop")
    plan = Plan(model, names, {m: METRICS[m].resolve({"steps": steps} if m != "average_drop" else {}) for m in names})
    mf = jax.jit(lambda p, a, m, t: plan({"model": p}, {"images": a, "maps": m[:, 0], "targets": t[:, 0]}, keys))
    t_met = best_time(lambda: jax.block_until_ready(mf(params, x, out["heatmap"], out["targets"])), reps)
    return {"batch": batch, "steps": steps, "explain_s_per_image": t_exp / batch,
            "metrics_s_per_image": t_met / batch, "metrics_over_explain": t_met / t_exp,
            "forward_passes_per_image": 2 * (steps + 1) + 2}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    res = {"machine": machine()}
    small = demo.demo_model()
    res["demo_cnn_64"] = measure(small, small.init(0), (64, 64), 16, a.steps, a.reps)
    print("demo cnn 64x64:", res["demo_cnn_64"], flush=True)
    vgg = build_model("vgg16")
    res["vgg16_224"] = measure(vgg, jax.tree.map(jnp.asarray, load_arrays("vgg16")), (224, 224), 4, a.steps, a.reps)
    print("vgg16 224x224:", res["vgg16_224"], flush=True)
    out = HERE / "results" / "metrics_cost.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
