"""Audits: what a classifier looks at across a finished store, and how faithful each
method's maps are.

For every method with a ``heatmap`` output, over the items whose status is done (each
item's first target; for a multi-label model every explained label, as a sample of that
label's class):

* per item: the map's positive part as a distribution of mass; its share in each cell of
  a ``grid x grid`` partition (``grid_mass``), in the central box (``center_share``, the
  box covering ``center`` of each side), the peak (``peak``, y and x in [0, 1]), the
  normalised entropy and the mass in the top 10% of pixels (``concentration``); with
  object masks, the mass inside the object (``object_share``, energy-based pointing
  game) and whether the peak is inside (``pointing_hit``);
* per class (the label where known, else the prediction): the mean map (``class_mean``),
  and for labelled data the means over correct and misclassified items;
* flags, each with the numbers behind it:
  - ``class_location``: at least ``consistency`` of a class's items (and ``min_items``)
    peak in the same off-centre cell — the classic shortcut (a watermark, a corner mark);
  - ``class_border``: at least ``consistency`` of a class's items keep over ``border``
    of their mass outside the central box (background, frame);
  - ``off_object``: at least ``off_object_items`` of the items put less mass on the
    object than ``object_share`` times a uniform map would (stores with masks);
  - ``empty_maps``: at least ``empty`` of the maps (of all, or of a class) are empty or
    constant, with the counts per class; ``degenerate``: at least ``degenerate`` are, with
    the method to run instead where the store's record of the layer's head tells (a
    Flatten head cancels Grad-CAM's averaged gradients: HiRes-CAM, Layer-CAM);
  every class flag says how many of the class's items it rests on (only items with a
  non-empty map count) and is marked ``weak`` when that is under half of them;
  and a ``suspicion`` score per item ranking the items that best show the problems;
* faithfulness (`convlens.kernels.metrics`), on the first ``sample`` items, where the
  model can be loaded: deletion / insertion curves and areas, average drop, increase in
  confidence;
* the model-randomisation sanity check (Adebayo et al. 2018) on ``sanity_items`` items:
  the model's layers are randomised top-down in stages, the method rerun, and the rank
  correlation with the original maps recorded; a method whose maps stay correlated
  (``>= sanity_threshold``) with every layer random does not depend on the model and is
  flagged.

Results go into the store (``audit/<method>/...`` and the root attribute ``audit``).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from convlens.config import Config, option
from convlens.engine import store
from convlens.errors import ConvlensError, OptionError


@dataclasses.dataclass(frozen=True)
class AuditConfig(Config):
    """Thresholds and sizes of an audit (see the module docstring).

    Attributes:
      grid: cells per side of the location grid.
      center: the central box's share of each side.
      min_items: the smallest class that can be flagged.
      consistency: share of a class's items that must agree for a class flag.
      border: share of map mass outside the central box that counts as "on the border".
      object_share: an item is off its object when its map puts less than this times a
        uniform map's mass on it.
      off_object_items: share of items off their object that raises the off_object flag.
      metrics: deletion/insertion curves, average drop and increase in confidence (needs the model).
      sample: items the faithfulness metrics use.
      steps: slices of the deletion/insertion curves.
      replacement: removed pixels: blur or a pixel value.
      sanity: the model-randomisation sanity check (needs the model).
      sanity_items: items the sanity check uses.
      sanity_threshold: rank correlation with every layer random above which a method is flagged.
      empty: share of empty or constant maps (of all, or of a class) that raises the empty_maps flag.
      degenerate: share of empty or constant maps (of all, or of a class) that flags the method as degenerate.
      batch: images per compiled call of the metrics.
      quality: metrics of the catalogue (the README's quality table), by name or family
        (faithfulness, robustness, localisation, complexity, randomisation, axiomatic),
        comma-separated; "default" or "all"; with a random and a Sobel-edge control map.
      quality_options: options of those metrics, "name.option=value,..." (e.g. road_morf.noise=0).
      quality_items: items the catalogue metrics use (the first done items).
    """

    grid: int = option(4, min=1, max=64)
    center: float = option(0.5, above=0, max=1)
    min_items: int = option(8, min=1)
    consistency: float = option(0.6, above=0, max=1)
    border: float = option(0.9, above=0, max=1)
    object_share: float = option(1.0, above=0)
    off_object_items: float = option(0.25, above=0, max=1)
    metrics: bool = True
    sample: int = option(32, min=1)
    steps: int = option(32, min=1, max=4096)
    replacement: float | str = option("blur", min=0, max=255, choices=("blur",))
    sanity: bool = True
    sanity_items: int = option(4, min=1)
    sanity_threshold: float = option(0.8, min=-1, max=1)
    empty: float = option(0.1, above=0, max=1)
    degenerate: float = option(0.5, above=0, max=1)
    batch: int = option(8, min=1)
    quality: str = ""
    quality_options: str = ""
    quality_items: int = option(64, min=2)

    _owner = "audit"

    def __post_init__(self):
        if isinstance(self.replacement, str) and self.replacement != "blur":
            try:
                object.__setattr__(self, "replacement", float(self.replacement))
            except ValueError:
                raise OptionError(f"audit: replacement {self.replacement!r} is not blur or a pixel value") from None
        from convlens.engine.quality import parse_options, parse_quality
        parse_quality(self.quality)
        parse_options(self.quality_options)
        super().__post_init__()


def where(cell, grid: int) -> str:
    """A cell of a ``grid x grid`` partition in words: ``top-right corner`` ..."""
    r, c = cell
    v = "top" if r < grid / 2 - 0.5 else ("bottom" if r > grid / 2 - 0.5 else "middle")
    h = "left" if c < grid / 2 - 0.5 else ("right" if c > grid / 2 - 0.5 else "centre")
    corner = (r in (0, grid - 1)) and (c in (0, grid - 1))
    return f"{v}-{h}" + (" corner" if corner else "") + f" (row {r}, column {c} of {grid}x{grid})"


# ---------------------------------------------------------------- statistics (numpy)

def mass_maps(heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive part of maps ``[N, H, W]`` as distributions; second: which maps are empty
    (nothing positive) or constant (the same everywhere: no location either)."""
    h = np.nan_to_num(heat.astype(np.float64))
    p = np.maximum(h, 0.0)
    total = p.sum(axis=(1, 2), keepdims=True)
    hi, lo = h.max(axis=(1, 2)), h.min(axis=(1, 2))
    constant = hi - lo <= 1e-6 * np.maximum(np.abs(hi), np.abs(lo))
    empty = (total[:, 0, 0] <= 0) | constant
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), 1.0 / (heat.shape[1] * heat.shape[2])), empty


