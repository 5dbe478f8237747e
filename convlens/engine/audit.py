"""Audits: what a classifier looks at across a finished store, and how faithful each
method's maps are.

For every method with a ``heatmap`` output (its first target), over the items whose
status is done:

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
      batch: images per compiled call of the metrics.
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
    batch: int = option(8, min=1)

    _owner = "audit"

    def __post_init__(self):
        if isinstance(self.replacement, str) and self.replacement != "blur":
            try:
                object.__setattr__(self, "replacement", float(self.replacement))
            except ValueError:
                raise OptionError(f"audit: replacement {self.replacement!r} is not blur or a pixel value") from None
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
    """Positive part of maps ``[N, H, W]`` as distributions; second: which maps are empty."""
    p = np.maximum(np.nan_to_num(heat.astype(np.float64)), 0.0)
    total = p.sum(axis=(1, 2), keepdims=True)
    empty = total[:, 0, 0] <= 0
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
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(int(c))
        cells, counts = np.unique(stats["peak_cell"][idx], return_counts=True)
        k = cells[np.argmax(counts)]
        share = counts.max() / len(idx)
        if share >= cfg.consistency and k not in centre:
            rc = (int(k // g), int(k % g))
            mass = float(stats["grid_mass"][idx, rc[0], rc[1]].mean())
            flags.append({"kind": "class_location", "class": int(c), "class_name": name, "cell": list(rc),
                          "where": where(rc, g), "items": int(len(idx)), "share_of_items": float(share),
                          "mean_mass_in_cell": mass, "uniform_mass": 1.0 / (g * g),
                          "why": f"{share:.0%} of the {len(idx)} items of class {name!r} peak in the {where(rc, g)}; "
                                 f"that cell holds {mass:.0%} of their map mass on average (uniform: {1 / g / g:.0%})"})
            hit = idx[stats["peak_cell"][idx] == k]
            suspicion[hit] += 1.0 + stats["grid_mass"][hit, rc[0], rc[1]]
        over = border[idx] > cfg.border
        if over.mean() >= cfg.consistency:
            flags.append({"kind": "class_border", "class": int(c), "class_name": name, "items": int(len(idx)),
                          "share_of_items": float(over.mean()), "mean_border_share": float(border[idx].mean()),
                          "why": f"{over.mean():.0%} of the {len(idx)} items of class {name!r} keep over "
                                 f"{cfg.border:.0%} of their map mass outside the central box "
                                 f"(mean {border[idx].mean():.0%}; a uniform map: {1 - cfg.center ** 2:.0%})"})
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

    ref = np.asarray(explain_fn(params))
    layers = [n for n in reversed(model.layer_names) if n in params and params[n]]
    counts = sorted({max(1, round(len(layers) * (k + 1) / stages)) for k in range(stages)} | {1})
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
    class_names = attrs.get("class_names")
    masks = np.asarray(root["masks"][:]) if "masks" in root else None
    if "audit" in root:
        del root["audit"]
    findings = {}
    mp = None
    for method in names:
        t0 = time.perf_counter()
        heat = np.asarray(root[f"{method}/{heatmap_of(entries[method])}"][:, 0])  # first target
        targets = np.asarray(root[f"{method}/targets"][:, 0])
        stats = item_statistics(heat[valid], cfg, None if masks is None else masks[valid])
        flags, suspicion = find_flags(stats, classes[valid], class_names, cfg)
        n = len(status)
        g = f"audit/{method}"

        def put(name, values, fill=np.nan):
            full = np.full((n, *values.shape[1:]), fill, dtype=values.dtype if values.dtype != bool else bool)
            full[valid] = values
            store.write(root, f"{g}/{name}", full)
        put("grid_mass", stats["grid_mass"])
        put("center_share", stats["center_share"])
        put("peak", stats["peak"])
        put("entropy", stats["entropy"])
        put("concentration", stats["concentration"])
        put("suspicion", suspicion.astype(np.float32))
        if "object_share" in stats:
            put("object_share", stats["object_share"])
            put("pointing_hit", stats["pointing_hit"].astype(bool), False)
        mass, _ = mass_maps(heat[valid])
        n_classes = int(max(classes.max() + 1, len(class_names or [])))
        store.write(root, f"{g}/class_mean", class_means(mass, classes[valid], n_classes))
        summary = {"items": int(len(valid)), "mean_center_share": float(np.nanmean(stats["center_share"])),
                   "mean_entropy": float(np.nanmean(stats["entropy"])), "empty_maps": int(stats["empty"].sum())}
        if (labels[valid] >= 0).any():
            correct = labels[valid] == pred[valid]
            store.write(root, f"{g}/class_mean_correct",
                        class_means(mass[correct], classes[valid][correct], n_classes))
            store.write(root, f"{g}/class_mean_wrong",
                        class_means(mass[~correct], classes[valid][~correct], n_classes))
            summary["accuracy"] = float(correct.mean())
        if "object_share" in stats:
            summary["mean_object_share"] = float(np.nanmean(stats["object_share"]))
            summary["pointing_game"] = float(stats["pointing_hit"][~stats["empty"]].mean()) \
                if (~stats["empty"]).any() else float("nan")
        order = np.argsort(-suspicion, kind="stable")
        ids = root["ids"][:]
        summary["most_suspicious"] = [{"id": str(ids[valid[i]]), "index": int(valid[i]),
                                       "suspicion": float(suspicion[i])} for i in order[:10] if suspicion[i] > 0]
        entry = {"flags": flags, "summary": summary}
        needs_model = cfg.metrics or cfg.sanity
        if needs_model and "inputs" not in root:
            entry["faithfulness"] = entry["sanity"] = {"skipped": "the store has no inputs (run without "
                                                                  "--no-keep-inputs)"}
        elif needs_model:
            if mp is None:
                mp = model_from_store(root, model, params)
            if cfg.metrics:
                entry["faithfulness"] = _faithfulness(root, mp, method, heat, targets, valid, cfg, g, n)
            if cfg.sanity:
                entry["sanity"] = _sanity(root, mp, method, entries[method], targets, valid, cfg)
                if entry["sanity"].get("flagged"):
                    flags.append({"kind": "sanity", "why": entry["sanity"]["why"]})
        entry["seconds"] = time.perf_counter() - t0
        findings[method] = entry
        if progress:
            progress(f"audited {method}: {len(flags)} flag(s)")
    root.attrs["audit"] = store.jsonable({"config": dataclasses.asdict(cfg), "methods": findings})
    store.finish(path, storage_options)
    return findings


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
