"""What ``--precision fast`` (bfloat16 compute) does to maps and speed.

VGG16 (the benchmark weights every framework loads) on four of scikit-image's photos:
Grad-CAM, SmoothGrad (8 samples) and occlusion (window 32, stride 16) computed at full
precision (float32, ``highest``) and fast (bfloat16). Reported per method: the Spearman
rank correlation of the two maps (mean and worst over the images), the largest relative
difference of the logits, and the time ratio fast / full (warm-up excluded, best of
``--reps``). On XLA:CPU bfloat16 convolutions are not faster; accelerators are where the
fast mode pays.

    python benchmarks/precision_effect.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_time, explain_fn, load_arrays, machine  # noqa: E402

from convlens.kernels.metrics.base import spearman  # noqa: E402
from convlens.models.registry import build_model  # noqa: E402
from tests.conftest import photo_batch  # noqa: E402

METHODS = {"gradcam": {}, "smoothgrad": {"samples": 8, "chunk": 8}, "occlusion": {"window": 32, "stride": 16}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    params = jax.tree.map(jnp.asarray, load_arrays("vgg16"))
    x = jnp.asarray(photo_batch((224, 224)).astype(np.float32))
    full, fast = build_model("vgg16"), build_model("vgg16").replace(precision="fast")
    res = {"machine": machine(), "images": 4, "methods": {}}
    for method, opts in METHODS.items():
        maps, secs, logits = {}, {}, {}
        for label, model in (("full", full), ("fast", fast)):
            fn = explain_fn(model, method, opts, 1)
            out = jax.block_until_ready(fn(params, x))
            maps[label], logits[label] = np.asarray(out["heatmap"][:, 0]), np.asarray(out["logits"])
            secs[label] = best_time(lambda: jax.block_until_ready(fn(params, x)), a.reps)
        rho = np.asarray(spearman(jnp.asarray(maps["full"]), jnp.asarray(maps["fast"])))
        rel = float(np.abs(logits["fast"] - logits["full"]).max() / np.abs(logits["full"]).max())
        res["methods"][method] = {"rank_correlation_mean": float(rho.mean()), "rank_correlation_min": float(rho.min()),
                                  "logit_max_rel_diff": rel, "seconds_full": secs["full"],
                                  "seconds_fast": secs["fast"], "fast_over_full_time": secs["fast"] / secs["full"]}
        print(f"{method:12s} rank correlation {rho.mean():.3f} (worst {rho.min():.3f}); logits differ by "
              f"{rel:.1e} of the largest; time fast/full {secs['fast'] / secs['full']:.2f}", flush=True)
    out = HERE / "results" / "precision_effect.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