def peak_pixels(heat: np.ndarray) -> np.ndarray:
    """Flat index of each map's peak ``[N]``: the maximum's pixel, or where the maximum
    is a plateau (LIME's superpixels, occlusion windows) the plateau pixel nearest its
    centroid — a plain argmax would take the plateau's first pixel in raster order and
    so lean every flat peak towards the top-left corner."""
    n, h, w = heat.shape
    hv = np.nan_to_num(heat.reshape(n, -1).astype(np.float64), nan=-np.inf)
    top = hv.max(axis=1, keepdims=True)
    plateau = hv >= top - 1e-6 * np.maximum(np.abs(top), 1e-30)
    yy, xx = np.divmod(np.arange(h * w), w)
    count = np.maximum(plateau.sum(axis=1), 1)
    cy, cx = (plateau * yy).sum(axis=1) / count, (plateau * xx).sum(axis=1) / count
    d = (yy[None] - cy[:, None]) ** 2 + (xx[None] - cx[:, None]) ** 2
    return np.argmin(np.where(plateau, d, np.inf), axis=1)


def item_statistics(heat: np.ndarray, cfg: AuditConfig, masks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-item statistics of maps ``[N, H, W]`` (see the module docstring)."""
    n, h, w = heat.shape
    m, empty = mass_maps(heat)
    g = cfg.grid
    ys = np.minimum((np.arange(h) * g) // h, g - 1)
    xs = np.minimum((np.arange(w) * g) // w, g - 1)
    cell_y = np.eye(g)[ys]  # [H, g]
    cell_x = np.eye(g)[xs]
    grid_mass = np.einsum("nhw,hi,wj->nij", m, cell_y, cell_x)
    y0, y1 = int(round(h * (1 - cfg.center) / 2)), int(round(h * (1 + cfg.center) / 2))
    x0, x1 = int(round(w * (1 - cfg.center) / 2)), int(round(w * (1 + cfg.center) / 2))
    center = m[:, y0:y1, x0:x1].sum(axis=(1, 2))
    flat = m.reshape(n, -1)
    peak_idx = peak_pixels(heat)
    py, px = np.divmod(peak_idx, w)
    entropy = -np.sum(np.where(flat > 0, flat * np.log(np.where(flat > 0, flat, 1.0)), 0.0), axis=1) / np.log(h * w)
    k = max(1, int(round(0.1 * h * w)))
    concentration = np.sort(flat, axis=1)[:, -k:].sum(axis=1)
    # An empty map (nothing positive) has no peak and no location: it counts nowhere.
    nan = np.where(empty, np.nan, 1.0)
    out = {"grid_mass": (grid_mass * nan[:, None, None]).astype(np.float32),
           "center_share": (center * nan).astype(np.float32),
           "peak": (np.stack([(py + 0.5) / h, (px + 0.5) / w], 1) * nan[:, None]).astype(np.float32),
           "peak_cell": np.where(empty, -1, ys[py] * g + xs[px]).astype(np.int32),
           "entropy": (entropy * nan).astype(np.float32), "concentration": (concentration * nan).astype(np.float32),
           "empty": empty}
    if masks is not None:
        mk = masks.astype(bool)
        has = mk.reshape(n, -1).any(axis=1) & ~empty
        out["object_share"] = np.where(has, (m * mk).sum(axis=(1, 2)), np.nan).astype(np.float32)
        out["object_area"] = mk.mean(axis=(1, 2)).astype(np.float32)
        out["pointing_hit"] = np.where(has, mk.reshape(n, -1)[np.arange(n), peak_idx], False)
    return out


def central_cells(cfg: AuditConfig) -> set[int]:
    """Cells lying mostly inside the central box."""
    g = cfg.grid
    lo, hi = (1 - cfg.center) / 2, (1 + cfg.center) / 2
    inside = [i for i in range(g) if lo <= (i + 0.5) / g <= hi]
    return {r * g + c for r in inside for c in inside}


def find_flags(stats, classes: np.ndarray, class_names, cfg: AuditConfig) -> tuple[list[dict], np.ndarray]:
    """Shortcut flags and a suspicion score per item."""
    flags = []
    n = len(classes)
    g = cfg.grid
    suspicion = np.zeros(n)
    centre = central_cells(cfg)
    border = 1.0 - stats["center_share"]
    for c in np.unique(classes):
        idx = np.flatnonzero((classes == c) & ~stats["empty"])
        if len(idx) < cfg.min_items:
            continue
        name = _name(c, class_names)
        total = int((classes == c).sum())
        # A flag rests on the class's maps that say something: say how many of how many.
        basis = {"class_items": total, "weak": len(idx) < 0.5 * total}
        rests = "" if len(idx) == total else \
            f" (only {len(idx)} of its {total} items have a non-empty map: the flag rests on those)"
        cells, counts = np.unique(stats["peak_cell"][idx], return_counts=True)
        k = cells[np.argmax(counts)]
        share = counts.max() / len(idx)
        if share >= cfg.consistency and k not in centre:
            rc = (int(k // g), int(k % g))
            mass = float(stats["grid_mass"][idx, rc[0], rc[1]].mean())
            flags.append({"kind": "class_location", "class": int(c), "class_name": name, "cell": list(rc),
                          "where": where(rc, g), "items": int(len(idx)), **basis, "share_of_items": float(share),
                          "mean_mass_in_cell": mass, "uniform_mass": 1.0 / (g * g),
                          "why": f"{share:.0%} of the {len(idx)} items of class {name!r} peak in the {where(rc, g)}; "
                                 f"that cell holds {mass:.0%} of their map mass on average (uniform: {1 / g / g:.0%})"
                                 + rests})
            hit = idx[stats["peak_cell"][idx] == k]
            suspicion[hit] += 1.0 + stats["grid_mass"][hit, rc[0], rc[1]]
        over = border[idx] > cfg.border
        if over.mean() >= cfg.consistency:
            flags.append({"kind": "class_border", "class": int(c), "class_name": name, "items": int(len(idx)),
                          **basis, "share_of_items": float(over.mean()), "mean_border_share": float(border[idx].mean()),
                          "why": f"{over.mean():.0%} of the {len(idx)} items of class {name!r} keep over "
                                 f"{cfg.border:.0%} of their map mass outside the central box "
                                 f"(mean {border[idx].mean():.0%}; a uniform map: {1 - cfg.center ** 2:.0%})" + rests})
            suspicion[idx[over]] += border[idx[over]]
    if "object_share" in stats:
        # Less mass on the object than a uniform map would put there: the map misses it.
        share, area = stats["object_share"], stats["object_area"]
        off = np.flatnonzero(np.nan_to_num(share, nan=np.inf) < area * cfg.object_share)
        rated = max(1, int(np.isfinite(share).sum()))
        if len(off) / rated >= cfg.off_object_items:
            flags.append({"kind": "off_object", "items": int(len(off)), "share_of_items": float(len(off) / rated),
                          "mean_object_share": float(np.nanmean(share)), "mean_object_area": float(area.mean()),
                          "why": f"{len(off) / rated:.0%} of the items ({len(off)}) put less of their map mass on "
                                 f"the object than a uniform map would (mean {np.nanmean(share):.0%} on objects "
                                 f"covering {area.mean():.0%} of the image)"})
        suspicion[off] += 1.0 - share[off] / np.maximum(area[off], 1e-6) * cfg.object_share
    return flags, suspicion


def class_means(mass: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full((n_classes, *mass.shape[1:]), np.nan, np.float32)
    for c in range(n_classes):
        sel = classes == c
        if sel.any():
            out[c] = mass[sel].mean(axis=0)
    return out


# ---------------------------------------------------------------- the model again

def heatmap_of(entry: dict) -> str | None:
    """The output a store's method entry names as its map (stores of schema 2 did not
    name it: their maps were called ``heatmap``)."""
    if "heatmap" in entry:
        return entry["heatmap"]
    return "heatmap" if "heatmap" in (entry.get("outputs") or {}) else None


def model_from_store(root, model=None, params=None):
    """The store's model and params: given, or loaded as the run loaded them."""
    if model is not None:
        return model, params
    args = root.attrs.get("model_load_args")
    if not args:
        raise ConvlensError("this store does not say how to load its model (it was built in Python): pass "
                            "model= and params= to audit(), or skip the metrics (--no-metrics --no-sanity)")
    from convlens.models.registry import load_model
    args = dict(args)
    if args.get("input_shape"):
        args["input_shape"] = tuple(args["input_shape"])
    name = args.pop("name_or_path")
    return load_model(name, **args)


