"""Occlusion on VGG16 (224x224, one photo): brute force against the batched-forward limit,
incremental (exact) and approximate modes against brute force, and Captum's Occlusion,
all in the same run on the same weights; plus peak memory for a 1024x1024 image.

    python benchmarks/occlusion_throughput.py            # window 32/stride 16 and 16/4 (~40 min)
    python benchmarks/occlusion_throughput.py --quick    # window 32/stride 16 only

Timing: compilation excluded (ahead of time, ``lower().compile()``), then one timed call
(a sweep takes seconds to minutes; repeated calls vary by under 3% here),
``block_until_ready``; Captum's first call is timed (it has nothing to compile). The
results file is rewritten after every measurement.
Quality of approximations: SSIM (scikit-image) of the sensitivity grid and of the
input-resolution heatmap against the exact result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_time, load_arrays, machine, torch_model, explain_fn, forward_fn  # noqa: E402

from convlens.models.registry import build_model  # noqa: E402

APPROX = {"approx (drilldown 0.25)": {"incremental": True, "drilldown": 0.25},
          "approx (tau 0.5)": {"incremental": True, "tau": 0.5},
          "approx (tau 0.6, drilldown 0.15)": {"incremental": True, "tau": 0.6, "drilldown": 0.15}}


def photo():
    from PIL import Image
    from skimage import data
    return np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR))[None].astype(np.float32)


def ssim(a, b):
    from skimage.metrics import structural_similarity
    return float(structural_similarity(a, b, data_range=float(a.max() - a.min()) or 1.0))


def timed(fn, *args):
    exe = fn.lower(*args).compile()  # compilation only: a sweep is too long to run twice
    t = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return time.perf_counter() - t, jax.device_get(out)


def memory_probe(size: int, window: int, stride: int) -> dict:
    """Peak resident memory of a process explaining one size x size image (headless VGG16
    with global average pooling, so any size works), default memory budget."""
    code = f"""
import resource, time, numpy as np, convlens, jax
from convlens.models.network import Model
from convlens.models.keras_graph import graph_from_config
from convlens.models.preprocess import Preprocess
from convlens.models.vgg import vgg_config
m = Model(graph_from_config(vgg_config(include_top=False, pooling="avg", input_shape=({size}, {size}, 3),
          name="vgg16_gap")), preprocess=Preprocess("caffe"))
p = m.init(0)
x = np.random.default_rng(0).uniform(0, 255, (1, {size}, {size}, 3)).astype("float32")
t = time.perf_counter()
e = convlens.explain(m, p, x, "occlusion", window={window}, stride={stride})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, time.perf_counter() - t, e["sensitivity"].shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr[-500:]}
    gib, secs, shape = r.stdout.strip().split(" ", 2)
    return {"size": size, "window": window, "stride": stride, "peak_rss_gib": float(gib), "seconds": float(secs),
            "grid": shape}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    configs = [(32, 16)] if a.quick else [(32, 16), (16, 4)]
    weights = load_arrays("vgg16")
    model = build_model("vgg16")
    params = jax.tree.map(jnp.asarray, weights)
    x = jnp.asarray(photo())
    res = {"machine": machine(), "configs": {}}
    # The brute-force limit: plain batched forward throughput at the kernel's chunk size.
    from convlens.kernels.occlusion import OcclusionConfig
    cfg0 = OcclusionConfig()
    from convlens.kernels.common import copies_per_step, image_bytes
    chunk = copies_per_step(cfg0.chunk, cfg0.memory_mb, 1, 10_000, image_bytes(model, (224, 224)))
    xs = jnp.repeat(x, chunk, axis=0)
    fwd = forward_fn(model)
    t = best_time(lambda: fwd(params, xs).block_until_ready(), 2)
    limit = chunk / t
    res["forward_images_per_s"] = limit
    res["chunk"] = chunk
    print(f"batched forward (batch {chunk}): {limit:.2f} images/s = the brute-force limit", flush=True)
    try:
        import captum.attr as ca
        import torch
        torch.set_num_threads(2)
        tnet = torch_model("vgg16", weights, inplace=False, squash=False).to(memory_format=torch.channels_last)
        xt = torch.from_numpy((np.asarray(x)[..., ::-1] - np.array([103.939, 116.779, 123.68])).astype(
            "float32").transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
    except ImportError:
        ca = None
        print("Captum not installed: skipping it", flush=True)
    out_file = HERE / "results" / ("occlusion_throughput_quick.json" if a.quick else "occlusion_throughput.json")

    def save():  # after every row: a long run stopped early keeps what it measured
        out_file.write_text(json.dumps(res, indent=1))
    res["memory_1024"] = memory_probe(1024, 256, 256)
    print("1024x1024 image:", res["memory_1024"], flush=True)
    for win, st in configs:
        rows = res["configs"][f"{win}/{st}"] = {}
        run = {}
        for name, opts in [("brute force", {}), ("incremental", {"incremental": True}), *APPROX.items()]:
            fn = explain_fn(model, "occlusion", {"window": win, "stride": st, **opts}, 1)
            secs, out = timed(fn, params, x, None, None)
            run[name] = out
            pos = out["sensitivity"].shape[-2] * out["sensitivity"].shape[-1]
            row = {"seconds": secs, "positions": pos, "positions_per_s": pos / secs}
            if name == "brute force":
                row["fraction_of_forward_limit"] = pos / secs / limit
            else:
                ref = run["brute force"]
                row["speedup_vs_brute_force"] = rows["brute force"]["seconds"] / secs
                row["max_rel_diff"] = float(np.abs(out["sensitivity"] - ref["sensitivity"]).max()
                                            / np.abs(ref["sensitivity"]).max())
                row["ssim_grid"] = ssim(ref["sensitivity"][0, 0], out["sensitivity"][0, 0])
                row["ssim_heatmap"] = ssim(ref["heatmap"][0, 0], out["heatmap"][0, 0])
            rows[name] = row
            save()
            print(f"  {win}/{st} {name:34s} {secs:8.2f} s  {pos / secs:7.2f} positions/s  "
                  + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k not in ("seconds", "positions",
                                                                                  "positions_per_s")), flush=True)
        if ca is not None:
            algo = ca.Occlusion(tnet)
            base = torch.from_numpy(-np.array([103.939, 116.779, 123.68], np.float32)).reshape(1, 3, 1, 1)  # black, BGR
            target = int(run["brute force"]["targets"][0, 0])

            def captum():
                with torch.no_grad():
                    return algo.attribute(xt, sliding_window_shapes=(3, win, win), strides=(3, st, st),
                                          baselines=base, target=target, perturbations_per_eval=chunk)
            t0 = time.perf_counter()
            theirs = captum().numpy()[0].sum(0) / 3
            secs = time.perf_counter() - t0
            ours = run["brute force"]["heatmap"][0, 0]
            rows["captum"] = {"seconds": secs, "brute_force_speedup_vs_captum": secs / rows["brute force"]["seconds"],
                              "max_abs_heatmap_diff": float(np.abs(theirs - ours).max()),
                              "heatmap_scale": float(np.abs(ours).max())}
            print(f"  {win}/{st} Captum Occlusion                  {secs:8.2f} s  -> convlens brute force "
                  f"{secs / rows['brute force']['seconds']:.2f}x faster, incremental "
                  f"{secs / rows['incremental']['seconds']:.2f}x (heatmaps agree to "
                  f"{rows['captum']['max_abs_heatmap_diff']:.2g} of {rows['captum']['heatmap_scale']:.3g})",
                  flush=True)
            save()
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
