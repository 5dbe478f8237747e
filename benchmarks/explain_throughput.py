"""Explanation throughput on VGG16 (224x224): Grad-CAM, guided Grad-CAM and SmoothGrad,
as a ratio to the same model's plain forward throughput in the same run, and against
Captum (LayerGradCam, GuidedGradCam, NoiseTunnel over Saliency) on identical weights
where PyTorch and Captum are installed. Captum's maps are checked against convlens's
(same weights, same images) before anything is timed.

    python benchmarks/explain_throughput.py          # batch 8 and 32 (~15 min on 2 cores)
    python benchmarks/explain_throughput.py --quick  # batch 8, Grad-CAM only

Timing: warm-up (compilation) excluded, best of --reps, block_until_ready.
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
from common import best_time, load_arrays, machine, torch_model, explain_fn, forward_fn, keys_for  # noqa: E402

from convlens.models.registry import build_model  # noqa: E402

SMOOTH_SAMPLES = 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    batches = (8,) if a.quick else (8, 32)
    methods = [("gradcam", {})] if a.quick else [
        ("gradcam", {}), ("guided_gradcam", {}), ("smoothgrad", {"samples": SMOOTH_SAMPLES, "chunk": SMOOTH_SAMPLES})]
    weights = load_arrays("vgg16")
    model = build_model("vgg16")
    params = jax.tree.map(jnp.asarray, weights)
    try:
        import captum.attr as ca
        import torch
        torch.set_num_threads(2)
        tnet = torch_model("vgg16", weights, inplace=False, squash=False).to(memory_format=torch.channels_last)
        for p in tnet.parameters():
            p.requires_grad_(False)
    except ImportError:
        ca = None
        print("PyTorch/Captum not installed: convlens only")
    fwd = forward_fn(model)
    results = {"machine": machine(), "smoothgrad_samples": SMOOTH_SAMPLES, "batches": {}}
    for b in batches:
        x_np = np.random.default_rng(0).uniform(0, 255, (b, 224, 224, 3)).astype("float32")
        x = jnp.asarray(x_np)
        rows = {}
        t_fwd = best_time(lambda: fwd(params, x).block_until_ready(), a.reps)
        rows["forward"] = b / t_fwd
        print(f"\nbatch {b}: forward {b / t_fwd:.2f} images/s", flush=True)
        if ca is not None:
            xt = torch.from_numpy(((x_np[..., ::-1] - np.array([103.939, 116.779, 123.68])).astype("float32")
                                   ).transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                targets = tnet(xt).argmax(-1)
        for method, opts in methods:
            if method == "smoothgrad" and b > 8:
                continue  # 8 noisy copies of 32 images: minutes per call, same ratio as batch 8
            fn = explain_fn(model, method, opts, 1)
            keys = keys_for(b)
            out = fn(params, x, None, keys)
            t = best_time(lambda: jax.block_until_ready(fn(params, x, None, keys)), a.reps)
            rows[method] = b / t
            line = f"  {method:16s} convlens {b / t:6.2f} images/s = {t_fwd / t:.2f} x forward"
            if ca is not None:
                ref_t, agree = captum_time(ca, torch, tnet, xt, targets, method, out, a.reps)
                rows[f"captum_{method}"] = b / ref_t
                line += f" | Captum {b / ref_t:6.2f} images/s -> convlens {ref_t / t:.2f}x faster ({agree})"
                if method == "gradcam":
                    # Captum as most users run it: default NCHW memory format.
                    nchw = torch_model("vgg16", weights, inplace=False, squash=False)
                    ref2, _ = captum_time(ca, torch, nchw, xt.contiguous(), targets, method, out, a.reps)
                    rows["captum_gradcam_nchw"] = b / ref2
                    line += f"; Captum NCHW {b / ref2:6.2f} -> {ref2 / t:.2f}x"
                    # pytorch-grad-cam backpropagates from the loss to the layer, so its model
                    # keeps requires_grad on its weights, as its users have it.
                    pnet = torch_model("vgg16", weights, inplace=False, squash=False).to(
                        memory_format=torch.channels_last)
                    ref3 = pgc_time(pnet, xt, targets, out, a.reps)
                    if ref3 is not None:
                        rows["pytorch_grad_cam_gradcam"] = b / ref3[0]
                        line += f"; pytorch-grad-cam {b / ref3[0]:6.2f} -> {ref3[0] / t:.2f}x ({ref3[1]})"
            print(line, flush=True)
        if b == 8:
            # Three classes per image: one forward and three backward passes (vmap over the
            # cotangents) against three calls of the PyTorch tools.
            fn3 = explain_fn(model, "gradcam", {}, 3)
            keys = keys_for(b)
            fn3(params, x, None, keys)  # compiles (and tunes) outside the timing
            t3 = best_time(lambda: jax.block_until_ready(fn3(params, x, None, keys)), a.reps)
            rows["gradcam_top3"] = b / t3
            line = f"  {'gradcam top-3':16s} convlens {b / t3:6.2f} images/s = {t_fwd / t3:.2f} x forward"
            if ca is not None:
                with torch.no_grad():
                    top3 = tnet(xt).topk(3, -1).indices
                algo = ca.LayerGradCam(tnet, tnet[29])
                ref = best_time(lambda: [algo.attribute(xt, target=top3[:, j], relu_attributions=True)
                                         for j in range(3)], a.reps)
                rows["captum_gradcam_top3"] = b / ref
                line += f" | Captum (3 calls) {b / ref:6.2f} images/s -> convlens {ref / t3:.2f}x faster"
            print(line, flush=True)
        results["batches"][b] = rows
    path = HERE / "results" / ("explain_throughput_quick.json" if a.quick else "explain_throughput.json")
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")


def captum_time(ca, torch, net, xt, targets, method, ours, reps):
    """Captum's time for the same explanation, and how well its map agrees with ours."""
    relu_idx = 29  # the ReLU after the 13th conv: Keras's block5_conv3 output
    if method == "gradcam":
        algo = ca.LayerGradCam(net, net[relu_idx])

        def run():
            return algo.attribute(xt, target=targets, relu_attributions=True)
        theirs = run().detach().numpy()[:, 0]
        agree = _corr(theirs, ours["cam"][:, 0])
    elif method == "guided_gradcam":
        algo = ca.GuidedGradCam(net, net[relu_idx])

        def run():
            return algo.attribute(xt, target=targets)
        # Captum upsamples the CAM with its own interpolation: compare map structure only.
        theirs = np.abs(run().detach().numpy()).max(1)
        agree = _corr(theirs, ours["heatmap"][:, 0])
    else:
        algo = ca.NoiseTunnel(ca.Saliency(net))

        def run():
            return algo.attribute(xt, target=targets, nt_type="smoothgrad", nt_samples=SMOOTH_SAMPLES,
                                  stdevs=0.15 * 255, abs=False)
        theirs = None
        agree = "noise differs: not compared"
    t = best_time(run, reps)
    return t, agree if isinstance(agree, str) else f"map correlation {agree:.4f}"


def pgc_time(net, xt, targets, ours, reps):
    """pytorch-grad-cam's GradCAM (its own cv2 resizing and per-image normalisation
    included, as its users get it), or None where it is not installed."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    cam = GradCAM(model=net, target_layers=[net[29]])
    tg = [ClassifierOutputTarget(int(c)) for c in targets]

    def run():
        return cam(input_tensor=xt, targets=tg)
    theirs = run()
    ours_map = np.asarray(ours["heatmap"][:, 0])
    ours_map = ours_map / np.maximum(ours_map.max(axis=(1, 2), keepdims=True), 1e-12)
    return best_time(run, reps), f"map correlation {_corr(theirs, ours_map):.4f}"


def _corr(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


if __name__ == "__main__":
    main()