def sanity_check(model, params, explain_fn, stages: int = 4, seed: int = 1234):
    """Model-randomisation test (Adebayo et al. 2018).

    Args:
      explain_fn: ``params -> maps [B, H, W]`` (the method on fixed images and targets).
      stages: how many cascading randomisations, top layer first, ending with all.

    Returns:
      ``(layers randomised per stage, rank correlation [stages, B] with the original maps)``.
    """
    import jax.numpy as jnp

    from convlens.kernels.metrics import spearman
    from convlens.kernels.metrics.catalogue import layers_with_weights
    from convlens.kernels.metrics.catalogue import stages as cut

    ref = np.asarray(explain_fn(params))
    layers = layers_with_weights(model, params)
    counts = np.cumsum([len(g) for g in cut(layers, stages)]).tolist()  # layers random after each stage
    fresh = model.init(seed)
    rho, done = [], []
    for c in counts:
        p = {k: dict(v) for k, v in params.items()}
        for name in layers[:c]:
            p[name] = fresh[name]
        maps = np.asarray(explain_fn(p))
        rho.append(np.asarray(spearman(jnp.asarray(ref), jnp.asarray(maps))))
        done.append(layers[c - 1])
    return counts, done, np.stack(rho)


# ---------------------------------------------------------------- the audit

