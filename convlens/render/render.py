"""``convlens render STORE --out DIR``: every picture a store can give, as PNG files.

What is drawn depends on what the store holds:

* ``activations/<layer>`` -> ``activations/<layer>/item<i>[_p<k>].png``: every channel a
  tile (standardised as in *Deep Learning with Python*), ``per_row`` per row, pages of
  ``per_row ** 2`` channels, layer name and shape in the title;
* ``weights/<layer>/filters`` -> ``weights/<layer>[_p<k>].png``: RGB kernels as colour
  tiles, deeper kernels as one row of input-channel tiles per filter, with indices;
* ``atlas/<layer>/patterns`` -> ``atlas/<layer>_p<k>.png``: 8x8 patterns a page with
  their filter indices, and ``atlas/contact.png`` (the first 8 of every layer);
* method heatmaps with stored inputs -> ``overlays/<i>.png`` (the image, then one
  overlay per method and target, the top-3 predictions in the title) and
  ``overlays/<method>_contact.png``;
* an audit -> ``audit/<method>_class_means.png``, ``audit/<method>_suspicious.png``,
  ``audit/quality_intervals.png`` and ``audit/quality_curves.png`` (the quality metrics);
* the input pipeline -> ``pipeline.png`` (items as read, as resized, as preprocessed);
* a video run (`convlens.engine.video`) -> ``video/<file>_<method>.mp4`` (or ``.webm``,
  ``.gif``, or a folder of PNG frames): every explained frame with its first target's map, the
  top label and the time, at the frames' own times (`convlens.render.video`);
* a training store (`convlens.training`, heatmaps with an ``epoch`` axis) ->
  ``training/<method>/item<i>.png`` (one strip per image, epochs left to right),
  ``training/<method>.gif`` (every image, one frame per epoch) and
  ``training/metrics.png`` (the logged metrics per epoch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from convlens.config import Config, option
from convlens.engine import schema, store
from convlens.engine.ownership import claim_folder
from convlens.errors import OptionError
from convlens.models.labels import name_of
from convlens.render import images as im

STYLES = ("blend", "camshow")


@dataclasses.dataclass(frozen=True)
class LookOptions(Config):
    """How maps are drawn over images.

    Attributes:
      cmap: colour map (jet, viridis, turbo, inferno ...).
      style: blend (on the image) or camshow (on a darkened grey copy, above a threshold).
      alpha: overlay opacity, 0..1.
      limit: items drawn as overlays.
    """

    cmap: str = "jet"
    style: str = option("blend", choices=STYLES)
    alpha: float = option(0.5, min=0, max=1)
    limit: int = option(64, min=0)

    _owner = "render"

    def __post_init__(self):
        super().__post_init__()
        import matplotlib
        if self.cmap not in matplotlib.colormaps:
            raise OptionError(f"unknown colour map {self.cmap!r}: try jet, viridis, inferno, turbo")


VIDEO_CHOICES = ("mp4", "webm", "gif", "png", "none")


@dataclasses.dataclass(frozen=True)
class RenderOptions(LookOptions):
    """How `convlens render` draws a store.

    Attributes:
      cmap: colour map (jet, viridis, turbo, inferno ...).
      style: blend (on the image) or camshow (on a darkened grey copy, above a threshold).
      alpha: overlay opacity, 0..1.
      limit: items drawn as overlays.
      per_row: feature-map tiles per row.
      video: video runs: the overlays as an mp4, webm or gif video, png frames, or none.
    """

    per_row: int = option(16, min=1, max=256)
    video: str = option("mp4", choices=VIDEO_CHOICES)


@dataclasses.dataclass(frozen=True)
class ReportOptions(LookOptions):
    """How `convlens report` lays out a store.

    Attributes:
      cmap: colour map (jet, viridis, turbo, inferno ...).
      style: blend (on the image) or camshow (on a darkened grey copy, above a threshold).
      alpha: overlay opacity, 0..1.
      limit: items drawn as overlays.
      per_page: items per gallery page.
    """

    per_page: int = option(48, min=1, max=100000)

    _owner = "report"


def class_names_of(root) -> tuple[str, ...] | None:
    """Label names of the model's outputs, as the run recorded them."""
    names = root.attrs.get("model_class_names")
    if names == "imagenet-1k":
        from convlens.models.labels import imagenet_class_names
        return imagenet_class_names()
    return tuple(names) if isinstance(names, list) else None


