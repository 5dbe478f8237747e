"""Perturbation and gradient-free CAM methods on VGG16 (224x224, one photo): LIME, RISE,
Score-CAM (and Faster Score-CAM), Ablation-CAM and Eigen-CAM, each as masked images per
second against the batched-forward limit, and against the PyTorch tools on identical
weights in the same run: Captum's Lime, pytorch-grad-cam's ScoreCAM, AblationCAM and
EigenCAM, and RISE as the authors' reference code does it (written here in PyTorch).

    python benchmarks/perturbation_throughput.py           # ~25 min on 2 cores
    python benchmarks/perturbation_throughput.py --quick   # fewer samples, no PyTorch

Parity: the PyTorch model takes raw RGB pixels and does Keras's caffe preprocessing
inside, so the PyTorch tools mask the same pixels convlens does (baseline 0 = black);
Captum's Lime is given lime's estimator (the kernel on the on/off vectors, ridge 1) and
convlens's superpixels. Maps are compared by correlation (the random draws differ for
LIME and RISE; pytorch-grad-cam upsamples with align_corners=True).
Timing: compilation excluded (ahead of time), one timed call (these take seconds to
minutes), ``block_until_ready``; the PyTorch tools' first call is timed (nothing to
compile). RISE's reference masks are generated once, outside the timing, as the authors'
code reuses them for every image; convlens draws each image's masks on the device, inside.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_time, load_arrays, machine, torch_model, explain_fn, forward_fn, keys_for  # noqa: E402

from convlens.kernels.common import copies_per_step, image_bytes  # noqa: E402
from convlens.models.registry import build_model  # noqa: E402

MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def photo():
    from PIL import Image
    from skimage import data
    return np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR))[None].astype(np.float32)


def timed(fn, *args):
    exe = fn.lower(*args).compile()  # compilation only: these calls are too long to run twice
    t = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return time.perf_counter() - t, jax.device_get(out)


def corr(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def pixel_net(torch, weights):
    """VGG16 in PyTorch taking RGB pixels 0..255 (NCHW), caffe preprocessing inside."""
    from torch import nn

    class Caffe(nn.Module):
        def forward(self, x):
            return x.flip(1) - torch.from_numpy(MEAN_BGR).view(1, 3, 1, 1)
    net = nn.Sequential(Caffe(), torch_model("vgg16", weights, inplace=False, squash=False)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def reference_masks(n, s, p1, h, w, seed=0):
    """Masks as the authors' code draws them (numpy grid, skimage's bilinear resize with
    reflection, a random crop), and the seconds it took."""
    from skimage.transform import resize
    rng = np.random.default_rng(seed)
    cell = np.ceil(np.array([h, w]) / s)
    up = ((s + 1) * cell).astype(int)
    t0 = time.perf_counter()
    grid = (rng.random((n, s, s)) < p1).astype(np.float32)
    masks = np.empty((n, h, w), np.float32)
    for i in range(n):
        dx, dy = rng.integers(0, int(cell[0])), rng.integers(0, int(cell[1]))
        masks[i] = resize(grid[i], up, order=1, mode="reflect", anti_aliasing=False)[dx:dx + h, dy:dy + w]
    return masks, time.perf_counter() - t0


def rise_reference(torch, net, x, masks, p1, batch):
    """RISE as the authors' code (eclique/RISE) computes it from given masks ``[N, H, W]``:
    all masked images stacked, the model's softmax in batches, one matrix product.
    Returns (seconds, maps [K, H, W])."""
    n, h, w = masks.shape
    masks_t = torch.from_numpy(np.array(masks, np.float32))[:, None]  # a writable copy

    def run():
        with torch.no_grad():
            stack = masks_t * x
            probs = torch.cat([torch.softmax(net(stack[i:i + batch]), -1) for i in range(0, n, batch)])
            return (probs.T @ masks_t.view(n, h * w)).view(-1, h, w) / n / p1
    t0 = time.perf_counter()
    sal = run()
    return time.perf_counter() - t0, sal.numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated rows to (re)measure: lime, rise, scorecam, faster, ablationcam, "
                    "eigencam; the others are kept from the last results file")
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else None

    def want(row):
        return only is None or row in only
    n_lime, n_rise = (64, 128) if a.quick else (256, 512)
    weights = load_arrays("vgg16")
    model = build_model("vgg16")
    params = jax.tree.map(jnp.asarray, weights)
    x = jnp.asarray(photo())
    keys = keys_for(1)
    res = {"machine": machine(), "lime_samples": n_lime, "rise_samples": n_rise, "rows": {}}
    out_file = HERE / "results" / ("perturbation_throughput_quick.json" if a.quick else "perturbation_throughput.json")
    if only and out_file.exists():
        res["rows"] = json.loads(out_file.read_text())["rows"]

    def save():
        out_file.write_text(json.dumps(res, indent=1))

    chunk = copies_per_step(0, 1024, 1, 10_000, image_bytes(model, (224, 224)))
    xs = jnp.repeat(x, chunk, axis=0)
    fwd = forward_fn(model)
    limit = chunk / best_time(lambda: fwd(params, xs).block_until_ready(), 2)
    res["forward_images_per_s"], res["chunk"] = limit, chunk
    print(f"batched forward (batch {chunk}): {limit:.2f} images/s = the limit for perturbation methods", flush=True)

    torch = None
    if not a.quick:
        try:
            import torch
            torch.set_num_threads(2)
            pnet = pixel_net(torch, weights)
            xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        except ImportError:
            print("PyTorch not installed: convlens only", flush=True)
            torch = None

    runs = {}

    def ours(name, method, opts, copies):
        secs, out = timed(explain_fn(model, method, opts, 1), params, x, None, keys)
        runs[name] = out
        row = {"seconds": secs, "copies": copies, "copies_per_s": copies / secs,
               "fraction_of_forward_limit": copies / secs / limit}
        res["rows"][name] = row
        save()
        print(f"  {name:34s} {secs:8.2f} s  {copies / secs:7.2f} masked images/s = "
              f"{copies / secs / limit:.2f} of the forward limit", flush=True)
        return out

    def theirs(name, tool, secs, agreement):
        row = res["rows"][name]
        row[tool] = {"seconds": secs, "convlens_speedup": secs / row["seconds"], "map_correlation": agreement}
        save()
        print(f"  {name:34s} {tool}: {secs:8.2f} s -> convlens {secs / row['seconds']:.2f}x faster "
              f"(map correlation {agreement:.3f})", flush=True)

    target = int(np.asarray(fwd(params, x)).argmax())
    # LIME: forward passes of masked images + a small regression.
    if want("lime"):
        out = ours("lime", "lime", {"samples": n_lime}, n_lime)
    if want("lime") and torch is not None:
        from captum._utils.models.linear_model import SkLearnRidge
        from captum.attr import Lime
        seg = out["segments"][0]
        s = int(seg.max()) + 1

        def lime_kernel(original, perturbed, interpretable, **kw):
            z = interpretable.float().reshape(-1)
            norm = float(z.norm()) * math.sqrt(s)
            d = 1.0 - (float(z.sum()) / norm if norm > 0 else 0.0)
            return math.sqrt(math.exp(-d * d / 0.25 ** 2))
        from convlens.kernels.sampling import segment_mean_images
        base = np.asarray(segment_mean_images(x, jnp.asarray(seg[None]), 49))
        lime = Lime(pnet, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=lime_kernel)
        t0 = time.perf_counter()
        with torch.no_grad():
            attr = lime.attribute(xt, target=target, baselines=torch.from_numpy(base.transpose(0, 3, 1, 2).copy()),
                                  feature_mask=torch.from_numpy(seg[None, None].astype(np.int64)),
                                  n_samples=n_lime, perturbations_per_eval=chunk)
        theirs("lime", "captum_lime", time.perf_counter() - t0, corr(attr.numpy()[0, 0], out["heatmap"][0, 0]))

    if want("rise"):
        out = ours("rise", "rise", {"samples": n_rise}, n_rise)
    if want("rise") and torch is not None:
        # Fed convlens's own masks, the reference must give the same map: the estimator is
        # checked, and the timing compares the same work. Its own mask generator is timed apart.
        from convlens.kernels.sampling import rise_mask
        masks = np.asarray(jax.vmap(lambda i: rise_mask(jax.random.fold_in(keys[0], i), (224, 224), 7, 0.5))(
            jnp.arange(n_rise)))
        secs, sal = rise_reference(torch, pnet, xt, masks, 0.5, chunk)
        theirs("rise", "reference_pytorch", secs, corr(sal[target], out["heatmap"][0, 0]))
        res["rows"]["rise"]["reference_pytorch"]["mask_seconds_excluded"] = reference_masks(n_rise, 7, 0.5, 224,
                                                                                             224)[1]
        save()

    pgc = None
    if torch is not None:
        try:
            import pytorch_grad_cam as pgc
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        except ImportError:
            print("pytorch-grad-cam not installed: skipping it", flush=True)
    layer = pnet[1][29] if pgc is not None else None  # the ReLU after block5_conv3

    def pgc_run(cls, name, ours_map, **kw):
        cam = cls(model=pnet, target_layers=[layer], **kw)
        t0 = time.perf_counter()
        m = cam(input_tensor=xt, targets=[ClassifierOutputTarget(target)])
        secs = time.perf_counter() - t0
        theirs(name, f"pytorch_grad_cam_{cls.__name__}", secs, corr(m[0], ours_map / max(ours_map.max(), 1e-12)))

    if want("scorecam") or want("faster"):
        out = ours("scorecam", "scorecam", {}, 512)
    if want("scorecam") and pgc is not None:
        pgc_run(pgc.ScoreCAM, "scorecam", out["heatmap"][0, 0])
    if want("faster"):
        out32 = ours("scorecam, 32 channels (Faster Score-CAM)", "scorecam", {"channels": 32}, 32)
        res["rows"]["scorecam, 32 channels (Faster Score-CAM)"]["map_correlation_with_all_channels"] = corr(
            out32["heatmap"][0, 0], out["heatmap"][0, 0])
    if want("ablationcam"):
        out = ours("ablationcam", "ablationcam", {}, 512)
    if want("ablationcam") and pgc is not None:
        pgc_run(pgc.AblationCAM, "ablationcam", out["heatmap"][0, 0])
    if want("eigencam"):
        out = ours("eigencam", "eigencam", {}, 1)
    if want("eigencam") and pgc is not None:
        cam = pgc.EigenCAM(model=pnet, target_layers=[layer])
        t0 = time.perf_counter()
        m = cam(input_tensor=xt, targets=[ClassifierOutputTarget(target)])  # ignored: class-agnostic
        secs = time.perf_counter() - t0
        theirs("eigencam", "pytorch_grad_cam_EigenCAM", secs, abs(corr(m[0], out["heatmap"][0, 0])))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