def audit(path, cfg: AuditConfig = AuditConfig(), *, model=None, params=None, methods=None, progress=print,
          storage_options=None) -> dict:
    """Audits the store at ``path``; writes ``audit/...`` into it and returns the findings
    ``{method: {"flags", "summary", "faithfulness", "sanity"}}``."""
    store.open_store(path, "r", storage_options)  # a clear error for a missing or foreign store first
    with store.StoreLock(path, storage_options, command="convlens audit"):
        return _audit(path, cfg, model, params, methods, progress, storage_options)


def _audit(path, cfg, model, params, methods, progress, storage_options) -> dict:
    from convlens.engine.verify import require_sound
    root = store.open_store(path, "r+", storage_options)
    require_sound(root, path)
    attrs = dict(root.attrs)
    entries = attrs.get("methods") or {}
    names = [m for m in entries if heatmap_of(entries[m])]
    if methods:
        missing = set(methods) - set(names)
        if missing:
            raise ConvlensError(f"no heatmaps of {', '.join(sorted(missing))} in {path}; it has: {', '.join(names)}")
        names = [m for m in names if m in methods]
    if not names:
        raise ConvlensError(f"{path} holds no method with a heatmap to audit (methods: {', '.join(entries) or 'none'})")
    status = np.asarray(root["status"][:]) if "status" in root else np.ones(root["ids"].shape[0], np.uint8)
    valid = np.flatnonzero(status == store.DONE)
    if len(valid) == 0:
        raise ConvlensError(f"{path} has no finished items to audit")
    labels = np.asarray(root["labels"][:]) if "labels" in root else np.full(len(status), -1)
    pred = np.asarray(root["predictions/topk_index"][:, 0])
    classes = np.where(labels >= 0, labels, pred)
    class_names = attrs.get("class_names") or attrs.get("model_class_names")
    masks = np.asarray(root["masks"][:]) if "masks" in root else None
    # A multi-label model's every explained label is a sample of its own class; otherwise
    # each item's first target is, its class the label (or the prediction).
    per_label = attrs.get("head") == "multilabel" or str(attrs.get("target", "")).startswith("positive")
    if "audit" in root:
        del root["audit"]
    findings = {}
    mp = None
    for method in names:
        t0 = time.perf_counter()
        entry_attrs = entries[method]
        s = Samples.read(root, method, heatmap_of(entry_attrs), valid, classes, per_label)
        stats = item_statistics(s.heat, cfg, None if masks is None else masks[s.items])
        flags, suspicion = find_flags(stats, s.classes, class_names, cfg)
        flags = empty_flags(stats, s.classes, class_names, method, entry_attrs, cfg) + flags
        n = len(status)
        g = f"audit/{method}"
        first = s.slots == 0  # per-item arrays: each item's first explained target

        def put(name, values, fill=np.nan):
            full = np.full((n, *values.shape[1:]), fill, dtype=values.dtype if values.dtype != bool else bool)
            full[s.items[first]] = values[first]
            store.write(root, f"{g}/{name}", full)
        for name in ("grid_mass", "center_share", "peak", "entropy", "concentration"):
            put(name, stats[name])
        item_suspicion = np.zeros(n)
        np.add.at(item_suspicion, s.items, suspicion)
        store.write(root, f"{g}/suspicion", np.where(np.isin(np.arange(n), valid), item_suspicion,
                                                     np.nan).astype(np.float32))
        if "object_share" in stats:
            put("object_share", stats["object_share"])
            put("pointing_hit", stats["pointing_hit"].astype(bool), False)
        summary = _summary(root, g, stats, s, labels, pred, class_names, per_label)
        if per_label:  # items the model gave no positive label: nothing of theirs to audit
            summary["items_without_positive"] = int(len(valid) - summary["items"])
        order = np.argsort(-item_suspicion[valid], kind="stable")
        ids = root["ids"][:]
        summary["most_suspicious"] = [{"id": str(ids[valid[i]]), "index": int(valid[i]),
                                       "suspicion": float(item_suspicion[valid[i]])}
                                      for i in order[:10] if item_suspicion[valid[i]] > 0]
        entry = {"flags": flags, "summary": summary}
        needs_model = cfg.metrics or cfg.sanity
        if needs_model and "inputs" not in root:
            entry["faithfulness"] = entry["sanity"] = {"skipped": "the store has no inputs (run without "
                                                                  "--no-keep-inputs)"}
        elif needs_model:
            if mp is None:
                mp = model_from_store(root, model, params)
            # The metrics read each item's first explained target (a multi-label item
            # without a positive label has none).
            heat0 = np.asarray(root[f"{method}/{heatmap_of(entry_attrs)}"][:, 0])
            targets0 = np.asarray(root[f"{method}/targets"][:, 0])
            rated = valid[targets0[valid] >= 0]
            if cfg.metrics:
                entry["faithfulness"] = _faithfulness(root, mp, method, heat0, targets0, rated, cfg, g, n)
            if cfg.sanity:
                entry["sanity"] = _sanity(root, mp, method, entry_attrs, targets0, rated, cfg)
                if entry["sanity"].get("flagged"):
                    flags.append({"kind": "sanity", "why": entry["sanity"]["why"]})
        entry["seconds"] = time.perf_counter() - t0
        findings[method] = entry
        if progress:
            progress(f"audited {method}: {len(flags)} flag(s)" +
                     "".join(f"\n  {f['kind']}: {f['why']}" for f in flags if f["kind"] in ("degenerate",)))
    quality = None
    if cfg.quality:
        quality = _quality(root, mp, model, params, names, entries, valid, cfg, masks, progress)
    root.attrs["audit"] = store.jsonable({"config": dataclasses.asdict(cfg), "methods": findings,
                                          **({"quality": quality} if quality else {})})
    store.finish(path, storage_options)
    return findings