def prediction_title(root, i: int, names) -> str:
    ids = root["ids"]
    item = str(ids[i])
    if "predictions/topk_index" not in root:
        return item
    idx, prob = root["predictions/topk_index"][i], root["predictions/topk_prob"][i]
    if idx[0] < 0:
        return f"{item}: failed"
    parts = [f"{name_of(c, names)} {p:.2f}" for c, p in zip(idx[:3], prob[:3])]
    label = ""
    if "labels" in root and root["labels"][i] >= 0:
        lab = int(root["labels"][i])
        dn = root.attrs.get("class_names")
        label = f" (label {name_of(lab, dn)})"
    return f"{Path(item).name}{label}: " + ", ".join(parts)


def _heatmap_of(entry: dict) -> str | None:
    # Stores of schema 2 did not name the map output: theirs was called "heatmap".
    if "heatmap" in entry:
        return entry["heatmap"]
    return "heatmap" if "heatmap" in (entry.get("outputs") or {}) else None


def heatmap_methods(root) -> list[str]:
    """Methods of a store with a map to draw (their store entry names it)."""
    return [m for m, e in (root.attrs.get("methods") or {}).items() if _heatmap_of(e)]


def heat_path(root, method: str) -> str:
    """The array holding ``method``'s map ``[N, T, H, W]``."""
    return f"{method}/{_heatmap_of((root.attrs.get('methods') or {})[method])}"


def item_panel(root, i: int, methods, names, cmap="jet", alpha=0.5, style="blend", tile: int = 160) -> np.ndarray:
    """The image and one overlay per method and target, titled with the predictions."""
    img = np.asarray(root["inputs"][i])
    tiles, labels = [im.upscale(img, tile)], ["input"]
    for m in methods:
        heat = np.asarray(root[heat_path(root, m)][i])
        targets = np.asarray(root[f"{m}/targets"][i]) if f"{m}/targets" in root else np.zeros(len(heat), int)
        for t in range(heat.shape[0]):
            c = int(targets[t])
            if c < 0:  # a masked slot: a multi-label item with fewer positive labels than slots
                continue
            ov = im.overlay(img, heat[t], cmap=cmap, alpha=alpha, style=style)
            tiles.append(im.upscale(ov, tile))
            labels.append(f"{m}: {name_of(c, names)}")
    size = max(t.shape[0] for t in tiles)
    tiles = [t if t.shape[0] == size else im.upscale(t, size)[:size, :size] for t in tiles]
    return im.titled(im.grid(tiles, len(tiles), labels), prediction_title(root, i, names))


def _done_items(root) -> np.ndarray:
    if "status" in root:
        return np.flatnonzero(np.asarray(root["status"][:]) == schema.DONE)
    return np.arange(root["ids"].shape[0])


def is_training(root) -> bool:
    """Whether the store was written during training (method outputs have an epoch axis)."""
    return "training" in root.attrs and "epoch" in root


def render_overlays(root, out: Path, cmap, alpha, style, limit) -> list[Path]:
    methods = heatmap_methods(root)
    if not methods or "inputs" not in root or is_training(root):
        return []
    names = class_names_of(root)
    files = []
    items = _done_items(root)[:limit]
    for i in items:
        files.append(im.save_png(item_panel(root, i, methods, names, cmap, alpha, style), out / "overlays" / f"{i}.png"))
    for m in methods:
        tiles = [im.overlay(np.asarray(root["inputs"][i]), np.asarray(root[heat_path(root, m)][i, 0]), cmap=cmap,
                            alpha=alpha, style=style) for i in items[:64]]
        if tiles:
            tiles = [im.upscale(t, 96) for t in tiles]
            sheet = im.titled(im.grid(tiles, 8, [str(i) for i in items[:64]]), f"{m}: first {len(tiles)} items")
            files.append(im.save_png(sheet, out / "overlays" / f"{m}_contact.png"))
    return files


