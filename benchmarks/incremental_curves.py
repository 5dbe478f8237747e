"""Faithfulness curves by incremental re-inference against full re-inference, per metric.

    python benchmarks/incremental_curves.py [--images 8] [--reps 2] [--models vgg16,resnet50]

Each metric whose steps remove one patch at a time (region perturbation, selectivity,
infidelity) runs as the audit runs it (one compiled `Plan` program, the XLA options
and lowering measured for the model's forward pass) twice: with ``incremental`` (each
step recomputes only its patch's cone on the previous step's maps) and without (the
whole model on every step's image). Same images, maps, targets and keys; the curves
agree to float32 rounding (tests/kernels/test_incremental_curves.py). Warm-up
(compilation) excluded; best of --reps; results fetched.
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
from common import best_time, machine  # noqa: E402

# Patch sizes and step counts as the metrics_throughput benchmark (24 steps of 56-pixel
# patches for region perturbation; selectivity removes every 32-pixel patch: 49 steps).
METRICS = {"region_perturbation": {"patch_size": 16, "regions_evaluation": 24},
           "selectivity": {"patch_size": 32},
           "infidelity": {"patch_sizes": (32,), "n_perturb_samples": 1}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--models", default="vgg16,resnet50")
    a = ap.parse_args()
    from convlens.engine.executor import Fn, function, item_keys
    from convlens.engine.quality import Plan, forward_options
    from convlens.kernels.metrics.registry import METRICS as SPECS
    from convlens.models.registry import build_model
    res = {"machine": machine(), "images": a.images, "models": {}}
    for name in a.models.split(","):
        model = build_model(name)
        params = model.init(0)
        rng = np.random.default_rng(0)
        h, w = model.input_size
        x = rng.uniform(0, 255, (a.images, h, w, 3)).astype(np.float32)
        maps = rng.normal(size=(a.images, h, w)).astype(np.float32)
        y = rng.integers(0, 1000, a.images).astype(np.int32)
        xla = forward_options(model, params, x, a.images)
        keys = item_keys(0, np.arange(a.images))
        rows = {}
        for metric, opts in METRICS.items():
            t = {}
            for inc in (True, False):
                cfg = SPECS[metric].resolve({**opts, "incremental": inc})
                plan = Plan(model, [metric], {metric: cfg}, maps_given=True, num_classes=1000)
                comp = function(Fn(plan, plan.key(), plan.inputs(False, False), xla=xla), tune=False)
                inputs = {"images": jnp.asarray(x), "targets": jnp.asarray(y), "maps": jnp.asarray(maps)}
                t[inc] = best_time(lambda: jax.block_until_ready(comp({"model": params}, inputs, keys)), a.reps)
            rows[metric] = {"incremental_s": t[True], "full_s": t[False], "speedup": t[False] / t[True]}
            print(f"{name} {metric}: full {t[False]:.2f} s, incremental {t[True]:.2f} s, "
                  f"{t[False] / t[True]:.2f}x", flush=True)
        res["models"][name] = {"xla": f"{xla.choice}/{xla.lowering}", "metrics": rows}
    out = HERE / "results" / "incremental_curves.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
