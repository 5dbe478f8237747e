"""The speed tables, written from the JSON results of the benchmark scripts, so the docs
(``docs/benchmarks.md``, by ``tools/make_docs.py``) show exactly what the last full runs
measured; and the README's summary table.

    python benchmarks/readme_tables.py      # the same as python tools/make_docs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(name):
    p = HERE / "results" / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def machine_line(res) -> str:
    m = res.get("machine", {})
    return f"*{m.get('cpu', 'CPU')} ({m.get('simd', '')}), {m.get('cpu_count')} cores*"


def models() -> str:
    """Every built-in: input size, preprocessing, default CAM layer and method, ImageNet weights."""
    sys.path.insert(0, str(HERE.parent))
    from convlens.kernels.common import default_layer, default_method
    from convlens.models.registry import MODELS, build_model
    rows = ["| name | input | preprocessing | default CAM layer | default method | ImageNet weights | from |",
            "|---|---|---|---|---|---|---|"]
    for name, spec in MODELS.items():
        model = build_model(name)
        w = spec.imagenet(True) if spec.imagenet else None
        origin = spec.description.split("(")[0].strip()
        rows.append(f"| `{name}` | {spec.default_size[0]}x{spec.default_size[1]} | {spec.preprocess.describe()} | "
                    f"`{default_layer(model)}` | {default_method(model)} | {'`' + w['fname'] + '`' if w else '-'} | "
                    f"{origin} |")
    return "\n".join(rows)


def forward() -> str | None:
    res = load("forward_throughput")
    if not res:
        return None
    out = [machine_line(res), ""]
    for name, r in res["models"].items():
        bs = r["batches"]
        base = r["images_per_s"][r["baseline"]]
        what = "Grad-CAM" if r.get("what") == "gradcam" else "forward"
        model = name.split("/")[0]
        out.append(f"| {model} {r['size'][0]}x{r['size'][1]}, {what}, images/s | "
                   + " | ".join(f"batch {b}" for b in bs) + " |")
        out.append("|---" * (len(bs) + 1) + "|")
        for label, vals in r["images_per_s"].items():
            out.append(f"| {label} | " + " | ".join(f"{vals[str(b)]:.2f} ({vals[str(b)] / base[str(b)]:.2f}x)"
                                                   for b in bs) + " |")
        out += ["", f"Largest difference of the outputs across frameworks: {r['max_output_difference']:.1e}.", ""]
    return "\n".join(out).rstrip()


def layers(worst: int | None = None) -> str | None:
    """Per layer type (benchmarks/layers.py): the worst forward and backward ratio to
    PyTorch over its shapes and batches, and where it is; ``worst``: only that many types,
    the worst first (the README's summary)."""
    res = load("layers")
    if not res:
        return None
    by_type: dict[str, list] = {}
    for r in res["rows"]:
        by_type.setdefault(r["type"], []).append(r)
    stats = []
    for t, rows in by_type.items():
        f = min(rows, key=lambda r: r["ratio_forward"])
        b = min(rows, key=lambda r: r["ratio_backward"])
        med_f = sorted(r["ratio_forward"] for r in rows)[len(rows) // 2]
        med_b = sorted(r["ratio_backward"] for r in rows)[len(rows) // 2]
        stats.append((min(f["ratio_forward"], b["ratio_backward"]), t, len(rows), f, b, med_f, med_b))
    stats.sort(key=lambda s: s[0])
    if worst:
        stats = stats[:worst]
    out = [machine_line(res), "",
           "| layer type | shapes x batches | forward: median, worst (where) | backward: median, worst (where) |",
           "|---|---|---|---|"]
    for _, t, n, f, b, mf, mb in stats:
        out.append(f"| {t} | {n} | {mf:.2f}x, {f['ratio_forward']:.2f}x ({f['model']} {f['shape']}, b{f['batch']}) | "
                   f"{mb:.2f}x, {b['ratio_backward']:.2f}x ({b['model']} {b['shape']}, b{b['batch']}) |")
    grouped = [r for r in res["rows"] if "shifted" in r]
    if grouped and not worst:
        gain_f = sorted(r["native"]["forward"] / r["shifted"]["forward"] for r in grouped)
        gain_b = sorted(r["native"]["backward"] / r["shifted"]["backward"] for r in grouped)
        out += ["", f"Grouped and depthwise convolutions, shifted multiply-adds against XLA's grouped "
                    f"convolution ({len(grouped)} shapes x batches): forward {gain_f[0]:.2f}-{gain_f[-1]:.2f}x "
                    f"(median {gain_f[len(gain_f) // 2]:.2f}x), backward {gain_b[0]:.2f}-{gain_b[-1]:.2f}x "
                    f"(median {gain_b[len(gain_b) // 2]:.2f}x); the ratios above use the faster of the two."]
    first = [r for r in res["rows"] if "im2col" in r]
    if first and not worst:
        gain_b = sorted(r["native"]["backward"] / r["im2col"]["backward"] for r in first)
        wins = sum(g > 1 for g in gain_b)
        out += ["", f"First convolutions (at most 4 input channels), the im2col gradient against XLA's "
                    f"({len(first)} shapes x batches): backward {gain_b[0]:.2f}-{gain_b[-1]:.2f}x (median "
                    f"{gain_b[len(gain_b) // 2]:.2f}x, faster in {wins}); the forward pass is XLA's in both."]
    return "\n".join(out)


def model_summary() -> str | None:
    """The README's model table: convlens (tuned) against the PyTorch twin per model, the
    range over batch sizes, forward and Grad-CAM."""
    res = load("forward_throughput")
    if not res:
        return None
    tuned = "convlens (tuned per computation)"
    out = [machine_line(res), "", "| model | forward, x PyTorch | Grad-CAM, x Captum / the PyTorch twin |", "|---|---|---|"]
    names = dict.fromkeys(k.split("/")[0] for k in res["models"])

    def span(key):
        r = res["models"].get(key)
        if not r or tuned not in r["images_per_s"]:
            return "-"
        base, mine = r["images_per_s"][r["baseline"]], r["images_per_s"][tuned]
        q = [mine[str(b)] / base[str(b)] for b in r["batches"]]
        return f"{min(q):.2f}-{max(q):.2f}x (batch {', '.join(map(str, r['batches']))})"
    for name in names:
        out.append(f"| {name} | {span(name)} | {span(name + '/gradcam')} |")
    return "\n".join(out)


def incremental_curves() -> str | None:
    res = load("incremental_curves")
    if not res:
        return None
    out = [machine_line(res), "", f"| model, {res['images']} images | metric | full re-inference | incremental | speed-up |",
           "|---|---|---|---|---|"]
    for model, r in res["models"].items():
        for metric, m in r["metrics"].items():
            out.append(f"| {model} | {metric} | {m['full_s']:.2f} s | {m['incremental_s']:.2f} s | "
                       f"{m['speedup']:.2f}x |")
    return "\n".join(out)


def explain() -> str | None:
    res = load("explain_throughput")
    if not res:
        return None
    out = [machine_line(res), "",
           "| VGG16 224x224 | batch | convlens images/s | x forward | Captum images/s | convlens vs Captum |",
           "|---|---|---|---|---|---|"]
    for b, r in res["batches"].items():
        fwd = r["forward"]
        out.append(f"| forward | {b} | {fwd:.2f} | 1.00 | | |")
        for m in ("gradcam", "guided_gradcam", "smoothgrad", "gradcam_top3"):
            if m not in r:
                continue
            ref = r.get(f"captum_{m}")
            name = {"smoothgrad": f"smoothgrad ({res['smoothgrad_samples']} samples)",
                    "gradcam_top3": "gradcam, 3 classes per image"}.get(m, m)
            out.append(f"| {name} | {b} | {r[m]:.2f} | {r[m] / fwd:.2f} | " + (
                f"{ref:.2f} | {r[m] / ref:.2f}x |" if ref else "| |"))
        if "captum_gradcam_nchw" in r:
            out.append(f"| gradcam vs Captum NCHW | {b} | {r['gradcam']:.2f} | | {r['captum_gradcam_nchw']:.2f} | "
                       f"{r['gradcam'] / r['captum_gradcam_nchw']:.2f}x |")
        if "pytorch_grad_cam_gradcam" in r:
            p = r["pytorch_grad_cam_gradcam"]
            out.append(f"| gradcam vs pytorch-grad-cam | {b} | {r['gradcam']:.2f} | | {p:.2f} | "
                       f"{r['gradcam'] / p:.2f}x |")
    return "\n".join(out)


def occlusion() -> str | None:
    res = load("occlusion_throughput")
    if not res:
        return None
    out = [machine_line(res), "",
           f"Brute-force limit: batched forward at {res['forward_images_per_s']:.2f} images/s (batch {res['chunk']}).",
           "", "| VGG16, 1 image | mode | seconds | positions/s | vs brute force | quality |",
           "|---|---|---|---|---|---|"]
    for cfg, rows in res["configs"].items():
        for name, r in rows.items():
            if name == "captum":
                out.append(f"| {cfg} | Captum Occlusion | {r['seconds']:.1f} | | brute force is "
                           f"{r['brute_force_speedup_vs_captum']:.2f}x faster | heatmaps agree to "
                           f"{r['max_abs_heatmap_diff']:.1e} |")
                continue
            if name == "brute force":
                q = f"{r['fraction_of_forward_limit']:.2f} of the forward limit"
                sp = "1.00x"
            else:
                sp = f"{r['speedup_vs_brute_force']:.2f}x"
                q = (f"exact (max rel. diff {r['max_rel_diff']:.1e})" if r["max_rel_diff"] < 1e-3 else
                     f"SSIM {r['ssim_grid']:.3f} (grid), {r['ssim_heatmap']:.3f} (heatmap)")
            out.append(f"| {cfg} | {name} | {r['seconds']:.1f} | {r['positions_per_s']:.1f} | {sp} | {q} |")
    mem = res.get("memory_1024")
    if mem and "peak_rss_gib" in mem:
        out += ["", f"A 1024x1024 image (headless VGG16 + global pooling, window {mem['window']}, default "
                    f"memory budget): peak resident memory {mem['peak_rss_gib']:.2f} GiB."]
    return "\n".join(out)


def ascent() -> str | None:
    res = load("ascent_throughput")
    if not res:
        return None
    out = [machine_line(res), "", f"fp32 matmul on this machine: {res['matmul_gflops']:.0f} GFLOP/s.", "",
           "| VGG16, classic, 40 steps | filters/s batched | one at a time | batched speedup | GFLOP/s | of matmul |",
           "|---|---|---|---|---|---|"]
    for case, r in res["cases"].items():
        out.append(f"| {case} px (batch {r['batch']}) | {r['filters_per_s_batched']:.3f} | "
                   f"{r['filters_per_s_one_at_a_time']:.3f} | {r['batched_speedup']:.2f}x | "
                   f"{r['achieved_gflops']:.0f} | {r['fraction_of_matmul']:.2f} |")
    lp = res["loops"]
    out += ["", f"Loops ({lp['case']} px, batch {lp['batch']}): " + "; ".join(
        f"{k} {v['seconds']:.1f} s" for k, v in lp.items() if isinstance(v, dict)) + "."]
    p = res["atlas_projection"]
    out += ["", f"Whole VGG16 atlas ({p['filters']} filters, {p['size']} px, {p['steps']} steps): "
                f"{p['tflop']:.0f} TFLOP, about {p['hours']:.1f} hours on this machine."]
    return "\n".join(out)


def engine() -> str | None:
    res = load("engine_throughput")
    if not res:
        return None
    return (f"{machine_line(res)}\n\nGrad-CAM over {res['images']} JPEG photos (VGG16, batch {res['batch']}): "
            f"{res['end_to_end_images_per_s']:.2f} images/s end to end (decoding, resizing, store writes, "
            f"consolidation included) against {res['kernel_images_per_s']:.2f} images/s for the kernel alone on "
            f"batches in memory: **{res['fraction_of_kernel']:.2f}** of the kernel.")


def metrics_cost() -> str | None:
    res = load("metrics_cost")
    if not res:
        return None
    out = [machine_line(res), "", "| model | Grad-CAM s/image | metrics s/image | metrics / explanation |",
           "|---|---|---|---|"]
    for name, r in res.items():
        if name == "machine":
            continue
        out.append(f"| {name} ({r['steps']} steps, {r['forward_passes_per_image']} forward passes) | "
                   f"{r['explain_s_per_image']:.4f} | {r['metrics_s_per_image']:.4f} | {r['metrics_over_explain']:.1f}x |")
    return "\n".join(out)


def shared() -> str | None:
    res = load("cam_family")
    if not res:
        return None
    out = [machine_line(res), "", f"{res['model']}, batch {res['cam_family']['batch']}:", "",
           "| methods | together (s/batch) | one run each (s/batch) | speed-up |", "|---|---|---|---|"]
    for name in ("cam_family", "gradient_family"):
        r = res[name]
        out.append(f"| {', '.join(r['methods'])} | {r['together_s']:.3f} | {r['separately_s']:.3f} | "
                   f"**{r['speedup']:.2f}x** |")
    return "\n".join(out)


def quality() -> str | None:
    res = load("metrics_throughput")
    if not res:
        return None
    out = [machine_line(res), "", f"{res['model']}, {res['images']} images, the same maps and targets; "
           f"{res['steps']} perturbation steps, {res['samples']} noise samples:", "",
           "| family | metrics | Quantus 0.6 (s) | convlens (s) | convlens speed-up | model passes (batched) | "
           "share of the batched-pass limit |", "|---|---|---|---|---|---|---|"]
    for fam, r in res["families"].items():
        f, g = r.get("passes", (0, 0))
        passes = ", ".join(p for p in (f"{f} forward" if f else "", f"{g} gradient" if g else "") if p) or "none"
        share = f"{r['of_pass_limit']:.2f}" if r.get("of_pass_limit") else "-"
        out.append(f"| {fam} | {', '.join(r['metrics'])} | {r['quantus_s']:.2f} | {r['convlens_s']:.2f} | "
                   f"**{r['speedup']:.1f}x** | {passes} | {share} |")
    return "\n".join(out)


def callback() -> str | None:
    res = load("callback_overhead")
    if not res:
        return None
    return (f"{machine_line(res)}\n\n{res['model']} trained by Keras {res['keras']} ({res['backend']} backend) on "
            f"{res['train_images']} images, batch {res['batch']}: an epoch takes {res['epoch_s']:.2f} s; recording "
            f"{', '.join(res['methods'])} of {res['probe_images']} images takes {res['callback_s_steady']:.3f} s per "
            f"epoch (**{res['overhead_per_epoch']:.1%}** of the epoch; the first call, which compiles, "
            f"{res['callback_s_first']:.2f} s). Each method compiled "
            f"{'once' if set(res['compilations'].values()) == {1} else res['compilations']} over "
            f"{res['epochs']} epochs; losses with and without the callback "
            f"{'identical' if res['losses_identical'] else 'DIFFERENT'}.")


TOOLS = {"captum_lime": "Captum Lime", "reference_pytorch": "the authors' RISE code in PyTorch",
         "pytorch_grad_cam_ScoreCAM": "pytorch-grad-cam ScoreCAM",
         "pytorch_grad_cam_AblationCAM": "pytorch-grad-cam AblationCAM",
         "pytorch_grad_cam_EigenCAM": "pytorch-grad-cam EigenCAM"}


def perturbation() -> str | None:
    res = load("perturbation_throughput")
    if not res:
        return None
    out = [machine_line(res), "", f"Batched forward at the kernels' chunk ({res['chunk']} images): "
           f"{res['forward_images_per_s']:.2f} images/s, the limit for methods that run the whole network on "
           "every copy.", "",
           "| VGG16, 1 image | copies | convlens s | of the forward limit | PyTorch tool | its s | convlens faster | "
           "map correlation |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        copies = {"lime": f"{r['copies']} samples", "rise": f"{r['copies']} masks"}.get(name.split(",")[0], "")
        copies = copies or (f"{r['copies']} channels" if r["copies"] > 1 else "1 SVD")
        tool = next(((k, v) for k, v in r.items() if isinstance(v, dict)), None)
        cells = [name, copies, f"{r['seconds']:.2f}", f"{r['fraction_of_forward_limit']:.2f}"]
        if tool:
            k, v = tool
            cells += [TOOLS.get(k, k), f"{v['seconds']:.2f}", f"**{v['convlens_speedup']:.2f}x**",
                      f"{v['map_correlation']:.3f}"]
        else:
            extra = r.get("map_correlation_with_all_channels")
            cells += ["", "", "", "" if extra is None else f"{extra:.3f} with all 512 channels"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def video() -> str | None:
    res = load("video_throughput")
    if not res:
        return None
    out = [machine_line(res), "", f"Grad-CAM over a {res['frames']}-frame video ({res['video']}), frames per second:",
           "", "| model | decode | kernel (batch 8) | engine run | of the kernel | kernel (batch 1) | live, unpaced | "
           "live at 30 fps: explained (kept) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        lu, l30 = r["live_unpaced"], r["live_30fps"]
        out.append(f"| {name} {r['input'][0]}x{r['input'][1]} | {r['decode_fps']:.0f} | {r['kernel_fps']:.1f} | "
                   f"{r['engine_fps']:.1f} | **{r['engine_fraction_of_kernel']:.2f}** | {r['kernel_fps_batch1']:.1f} | "
                   f"{lu['fps']:.1f} ({lu['fraction_of_batch1_kernel']:.2f} of batch 1) | {l30['fps']:.1f} "
                   f"({100 * l30['kept_share']:.0f}%) |")
    return "\n".join(out)


def precision() -> str | None:
    res = load("precision_effect")
    if not res:
        return None
    out = [machine_line(res), "",
           f"| VGG16, {res['images']} photos | rank correlation of maps, mean (worst) | logits: largest difference, "
           "relative | time fast / full |", "|---|---|---|---|"]
    for name, r in res["methods"].items():
        out.append(f"| {name} | {r['rank_correlation_mean']:.3f} ({r['rank_correlation_min']:.3f}) | "
                   f"{r['logit_max_rel_diff']:.1e} | {r['fast_over_full_time']:.2f} |")
    return "\n".join(out)


def main():
    sys.path.insert(0, str(HERE.parent / "tools"))
    import make_docs
    make_docs.main()


if __name__ == "__main__":
    main()