@dataclasses.dataclass(frozen=True)
class Samples:
    """The maps an audit reads: ``heat [S, H, W]`` of item ``items [S]``, target slot
    ``slots [S]``, counted for class ``classes [S]``."""

    heat: np.ndarray
    items: np.ndarray
    slots: np.ndarray
    classes: np.ndarray

    @classmethod
    def read(cls, root, method: str, heatmap: str, valid, classes, per_label: bool) -> "Samples":
        arr = root[f"{method}/{heatmap}"]
        if not per_label:
            return cls(np.asarray(arr[:, 0])[valid], valid, np.zeros(len(valid), int), classes[valid])
        targets = np.asarray(root[f"{method}/targets"][:])
        heat, items, slots = [], [], []
        for t in range(targets.shape[1]):  # one slot at a time: memory follows the samples, not N x T
            rows = valid[targets[valid, t] >= 0]
            if len(rows):
                heat.append(np.asarray(arr.get_orthogonal_selection((rows, t))))
                items.append(rows)
                slots.append(np.full(len(rows), t))
        if not heat:
            raise ConvlensError(f"{method}: no item of the store has a positive label to audit")
        items, slots = np.concatenate(items), np.concatenate(slots)
        return cls(np.concatenate(heat), items, slots, targets[items, slots])