def render_activations(root, out: Path, per_row: int, items: int = 2) -> list[Path]:
    if "activations" not in root:
        return []
    files = []
    ids = root["ids"][:]
    for layer in sorted(root["activations"].array_keys()):
        a = root[f"activations/{layer}"]
        if a.ndim != 4:
            continue
        for i in range(min(items, a.shape[0])):
            act = np.asarray(a[i])
            c = act.shape[-1]
            tiles = [im.upscale(im.standardise(act[..., k]), 32) for k in range(c)]
            page = per_row * per_row
            pages = -(-c // page)
            for p in range(pages):
                sl = slice(p * page, (p + 1) * page)
                g = im.grid(tiles[sl], per_row, [str(k) for k in range(c)][sl])
                title = f"{layer} {list(act.shape)} — item {Path(str(ids[i])).name}" + (
                    f" — channels {sl.start}-{min(c, sl.stop) - 1} (page {p + 1}/{pages})" if pages > 1 else "")
                name = f"item{i}" + (f"_p{p + 1}" if pages > 1 else "") + ".png"
                files.append(im.save_png(im.titled(g, title), out / "activations" / layer / name))
    return files


def render_weights(root, out: Path) -> list[Path]:
    if "weights" not in root:
        return []
    files = []
    for layer in sorted(root["weights"].group_keys()):
        f = np.asarray(root[f"weights/{layer}/filters"][:])
        dims = root[f"weights/{layer}/filters"].metadata.dimension_names
        if dims and dims[-1] == "rgb":
            tiles = [im.upscale((t * 255).astype(np.uint8), 32) for t in f]
            pages = [(0, len(tiles), im.grid(tiles, 16, [str(k) for k in range(len(tiles))]))]
        else:  # [filter, c_in, kh, kw]: one row of input-channel tiles per filter, 16 filters a page
            cin = min(f.shape[1], 32)
            pages = []
            for s in range(0, len(f), 16):
                rows = [im.upscale((f[k, c] * 255).astype(np.uint8), 12) for k in range(s, min(len(f), s + 16))
                        for c in range(cin)]
                pages.append((s, min(len(f), s + 16), im.grid(rows, cin)))
        for s, e, g in pages:
            title = f"{layer} kernels, filters {s}-{e - 1}" + ("" if dims and dims[-1] == "rgb"
                                                             else f" (rows; first {min(f.shape[1], 32)} input channels)")
            name = f"{layer}.png" if len(pages) == 1 else f"{layer}_p{s // 16 + 1}.png"
            files.append(im.save_png(im.titled(g, title), out / "weights" / name))
    return files


def render_atlas(root, out: Path, per_row: int = 8) -> list[Path]:
    if "atlas" not in root:
        return []
    files, contact = [], []
    a = root.attrs.get("atlas") or {}
    for layer in a.get("layers", sorted(root["atlas"].group_keys())):
        g = root[f"atlas/{layer}"]
        pats = np.asarray(g["patterns"][:])
        idx = np.asarray(g["filters"][:])
        done = np.asarray(g["status"][:]) == schema.DONE
        tiles = [p if ok else np.full_like(p, 230) for p, ok in zip(pats, done)]
        labels = [str(int(k)) if ok else f"{int(k)} (todo)" for k, ok in zip(idx, done)]
        page = per_row * per_row
        n_pages = -(-len(tiles) // page)
        for p in range(n_pages):
            sl = slice(p * page, (p + 1) * page)
            title = (f"{layer} — {a.get('recipe')} recipe, {a.get('size')} px, {a.get('steps')} steps — "
                     f"page {p + 1}/{n_pages}")
            files.append(im.save_png(im.titled(im.grid(tiles[sl], per_row, labels[sl]), title),
                                     out / "atlas" / f"{layer}_p{p + 1}.png"))
        contact.append(im.titled(im.grid([im.upscale(t, 64) for t in tiles[:8]], 8, labels[:8]), layer))
    if contact:
        files.append(im.save_png(im.vstack(contact), out / "atlas" / "contact.png"))
    return files


def render_audit(root, out: Path, cmap: str, alpha: float, style: str) -> list[Path]:
    a = root.attrs.get("audit")
    if not a:
        return []
    files = []
    cls_names = root.attrs.get("class_names")
    for m, e in a["methods"].items():
        g = f"audit/{m}"
        means = np.asarray(root[f"{g}/class_mean"][:])
        tiles, labels = [], []
        for c, mean in enumerate(means):
            if np.isnan(mean).all():
                continue
            tiles.append(im.upscale(im.colour(im.normalise(mean), cmap), 128))
            labels.append(name_of(c, cls_names))
        if tiles:
            files.append(im.save_png(im.titled(im.grid(tiles, min(8, len(tiles)), labels),
                                               f"{m}: mean map per class"), out / "audit" / f"{m}_class_means.png"))
        sus = e["summary"].get("most_suspicious", [])[:8]
        if sus and "inputs" in root:
            tiles = [im.upscale(im.overlay(np.asarray(root["inputs"][s["index"]]),
                                           np.asarray(root[heat_path(root, m)][s["index"], 0]), cmap=cmap, alpha=alpha,
                                           style=style), 128) for s in sus]
            labels = [f"{Path(s['id']).name} ({s['suspicion']:.2f})" for s in sus]
            files.append(im.save_png(im.titled(im.grid(tiles, min(4, len(tiles)), labels),
                                               f"{m}: most suspicious items"), out / "audit" / f"{m}_suspicious.png"))
    q = a.get("quality")
    if q and q.get("scores"):
        files.append(_intervals_png(q, out / "audit" / "quality_intervals.png"))
        qc = {m: {s: np.nanmean(np.asarray(root[f"audit/{s}/metrics/{m}_curve"][:]), axis=0) for s in q["scores"]
                  if f"audit/{s}/metrics/{m}_curve" in root}
              for m in q["metrics"]}
        qc = {m: v for m, v in qc.items() if v}
        if qc:
            files.append(_quality_curves_png(qc, q, out / "audit" / "quality_curves.png"))
    return files


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _intervals_png(q: dict, path: Path) -> Path:
    """Each metric's mean and 95% interval per method and control; uninformative metrics greyed."""
    plt = _plt()
    names, sources = q["metrics"], list(q["scores"])
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.35 * len(sources) * rows + 1.2 * rows), dpi=80,
                             squeeze=False)
    for ax, m in zip(axes.ravel(), names):
        info = q["informative"][m]["informative"]
        for k, src in enumerate(sources):
            v = q["scores"][src].get(m)
            if not v or not np.isfinite(v["mean"]):
                continue
            colour = "tab:gray" if src.startswith("control_") else ("tab:blue" if info else "silver")
            ax.errorbar(v["mean"], k, xerr=[[v["mean"] - v["ci"][0]], [v["ci"][1] - v["mean"]]], fmt="o",
                        color=colour, capsize=3)
        ax.set_yticks(range(len(sources)), sources, fontsize=7)
        better = "higher" if q["higher_is_better"][m] else "lower"
        ax.set_title(f"{m} ({better} is better)" + ("" if info else "\nuninformative here"), fontsize=8,
                     color="black" if info else "gray")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    return _save(plt, fig, path)


