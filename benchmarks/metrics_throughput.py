"""The metric catalogue against Quantus 0.6 on the same work, same process.

    python benchmarks/metrics_throughput.py [--images 32] [--reps 2]

VGG16 at 224x224 (random weights loaded by both sides; Quantus on the PyTorch twin, fed
the preprocessed images), ``--images`` images, the same random maps and targets. Per
family, the same metrics with the same number of model evaluations on both sides
(24 perturbation steps, 2 noise samples, Saliency = the input gradient as the method
re-run by robustness and randomisation). Quantus runs its batched 0.6 code with
``batch_size = images``; convlens one compiled program per family. Warm-up
(compilation) excluded on both sides; best of --reps; results fetched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_time, load_arrays, machine, torch_model  # noqa: E402

from convlens.engine.quality import Plan  # noqa: E402
from convlens.kernels.metrics.registry import METRICS  # noqa: E402
from convlens.kernels.registry import METHODS  # noqa: E402
from convlens.models.registry import build_model  # noqa: E402

STEPS = 24  # Quantus needs H*W divisible by its step: 50176 / 6272 x 3 channels = 24 steps
SAMPLES = 2


# Model evaluations per family, in batches of all the images: (forward passes, forward +
# backward passes). Pixel flipping 24 steps, faithfulness estimate 24 + 1, region
# perturbation 16 + 1; two samples of the gradient for each robustness metric; the other
# class's gradient; the image and the baseline.
# Randomisation: the other class's gradient; MPRT and eMPRT each the original's gradient and
# the fully random model's (convlens computes the two shared ones once: the same program).
PASSES = {"faithfulness": (66, 0), "robustness": (0, 4), "randomisation": (0, 5), "axiomatic": (2, 0),
          "localisation": (0, 0), "complexity": (0, 0)}


def families(c, hw):
    """(convlens metric, options, Quantus class name, Quantus options)."""
    # Quantus steps over C*H*W values (the map broadcast over channels); convlens over
    # pixels: both take STEPS steps.
    qstep = c * hw * hw // STEPS
    return {
        "faithfulness": [("pixel_flipping", {"steps": STEPS}, "PixelFlipping", {"features_in_step": qstep}),
                         ("faithfulness_estimate", {"steps": STEPS}, "FaithfulnessEstimate",
                          {"features_in_step": qstep}),
                         ("region_perturbation", {"patch_size": hw // 4, "regions_evaluation": STEPS},
                          "RegionPerturbation", {"patch_size": hw // 4, "regions_evaluation": STEPS})],
        "robustness": [("avg_sensitivity", {"nr_samples": SAMPLES}, "AvgSensitivity", {"nr_samples": SAMPLES}),
                       ("local_lipschitz_estimate", {"nr_samples": SAMPLES}, "LocalLipschitzEstimate",
                        {"nr_samples": SAMPLES})],
        "localisation": [(m, {}, q, {}) for m, q in (
            ("pointing_game", "PointingGame"), ("attribution_localisation", "AttributionLocalisation"),
            ("top_k_intersection", "TopKIntersection"), ("relevance_rank_accuracy", "RelevanceRankAccuracy"),
            ("relevance_mass_accuracy", "RelevanceMassAccuracy"), ("auc", "AUC"))],
        "complexity": [(m, {}, q, {}) for m, q in (("sparseness", "Sparseness"), ("complexity", "Complexity"),
                                                   ("effective_complexity", "EffectiveComplexity"))],
        "randomisation": [("random_logit", {"flat": True}, "RandomLogit", {"num_classes": 1000}),
                          # Every layer random at once, the last correlation (Quantus builds each
                          # step's model but explains only the last with skip_layers).
                          ("mprt", {"stages": 1}, "MPRT", {"skip_layers": True, "return_last_correlation": True}),
                          ("efficient_mprt", {}, "EfficientMPRT", {})],
        "axiomatic": [("completeness", {}, "Completeness", {})],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated families (the others keep the last run's figures)")
    a = ap.parse_args()
    import quantus
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model("vgg16")
    weights = load_arrays("vgg16")
    params = jax.tree.map(jnp.asarray, weights)
    net = torch_model("vgg16", weights, inplace=False, squash=False).to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    n, hw = a.images, 224
    x = rng.uniform(0, 255, (n, hw, hw, 3)).astype(np.float32)
    maps = np.abs(rng.normal(size=(n, hw, hw))).astype(np.float32)
    y = rng.integers(0, 1000, n)
    masks = np.zeros((n, hw, hw), bool)
    masks[:, 60:160, 50:170] = True
    xq = np.asarray(model.preprocess(jnp.asarray(x))).transpose(0, 3, 1, 2).copy()
    gspec = METHODS["gradient"]

    from convlens.engine.executor import Fn, function, item_keys
    from convlens.engine.quality import forward_options
    xla = forward_options(model, params, x, n)  # as the audit compiles its metric programs
    print("XLA options of the forward pass here:", xla, flush=True)

    layers = tuple(nm for nm in reversed(model.layer_names) if nm in params and params[nm])
    variables = {"model": params, "fresh": jax.tree.map(jnp.asarray, model.init(1234))}

    def convlens_family(items):
        # The audit's program: every metric of the family in one Plan, keyed per item.
        names = [m for m, *_ in items]
        plan = Plan(model, names, {m: METRICS[m].resolve(o) for m, o, _, _ in items}, gspec, gspec.resolve(model, {}),
                    maps_given=True, num_classes=1000, layers=layers)
        comp = function(Fn(plan, plan.key(), plan.inputs(True, False), xla=xla), tune=False)
        keys = item_keys(0, np.arange(n))
        return lambda v, x, a, y, s: comp(v, {"images": x, "targets": y, "maps": a, "masks": s}, keys)

    # The batched-pass limit: one forward, and one gradient map, of all the images.
    from convlens.engine.executor import Forward
    fwd = function(Forward(model), tune=False)
    fwd_fixed = function(Fn(lambda p, i, k: fwd.comp(p, i, k), ("bench-forward",), ("images",), xla=xla), tune=False)
    grad_fixed = function(Fn(lambda p, i, k: gspec.explain(model, p, i["images"], i["targets"][:, None],
                                                       gspec.resolve(model, {}), None),
                             ("bench-gradient",), ("images", "targets"), xla=xla), tune=False)
    xa, ya, kk = jnp.asarray(x), jnp.asarray(y, jnp.int32), jax.random.PRNGKey(0)
    t_fwd = best_time(lambda: jax.block_until_ready(fwd_fixed(params, {"images": xa}, kk)), a.reps)
    t_grad = best_time(lambda: jax.block_until_ready(grad_fixed(params, {"images": xa, "targets": ya}, kk)), a.reps)
    print(f"one batched forward {t_fwd:.2f} s, one gradient map {t_grad:.2f} s", flush=True)

    def quantus_explain(model, inputs, targets, **kw):
        return quantus.explain(model, inputs, targets, method="Saliency", **kw)

    res = {"machine": machine(), "model": "vgg16 224x224", "images": n, "steps": STEPS, "samples": SAMPLES,
           "xla": f"{xla.choice}/{xla.lowering}",
           "families": {}}
    only = set(filter(None, a.only.split(",")))
    for fam, items in families(3, hw).items():
        if only and fam not in only:
            continue
        f = convlens_family(items)
        args = (variables, jnp.asarray(x), jnp.asarray(maps), jnp.asarray(y, jnp.int32), jnp.asarray(masks))
        jax.block_until_ready(f(*args))
        t_ours = min(_timed(lambda: jax.block_until_ready(f(*args))) for _ in range(a.reps))
        qs = []
        for _, _, qname, qopts in items:
            qs.append(getattr(quantus, qname)(disable_warnings=True, display_progressbar=False, **qopts))

        def run_quantus():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for q in qs:
                    q(model=net, x_batch=xq.copy(), y_batch=y, a_batch=maps[:, None].copy(),
                      s_batch=masks[:, None].astype(np.float32), device="cpu", batch_size=n,
                      explain_func=quantus_explain, explain_func_kwargs={})
        t_q = min(_timed(run_quantus) for _ in range(a.reps))
        f_passes, g_passes = PASSES[fam]
        limit = f_passes * t_fwd + g_passes * t_grad
        res["families"][fam] = {"metrics": [m for m, *_ in items], "convlens_s": t_ours, "quantus_s": t_q,
                                "speedup": t_q / t_ours, "passes": [f_passes, g_passes], "pass_limit_s": limit,
                                "of_pass_limit": (limit / t_ours) if limit else None}
        print(fam, res["families"][fam], flush=True)
    out = HERE / "results" / "metrics_throughput.json"
    if only and out.exists():  # a partial run updates those families of the last full run
        old = json.loads(out.read_text())
        old["families"].update(res["families"])
        res["families"] = {f: old["families"][f] for f in old["families"]}
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