def _summary(root, g, stats, s: Samples, labels, pred, class_names, per_label) -> dict:
    """The method's summary numbers; writes the per-class mean maps."""
    mass, _ = mass_maps(s.heat)
    n_classes = int(max(s.classes.max() + 1, len(class_names or [])))
    store.write(root, f"{g}/class_mean", class_means(mass, s.classes, n_classes))
    empty = stats["empty"]
    summary = {"items": int(len(np.unique(s.items))), "maps": int(len(s.items)),
               "mean_center_share": float(np.nanmean(stats["center_share"])) if (~empty).any() else float("nan"),
               "mean_entropy": float(np.nanmean(stats["entropy"])) if (~empty).any() else float("nan"),
               "empty_maps": int(empty.sum()), "empty_share": float(empty.mean()),
               "empty_by_class": {str(int(c)): [int(empty[s.classes == c].sum()), int((s.classes == c).sum())]
                                  for c in np.unique(s.classes)}}
    if not per_label and (labels[s.items] >= 0).any():
        correct = labels[s.items] == pred[s.items]
        store.write(root, f"{g}/class_mean_correct", class_means(mass[correct], s.classes[correct], n_classes))
        store.write(root, f"{g}/class_mean_wrong", class_means(mass[~correct], s.classes[~correct], n_classes))
        summary["accuracy"] = float(correct.mean())
    if "object_share" in stats:
        summary["mean_object_share"] = float(np.nanmean(stats["object_share"]))
        summary["pointing_game"] = float(stats["pointing_hit"][~empty].mean()) if (~empty).any() else float("nan")
    return summary


