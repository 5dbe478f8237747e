"""Relevance and reference methods on VGG16 (224x224): convlens's LRP composites,
DeepLIFT and GradientShap against zennit and Captum on the same weights and images, and
against convlens's own gradient and Grad-CAM, as images/s and ratios in one run.

The PyTorch side is the module twin (`tests/torch_modules.py`: ``torch.nn`` modules, the
weights of convlens's model), so zennit's rules attach and Captum's DeepLIFT hooks its
ReLUs; its maps are checked against convlens's before anything is timed.

    python benchmarks/propagation.py            # batch 1 and 8 (~10 min on 2 cores)
    python benchmarks/propagation.py --quick    # batch 8, LRP EpsilonPlus only

Timing: warm-up (compilation) excluded, best of --reps, block_until_ready; PyTorch with
2 threads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import jax
import jax.numpy as jnp
import numpy as np
from common import best_time, explain_fn, machine

from convlens.models.registry import build_model

# convlens method -> (its options, the reference: "zennit:<Composite>" or "captum:<class>")
METHODS = {
    "lrp_epsilon_plus": ({}, "zennit:EpsilonPlus"),
    "lrp_epsilon_plus_flat": ({}, "zennit:EpsilonPlusFlat"),
    "lrp_epsilon_alpha2_beta1": ({}, "zennit:EpsilonAlpha2Beta1"),
    "lrp_epsilon_gamma_box": ({}, "zennit:EpsilonGammaBox"),
    "deeplift": ({"baseline": 0.0}, "captum:DeepLift"),
    "gradient": ({}, None),
    "gradcam": ({}, None),
}


def params_for(model, seed=0):
    """Keras's random init with random biases (deep VGG16 activations stay finite)."""
    rng = np.random.default_rng(seed)
    p = model.init(seed)
    for vs in p.values():
        if "bias" in vs:
            vs["bias"] = jnp.asarray(rng.normal(0, 0.1, vs["bias"].shape), jnp.float32)
    return p


def reference(model, params, method, ref, imgs, targets):
    """The reference library's map for ``method``, per pixel ``[B, H, W, C]``, and a
    function that recomputes it (for timing)."""
    import torch

    from tests.torch_modules import ModuleTwin
    from tests.zennit_import import zennit
    zennit()
    twin = ModuleTwin(model, {k: {n: np.asarray(a) for n, a in v.items()} for k, v in params.items()}).eval()
    x = torch.tensor(np.asarray(model.preprocess(imgs))).permute(0, 3, 1, 2).contiguous()
    lib, name = ref.split(":")
    t = torch.tensor(np.asarray(targets).astype("int64"))
    if lib == "zennit":
        from zennit import composites as zc
        from zennit.attribution import Gradient

        from convlens.kernels import propagation as P
        kw = {}
        if name == "EpsilonGammaBox":
            first = next(n.name for n in model.graph.nodes if n.kind == "conv")
            lo, hi = P.input_bounds(model, params, first)
            kw = dict(low=torch.tensor(np.asarray(lo)).view(1, -1, 1, 1),
                      high=torch.tensor(np.asarray(hi)).view(1, -1, 1, 1))
        comp = getattr(zc, name)(**kw)
        hot = torch.nn.functional.one_hot(t, 1000).float()

        def run():
            with Gradient(twin, comp) as attributor:
                return attributor(x.clone().requires_grad_(True), lambda o: o * hot)[1]
    else:
        from captum.attr import DeepLift
        dl = DeepLift(twin)
        base = torch.tensor(np.asarray(model.preprocess(jnp.zeros_like(imgs)))).permute(0, 3, 1, 2).contiguous()

        def run():
            return dl.attribute(x.clone().requires_grad_(True), base, target=t)
    out = jnp.asarray(run().detach().permute(0, 2, 3, 1).numpy())
    _, pull = jax.vjp(model.preprocess, imgs)  # to pixels: caffe's channel order, unscaled
    per_pixel = np.asarray(pull(out)[0] / pull(jnp.ones_like(out))[0]) if lib == "zennit" else \
        np.asarray(out)[..., ::-1]
    return per_pixel, run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="JSON results (default: results/propagation[_quick].json)")
    a = ap.parse_args()
    batches = (8,) if a.quick else (1, 8)
    methods = {"lrp_epsilon_plus": METHODS["lrp_epsilon_plus"], "gradient": METHODS["gradient"]} if a.quick \
        else METHODS
    import torch
    torch.set_num_threads(2)
    model = build_model("vgg16")
    params = params_for(model)
    from tests.conftest import photo_batch
    rows = {}
    for b in batches:
        imgs = jnp.asarray(np.concatenate([photo_batch((224, 224))] * (-(-b // 4)))[:b], jnp.float32)
        for method, (opts, ref) in methods.items():
            f = explain_fn(model, method, opts, 1)
            out = f(params, imgs)
            conv = best_time(lambda: jax.block_until_ready(f(params, imgs)), a.reps)
            row = {"convlens_s": conv, "convlens_images_per_s": b / conv}
            if ref:
                want, run = reference(model, params, method, ref, imgs, out["targets"][:, 0])
                got = np.asarray(out["attribution"][:, 0])
                row["max_rel_difference"] = float(np.abs(got - want).max() / np.abs(want).max())
                row["reference"] = ref
                row["reference_s"] = best_time(run, a.reps)
                row["ratio_to_reference"] = row["reference_s"] / conv
            rows.setdefault(str(b), {})[method] = row
            print(f"b{b:<3d} {method:26s} {b / conv:7.2f} img/s" +
                  (f"  {ref}: {b / row['reference_s']:7.2f} img/s ({row['ratio_to_reference']:.2f}x), "
                   f"max rel diff {row['max_rel_difference']:.1e}" if ref else ""), flush=True)
        base = rows[str(b)]
        for method in methods:
            for other in ("gradient", "gradcam"):
                if other in base:
                    base[method][f"throughput_vs_{other}"] = base[other]["convlens_s"] / base[method]["convlens_s"]
    out = Path(a.out or HERE / "results" / ("propagation_quick.json" if a.quick else "propagation.json"))
    out.write_text(json.dumps({"machine": machine(), "batches": list(batches), "rows": rows}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