def _quality_curves_png(curves: dict, q: dict, path: Path) -> Path:
    """Mean curves of the catalogue metrics that have one, per method and control."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), dpi=80, squeeze=False)
    for ax, (m, per) in zip(axes[0], curves.items()):
        for src, c in per.items():
            ax.plot(np.arange(len(c)), c, label=src, linestyle="--" if src.startswith("control_") else "-")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def render_pipeline(root, out: Path) -> list[Path]:
    if "pipeline" not in root:
        return []
    p = root["pipeline"]
    ids = (root.attrs.get("pipeline") or {}).get("ids", [])
    rows = []
    for k in range(p["resized"].shape[0]):
        raw = np.asarray(p[f"raw/{k}"][:]) if f"raw/{k}" in p else None
        resized = np.asarray(p["resized"][k])
        pre = np.asarray(p["preprocessed"][k], np.float64)
        lo, hi = pre.min(axis=(0, 1)), pre.max(axis=(0, 1))
        pre_img = (np.clip((pre - lo) / np.where(hi > lo, hi - lo, 1), 0, 1) * 255).astype(np.uint8)[..., :3]
        parts = [im.titled(im.upscale(raw, 128), f"read {raw.shape[1]}x{raw.shape[0]}")] if raw is not None else []
        parts += [im.titled(im.upscale(resized, 128), f"resized {resized.shape[1]}x{resized.shape[0]}"),
                  im.titled(im.upscale(pre_img, 128), f"model input {pre.min():.1f}..{pre.max():.1f}")]
        rows.append(im.titled(im.hstack(parts), str(ids[k]) if k < len(ids) else str(k)))
    return [im.save_png(im.vstack(rows), out / "pipeline.png")] if rows else []


def _epoch_label(root, k: int, epoch: int) -> str:
    if "metrics/loss" in root:
        loss = float(root["metrics/loss"][k])
        if np.isfinite(loss):
            return f"epoch {epoch} (loss {loss:.3f})"
    return f"epoch {epoch}"


def render_training(root, out: Path, cmap: str, alpha: float, style: str, limit: int) -> list[Path]:
    if not is_training(root) or "inputs" not in root:
        return []
    from PIL import Image
    epochs = [int(e) for e in root["epoch"][:]]
    names = class_names_of(root)
    inputs = np.asarray(root["inputs"][:limit])
    ids = [Path(str(i)).name for i in root["ids"][:limit]]
    labels = np.asarray(root["labels"][:limit]) if "labels" in root else np.full(len(inputs), -1)
    files = []
    for m in heatmap_methods(root):
        heat = np.asarray(root[heat_path(root, m)][:, :limit, 0])  # [E, N, H, W]: the first target
        targets = np.asarray(root[f"{m}/targets"][:, :limit, 0]) if f"{m}/targets" in root else None
        tiles = [[im.upscale(im.overlay(inputs[i], heat[k, i], cmap=cmap, alpha=alpha, style=style), 112)
                  for i in range(len(inputs))] for k in range(len(epochs))]
        for i in range(len(inputs)):
            lab = int(labels[i])
            what = f" (label {name_of(lab, names)})" if lab >= 0 else ""
            tags = []
            for k, e in enumerate(epochs):
                t = "" if targets is None else int(targets[k, i])
                tags.append(f"epoch {e}" + ("" if t == "" else f": {name_of(t, names)}"))
            strip = im.titled(im.grid([im.upscale(inputs[i], 112)] + [tiles[k][i] for k in range(len(epochs))],
                                      len(epochs) + 1, ["input", *tags]), f"{m} — {ids[i]}{what}")
            files.append(im.save_png(strip, out / "training" / m / f"item{i}.png"))
        frames = [im.titled(im.grid(tiles[k], min(8, len(inputs)), ids), f"{m} — {_epoch_label(root, k, e)}")
                  for k, e in enumerate(epochs)]
        gif = out / "training" / f"{m}.gif"
        gif.parent.mkdir(parents=True, exist_ok=True)
        pil = [Image.fromarray(f) for f in frames]
        pil[0].save(gif, save_all=True, append_images=pil[1:], duration=700, loop=0)
        files.append(gif)
    metrics = sorted(root["metrics"].array_keys()) if "metrics" in root else []
    if metrics:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
        for name in metrics:
            ax.plot(epochs, np.asarray(root[f"metrics/{name}"][:]), marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / "training" / "metrics.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    return files


RENDER_MARKER = ".convlens-render"


def render_store(path, out_dir, opts: RenderOptions | None = None, **kw) -> dict[str, list[Path]]:
    """Draws everything the store at ``path`` holds into ``out_dir`` (a new or empty folder,
    or one an earlier render made); returns the files by group. ``opts``: `RenderOptions`
    (or its fields as keywords)."""
    from convlens.config import build
    from convlens.render.video import render_videos
    o = opts if opts is not None else build(RenderOptions, kw)
    cmap, alpha, style, limit, per_row = o.cmap, o.alpha, o.style, o.limit, o.per_row
    from convlens.engine.verify import require_sound
    root = store.open_store(path)
    require_sound(store.open_store(path, consolidated=False), path)
    out = Path(out_dir)
    claim_folder(out, RENDER_MARKER, "render --out")
    groups = {"overlays": render_overlays(root, out, cmap, alpha, style, limit),
              "activations": render_activations(root, out, per_row),
              "weights": render_weights(root, out),
              "atlas": render_atlas(root, out),
              "audit": render_audit(root, out, cmap, alpha, style),
              "pipeline": render_pipeline(root, out),
              "training": render_training(root, out, cmap, alpha, style, limit),
              "video": render_videos(root, out, fmt=o.video, cmap=cmap, alpha=alpha, style=style)}
    return {k: v for k, v in groups.items() if v}