def empty_flags(stats, classes, class_names, method: str, entry: dict, cfg: AuditConfig) -> list[dict]:
    """``empty_maps`` when at least ``cfg.empty`` of the maps (overall or of a class) are
    empty or constant, and ``degenerate`` with what to run instead when at least
    ``cfg.degenerate`` are."""
    empty = stats["empty"]
    n = len(empty)
    if n == 0:
        return []
    per_class = []
    for c in np.unique(classes):
        sel = classes == c
        per_class.append((int(c), _name(c, class_names), int(empty[sel].sum()), int(sel.sum())))
    counts = "; ".join(f"{name!r}: {e} of {t}" for _, name, e, t in per_class if e)
    share = empty.sum() / n
    flags = []
    if share >= cfg.empty or any(e / t >= cfg.empty and t >= cfg.min_items for _, _, e, t in per_class):
        flags.append({"kind": "empty_maps", "maps": n, "empty": int(empty.sum()), "share": float(share),
                      "by_class": {name: [e, t] for _, name, e, t in per_class},
                      "why": f"{int(empty.sum())} of {n} {method} maps ({share:.0%}) are empty or constant: they "
                             f"say nothing about where the evidence is (by class: {counts})"})
    bad = [(name, e, t) for _, name, e, t in per_class if t >= cfg.min_items and e / t >= cfg.degenerate]
    if share >= cfg.degenerate or bad:
        instead, because = suggestion(method, entry)
        where = f"{share:.0%} of all maps" if share >= cfg.degenerate else \
            ", ".join(f"{e} of the {t} maps of class {name!r}" for name, e, t in bad)
        flags.append({"kind": "degenerate", "method": method, "share": float(share), "instead": instead,
                      "why": f"{method} says nothing for {where} (empty or constant); {because}"})
    return flags


def suggestion(method: str, entry: dict) -> tuple[list[str], str]:
    """What to run instead of a method whose maps are empty, and why, from what the store
    records about its layer's head (`convlens.kernels.common.head_kind`)."""
    layer = (entry.get("config") or {}).get("layer")
    if entry.get("pools_gradient") and entry.get("head") == "flatten":
        return ["hirescam", "layercam"], (
            f"the model's head flattens {layer!r} position by position, so {method}'s gradients averaged over "
            "positions cancel; HiRes-CAM (exact on such heads) and Layer-CAM weigh each position by its own "
            "gradient: run -m hirescam or -m layercam")
    if entry.get("pools_gradient"):
        return ["hirescam", "layercam"], (
            f"{method} weighs channels by gradients averaged over positions, which can cancel; HiRes-CAM and "
            "Layer-CAM weigh each position by its own gradient: run -m hirescam or -m layercam")
    if entry.get("family") == "cam":
        return ["gradient_x_input", "occlusion"], (
            f"{method}'s maps keep only evidence for the class (ReLU) and there is none at {layer!r}: try a layer "
            "nearer the input (--layer), or a signed method (-m gradient_x_input, -m occlusion)")
    return [], f"check {method}'s options (see `convlens methods`) and that the model's scores vary with the input"


def _name(c, class_names) -> str:
    return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(int(c))


def _quality(root, mp, model, params, names, entries, valid, cfg, masks, progress):
    """The catalogue metrics (`convlens.engine.quality`) of every audited method."""
    import dataclasses as dc

    from convlens.api import resolve
    from convlens.engine.quality import run_quality
    from convlens.kernels.registry import METHODS
    if "inputs" not in root:
        return {"skipped": "the store has no inputs (run without --no-keep-inputs)"}
    mp = mp or model_from_store(root, model, params)
    methods = {}
    rated = None
    for method in names:
        heat = np.asarray(root[f"{method}/{heatmap_of(entries[method])}"][:, 0])
        targets = np.asarray(root[f"{method}/targets"][:, 0])
        spec, mcfg = METHODS.get(method), None
        if spec is not None:
            fields = {f.name for f in dc.fields(spec.config)}
            opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in entries[method].get("config", {}).items()
                    if k in fields and not isinstance(v, dict)}
            mcfg = resolve(mp[0], method, opts)
        methods[method] = (heat, targets, spec, mcfg)
        ok = valid[targets[valid] >= 0]
        rated = ok if rated is None else np.intersect1d(rated, ok)
    return run_quality(root, mp, methods, rated, cfg, masks, int(root["ids"].shape[0]), progress)


def _faithfulness(root, mp, method, heat, targets, valid, cfg, g, n):
    from convlens.engine.executor import Batch, Executor, Fn
    from convlens.kernels import metrics

    model, params = mp
    fcfg = metrics.FaithfulnessConfig(steps=cfg.steps, replacement=cfg.replacement)
    comp = {"faithfulness": Fn(lambda p, i, k: metrics.faithfulness(model, p, i["images"], i["maps"], i["targets"],
                                                                    fcfg),
                               (model.computation, fcfg, "faithfulness"), ("images", "maps", "targets"),
                               "faithfulness")}
    idx = valid[:cfg.sample]
    res = {k: [] for k in ("deletion", "insertion", "deletion_auc", "insertion_auc", "drop", "increase")}
    t0 = time.perf_counter()

    def groups(ex):
        for s in range(0, len(idx), ex.batch):
            part = idx[s:s + ex.batch]
            inputs = {"images": root["inputs"].get_orthogonal_selection((part,)).astype(np.float32),
                      "maps": heat[part][:, None], "targets": targets[part][:, None].astype(np.int32)}
            yield s, [Batch(inputs, part)]

    with Executor(params, batch=min(cfg.batch, max(len(idx), 1))) as ex:
        for _, results in ex.stream(comp, groups(ex)):
            out = results[0]["faithfulness"]
            for k in res:
                res[k].append(np.asarray(out[k])[:, 0])
    secs = time.perf_counter() - t0
    res = {k: np.concatenate(v) for k, v in res.items()}
    for k in ("deletion", "insertion", "deletion_auc", "insertion_auc", "drop", "increase"):
        full = np.full((n, *res[k].shape[1:]), np.nan, np.float32)
        full[idx] = res[k]
        store.write(root, f"{g}/{k}", full)
    return {"items": int(len(idx)), "deletion_auc": float(res["deletion_auc"].mean()),
            "insertion_auc": float(res["insertion_auc"].mean()), "average_drop": float(res["drop"].mean()),
            "increase_in_confidence": float(res["increase"].mean()), "steps": cfg.steps,
            "replacement": cfg.replacement, "seconds_per_item": secs / max(1, len(idx))}


def _sanity(root, mp, method, entry, targets, valid, cfg):
    from convlens.api import resolve
    from convlens.engine.executor import Batch, Executor, Explain
    from convlens.kernels.registry import METHODS

    if method not in METHODS:
        return {"skipped": f"{method} is not a registered method"}
    model, params = mp
    idx = valid[:cfg.sanity_items]
    x = root["inputs"].get_orthogonal_selection((idx,)).astype(np.float32)
    spec = METHODS[method]
    names = {f.name for f in dataclasses.fields(spec.config)}
    opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.get("config", {}).items()
            if k in names and not isinstance(v, dict)}
    comp = {method: Explain(model, method, resolve(model, method, opts), None)}
    batch = Batch({"images": x, "targets": targets[idx][:, None].astype(np.int32)}, np.arange(len(idx)))
    heat_name = spec.heatmap

    with Executor(params, batch=len(idx), tune=False) as ex:
        def explain(p):
            return ex.run(comp, batch, params=p)[method][heat_name][:, 0]
        counts, last, rho = sanity_check(model, params, explain)
    final = float(np.mean(rho[-1]))
    out = {"items": int(len(idx)), "layers_randomised": counts, "down_to": last,
           "rank_correlation": [float(r) for r in rho.mean(axis=1)], "flagged": final >= cfg.sanity_threshold}
    out["why"] = (f"with every layer randomised, {method}'s maps keep a rank correlation of {final:.2f} with the "
                  f"trained model's (threshold {cfg.sanity_threshold}): they do not depend on what the model learned"
                  if out["flagged"] else f"maps change as layers are randomised (rank correlation {final:.2f} "
                                         "with all layers random)")
    return out
