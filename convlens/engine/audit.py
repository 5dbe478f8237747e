"""Audits: what a classifier looks at across a finished store, and how far to trust each
method's maps there.

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
* quality metrics of the registry (`convlens.kernels.metrics.registry`; ``basic`` unless
  told otherwise: deletion and insertion curves, average drop, increase in confidence and
  the model-parameter randomisation test) for each method and two controls, with
  bootstrap intervals, verdicts and a ranking (`convlens.engine.quality`);
* flags, each with the numbers behind it, from the rules of `FLAG_RULES` (see there);
  every class flag says how many of the class's items it rests on (only items with a
  non-empty map count) and is marked ``weak`` when that is under half of them; and a
  ``suspicion`` score per item ranking the items that best show the problems.

Results go into the store (``audit/<method>/...`` and the root attribute ``audit``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from convlens.config import Config, option
from convlens.engine import schema, store
from convlens.errors import ConvlensError


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
      empty: share of empty or constant maps (of all, or of a class) that raises the empty_maps flag.
      degenerate: share of empty or constant maps (of all, or of a class) that flags the method as degenerate.
      sanity_threshold: the model-parameter randomisation score (rank correlation with every
        layer random) at or above which a method is flagged: its maps do not depend on
        what the model learned.
      quality: quality metrics (`convlens metrics`): names, families (faithfulness,
        robustness, localisation, complexity, randomisation, axiomatic), presets (basic,
        default), all, or none; comma-separated.
      quality_options: options of those metrics, "name.option=value,..." (e.g. deletion.steps=16).
      quality_items: items the quality metrics use (the first done items).
      controls: score a random map and a Sobel-edge map too (the null the verdicts and
        the ranking compare with).
      batch: images per compiled call of the metrics.
      seed: PRNG seed of the metrics' draws (item i: fold_in(key(seed), i)).
      progress: report each step.
    """

    grid: int = option(4, min=1, max=64)
    center: float = option(0.5, above=0, max=1)
    min_items: int = option(8, min=1)
    consistency: float = option(0.6, above=0, max=1)
    border: float = option(0.9, above=0, max=1)
    object_share: float = option(1.0, above=0)
    off_object_items: float = option(0.25, above=0, max=1)
    empty: float = option(0.1, above=0, max=1)
    degenerate: float = option(0.5, above=0, max=1)
    sanity_threshold: float = option(0.8, min=-1, max=1)
    quality: str = "basic"
    quality_options: str = ""
    quality_items: int = option(32, min=2)
    controls: bool = True
    batch: int = option(8, min=1, max=4096)
    seed: int = option(0, min=0, max=2**63 - 1)
    progress: bool = True

    _owner = "audit"

    def __post_init__(self):
        from convlens.kernels.metrics.registry import expand, parse_options
        expand(self.quality)
        parse_options(self.quality_options)
        super().__post_init__()

    @property
    def metrics(self) -> list[str]:
        from convlens.kernels.metrics.registry import expand
        return expand(self.quality)


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


def class_means(mass: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full((n_classes, *mass.shape[1:]), np.nan, np.float32)
    for c in range(n_classes):
        sel = classes == c
        if sel.any():
            out[c] = mass[sel].mean(axis=0)
    return out


# ---------------------------------------------------------------- flag rules

@dataclasses.dataclass
class Evidence:
    """What the flag rules read for one method: per-map statistics (`item_statistics`),
    each map's class, the store's record of the method, its quality scores, and the
    suspicion per map the rules add to."""

    method: str
    entry: dict
    stats: dict
    classes: np.ndarray
    class_names: list | None
    cfg: AuditConfig
    quality: dict
    suspicion: np.ndarray


@dataclasses.dataclass(frozen=True)
class FlagRule:
    """A flag: its kind, when it is raised (in words, with the `AuditConfig` fields that
    set it) and the check ``Evidence -> [flag, ...]`` (each flag a dict with ``kind`` and
    ``why``, the numbers behind it)."""

    kind: str
    when: str
    check: Callable[[Evidence], list[dict]]


def _name(c, class_names) -> str:
    return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(int(c))


def _classes(ev: Evidence):
    """``(class, its non-empty maps, name, basis, note)`` for each class large enough to flag."""
    for c in np.unique(ev.classes):
        idx = np.flatnonzero((ev.classes == c) & ~ev.stats["empty"])
        if len(idx) < ev.cfg.min_items:
            continue
        total = int((ev.classes == c).sum())
        # A flag rests on the class's maps that say something: say how many of how many.
        basis = {"class_items": total, "weak": len(idx) < 0.5 * total}
        rests = "" if len(idx) == total else \
            f" (only {len(idx)} of its {total} items have a non-empty map: the flag rests on those)"
        yield int(c), idx, _name(c, ev.class_names), basis, rests


def _class_location(ev: Evidence) -> list[dict]:
    flags = []
    cfg, st, g = ev.cfg, ev.stats, ev.cfg.grid
    centre = central_cells(cfg)
    for c, idx, name, basis, rests in _classes(ev):
        cells, counts = np.unique(st["peak_cell"][idx], return_counts=True)
        k = cells[np.argmax(counts)]
        share = counts.max() / len(idx)
        if share < cfg.consistency or k in centre:
            continue
        rc = (int(k // g), int(k % g))
        mass = float(st["grid_mass"][idx, rc[0], rc[1]].mean())
        flags.append({"kind": "class_location", "class": c, "class_name": name, "cell": list(rc),
                      "where": where(rc, g), "items": int(len(idx)), **basis, "share_of_items": float(share),
                      "mean_mass_in_cell": mass, "uniform_mass": 1.0 / (g * g),
                      "why": f"{share:.0%} of the {len(idx)} items of class {name!r} peak in the {where(rc, g)}; "
                             f"that cell holds {mass:.0%} of their map mass on average (uniform: {1 / g / g:.0%})"
                             + rests})
        hit = idx[st["peak_cell"][idx] == k]
        ev.suspicion[hit] += 1.0 + st["grid_mass"][hit, rc[0], rc[1]]
    return flags


def _class_border(ev: Evidence) -> list[dict]:
    flags = []
    cfg = ev.cfg
    border = 1.0 - ev.stats["center_share"]
    for c, idx, name, basis, rests in _classes(ev):
        over = border[idx] > cfg.border
        if over.mean() < cfg.consistency:
            continue
        flags.append({"kind": "class_border", "class": c, "class_name": name, "items": int(len(idx)),
                      **basis, "share_of_items": float(over.mean()), "mean_border_share": float(border[idx].mean()),
                      "why": f"{over.mean():.0%} of the {len(idx)} items of class {name!r} keep over "
                             f"{cfg.border:.0%} of their map mass outside the central box "
                             f"(mean {border[idx].mean():.0%}; a uniform map: {1 - cfg.center ** 2:.0%})" + rests})
        ev.suspicion[idx[over]] += border[idx[over]]
    return flags


def _off_object(ev: Evidence) -> list[dict]:
    if "object_share" not in ev.stats:
        return []
    # Less mass on the object than a uniform map would put there: the map misses it.
    share, area, cfg = ev.stats["object_share"], ev.stats["object_area"], ev.cfg
    off = np.flatnonzero(np.nan_to_num(share, nan=np.inf) < area * cfg.object_share)
    rated = max(1, int(np.isfinite(share).sum()))
    ev.suspicion[off] += 1.0 - share[off] / np.maximum(area[off], 1e-6) * cfg.object_share
    if len(off) / rated < cfg.off_object_items:
        return []
    return [{"kind": "off_object", "items": int(len(off)), "share_of_items": float(len(off) / rated),
             "mean_object_share": float(np.nanmean(share)), "mean_object_area": float(area.mean()),
             "why": f"{len(off) / rated:.0%} of the items ({len(off)}) put less of their map mass on the object "
                    f"than a uniform map would (mean {np.nanmean(share):.0%} on objects covering "
                    f"{area.mean():.0%} of the image)"}]


def _empty_counts(ev: Evidence):
    empty = ev.stats["empty"]
    per_class = [(int(c), _name(c, ev.class_names), int(empty[ev.classes == c].sum()), int((ev.classes == c).sum()))
                 for c in np.unique(ev.classes)]
    return empty, per_class


def _empty_maps(ev: Evidence) -> list[dict]:
    empty, per_class = _empty_counts(ev)
    n = len(empty)
    if n == 0:
        return []
    share = empty.sum() / n
    if not (share >= ev.cfg.empty or any(e / t >= ev.cfg.empty and t >= ev.cfg.min_items
                                         for _, _, e, t in per_class)):
        return []
    counts = "; ".join(f"{name!r}: {e} of {t}" for _, name, e, t in per_class if e)
    return [{"kind": "empty_maps", "maps": n, "empty": int(empty.sum()), "share": float(share),
             "by_class": {name: [e, t] for _, name, e, t in per_class},
             "why": f"{int(empty.sum())} of {n} {ev.method} maps ({share:.0%}) are empty or constant: they say "
                    f"nothing about where the evidence is (by class: {counts})"}]


def advice(method: str, entry: dict) -> tuple[list[str], str]:
    """What to run instead of a method whose maps are empty, and why, from what the store
    records of it (its `convlens.kernels.spec.Advice` and its layer's head)."""
    tip = entry.get("when_empty")
    if not tip:
        return [], f"check {method}'s options (see `convlens methods`) and that the model's scores vary with the input"
    layer = (entry.get("config") or {}).get("layer")
    head = f"the model's head flattens {layer!r} position by position, and " \
        if entry.get("pools_gradient") and entry.get("head") == "flatten" else ""
    run = " or ".join(f"-m {m}" for m in tip["instead"])
    return list(tip["instead"]), f"{head}{method} {tip['why']}: run {run}"


def _degenerate(ev: Evidence) -> list[dict]:
    empty, per_class = _empty_counts(ev)
    if len(empty) == 0:
        return []
    share = empty.sum() / len(empty)
    bad = [(name, e, t) for _, name, e, t in per_class if t >= ev.cfg.min_items and e / t >= ev.cfg.degenerate]
    if share < ev.cfg.degenerate and not bad:
        return []
    instead, because = advice(ev.method, ev.entry)
    where_ = f"{share:.0%} of all maps" if share >= ev.cfg.degenerate else \
        ", ".join(f"{e} of the {t} maps of class {name!r}" for name, e, t in bad)
    return [{"kind": "degenerate", "method": ev.method, "share": float(share), "instead": instead,
             "why": f"{ev.method} says nothing for {where_} (empty or constant); {because}"}]


def _sanity(ev: Evidence) -> list[dict]:
    q = ev.quality.get("mprt")
    if not q or not np.isfinite(q["mean"]) or q["mean"] < ev.cfg.sanity_threshold:
        return []
    return [{"kind": "sanity", "rank_correlation": q["mean"], "ci": q["ci"],
             "why": f"with every layer randomised, {ev.method}'s maps keep a rank correlation of {q['mean']:.2f} "
                    f"(95% interval {q['ci'][0]:.2f}..{q['ci'][1]:.2f}, {q['items']} items) with the trained "
                    f"model's (threshold {ev.cfg.sanity_threshold}): they do not depend on what the model learned"}]


FLAG_RULES: tuple[FlagRule, ...] = (
    FlagRule("empty_maps", "at least `empty` of the maps (of all, or of a class of `min_items` or more) are empty or "
             "constant: they say nothing about where the evidence is", _empty_maps),
    FlagRule("degenerate", "at least `degenerate` are, with what to run instead (the method's own advice)",
             _degenerate),
    FlagRule("class_location", "at least `consistency` of a class's items (`min_items` or more) peak in the same "
             "off-centre cell of a `grid` x `grid` partition: a watermark, a corner tag, a fixed background",
             _class_location),
    FlagRule("class_border", "at least `consistency` of a class's items keep over `border` of their mass outside "
             "the central box (`center` of each side)", _class_border),
    FlagRule("off_object", "at least `off_object_items` of the items put less mass on their object than "
             "`object_share` times a uniform map would (stores with masks)", _off_object),
    FlagRule("sanity", "the model-parameter randomisation score (rank correlation of the maps with every layer "
             "random, mprt) is at least `sanity_threshold`: the maps do not depend on what the model learned",
             _sanity),
)


def find_flags(ev: Evidence) -> list[dict]:
    """Every rule of `FLAG_RULES` on the evidence, in order."""
    return [f for rule in FLAG_RULES for f in rule.check(ev)]


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
                            "model= and params= to audit(), or skip the quality metrics (--quality none)")
    from convlens.models.registry import load_model
    args = dict(args)
    if args.get("input_shape"):
        args["input_shape"] = tuple(args["input_shape"])
    name = args.pop("name_or_path")
    return load_model(name, **args)


# ---------------------------------------------------------------- the audit

def audit(path, cfg: AuditConfig = AuditConfig(), *, model=None, params=None, methods=None, progress=print,
          storage_options=None) -> dict:
    """Audits the store at ``path``; writes ``audit/...`` into it and returns the findings
    ``{method: {"flags", "summary", "quality", "seconds"}}`` (the quality summary, with the
    controls and the ranking, is the root attribute ``audit["quality"]``)."""
    store.open_store(path, "r", storage_options)  # a clear error for a missing or foreign store first
    with store.StoreLock(path, storage_options, command="convlens audit"):
        return Audit(path, cfg, model, params, methods, progress if cfg.progress else None,
                     storage_options).run()


class Audit:
    """One audit of a store (see `audit`)."""

    def __init__(self, path, cfg, model, params, methods, progress, storage_options):
        from convlens.engine.verify import require_sound
        self.path, self.cfg, self.progress = path, cfg, progress or (lambda msg: None)
        self.model, self.params = model, params
        self.root = root = store.open_store(path, "r+", storage_options)
        self.storage_options = storage_options
        require_sound(root, path)
        attrs = dict(root.attrs)
        self.entries = attrs.get("methods") or {}
        names = [m for m in self.entries if heatmap_of(self.entries[m])]
        if methods:
            missing = set(methods) - set(names)
            if missing:
                raise ConvlensError(f"no heatmaps of {', '.join(sorted(missing))} in {path}; it has: "
                                    f"{', '.join(names)}")
            names = [m for m in names if m in methods]
        if not names:
            raise ConvlensError(f"{path} holds no method with a heatmap to audit (methods: "
                                f"{', '.join(self.entries) or 'none'})")
        self.names = names
        self.status = np.asarray(root["status"][:]) if "status" in root else np.ones(root["ids"].shape[0], np.uint8)
        self.valid = np.flatnonzero(self.status == schema.DONE)
        if len(self.valid) == 0:
            raise ConvlensError(f"{path} has no finished items to audit")
        self.labels = np.asarray(root["labels"][:]) if "labels" in root else np.full(len(self.status), -1)
        self.pred = np.asarray(root["predictions/topk_index"][:, 0])
        self.classes = np.where(self.labels >= 0, self.labels, self.pred)
        self.class_names = attrs.get("class_names") or attrs.get("model_class_names")
        self.masks = np.asarray(root["masks"][:]) if "masks" in root else None
        # A multi-label model's every explained label is a sample of its own class; otherwise
        # each item's first target is, its class the label (or the prediction).
        self.per_label = attrs.get("head") == "multilabel" or str(attrs.get("target", "")).startswith("positive")

    def run(self) -> dict:
        root, cfg = self.root, self.cfg
        if "audit" in root:
            del root["audit"]
        quality = self.quality() if cfg.metrics else None
        findings = {m: self.method(m, (quality or {}).get("scores", {}).get(m, {})) for m in self.names}
        root.attrs["audit"] = store.jsonable({"config": dataclasses.asdict(cfg), "methods": findings,
                                              **({"quality": quality} if quality else {})})
        store.finish(self.path, self.storage_options)
        return findings

    def method(self, method: str, quality: dict) -> dict:
        """Statistics and flags of one method's maps (written under ``audit/<method>/``)."""
        t0 = time.perf_counter()
        root, entry = self.root, self.entries[method]
        s = Samples.read(root, method, heatmap_of(entry), self.valid, self.classes, self.per_label)
        stats = item_statistics(s.heat, self.cfg, None if self.masks is None else self.masks[s.items])
        ev = Evidence(method, entry, stats, s.classes, self.class_names, self.cfg, quality, np.zeros(len(s.items)))
        flags = find_flags(ev)
        n = len(self.status)
        g = f"audit/{method}"
        first = s.slots == 0  # per-item arrays: each item's first explained target

        def put(name, values, fill=np.nan):
            full = np.full((n, *values.shape[1:]), fill, dtype=values.dtype if values.dtype != bool else bool)
            full[s.items[first]] = values[first]
            store.write(root, f"{g}/{name}", full)
        for name in ("grid_mass", "center_share", "peak", "entropy", "concentration"):
            put(name, stats[name])
        item_suspicion = np.zeros(n)
        np.add.at(item_suspicion, s.items, ev.suspicion)
        valid = self.valid
        store.write(root, f"{g}/suspicion", np.where(np.isin(np.arange(n), valid), item_suspicion,
                                                     np.nan).astype(np.float32))
        if "object_share" in stats:
            put("object_share", stats["object_share"])
            put("pointing_hit", stats["pointing_hit"].astype(bool), False)
        summary = _summary(root, g, stats, s, self.labels, self.pred, self.class_names, self.per_label)
        if self.per_label:  # items the model gave no positive label: nothing of theirs to audit
            summary["items_without_positive"] = int(len(valid) - summary["items"])
        order = np.argsort(-item_suspicion[valid], kind="stable")
        ids = root["ids"][:]
        summary["most_suspicious"] = [{"id": str(ids[valid[i]]), "index": int(valid[i]),
                                       "suspicion": float(item_suspicion[valid[i]])}
                                      for i in order[:10] if item_suspicion[valid[i]] > 0]
        self.progress(f"audited {method}: {len(flags)} flag(s)" +
                      "".join(f"\n  {f['kind']}: {f['why']}" for f in flags if f["kind"] in ("degenerate",)))
        return {"flags": flags, "summary": summary, "quality": quality, "seconds": time.perf_counter() - t0}

    def quality(self) -> dict:
        """The quality metrics (`convlens.engine.quality`) of every audited method and the controls."""
        from convlens.engine.quality import run_quality
        from convlens.kernels.registry import METHODS, resolve
        root = self.root
        if "inputs" not in root:
            return {"skipped": "the store has no inputs (run without --no-keep-inputs)"}
        mp = model_from_store(root, self.model, self.params)
        methods, rated = {}, None
        for method in self.names:
            entry = self.entries[method]
            heat = np.asarray(root[f"{method}/{heatmap_of(entry)}"][:, 0])
            targets = np.asarray(root[f"{method}/targets"][:, 0])
            spec, mcfg = METHODS.get(method), None
            if spec is not None:
                fields = {f.name for f in dataclasses.fields(spec.config)}
                opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (entry.get("config") or {}).items()
                        if k in fields and not isinstance(v, dict)}
                mcfg = resolve(mp[0], method, opts)
            methods[method] = (heat, targets, spec, mcfg)
            # Each item's first explained target (a multi-label item without a positive label has none).
            ok = self.valid[targets[self.valid] >= 0]
            rated = ok if rated is None else np.intersect1d(rated, ok)
        self.progress(f"quality metrics ({', '.join(self.cfg.metrics)}) on {min(len(rated), self.cfg.quality_items)} "
                      "items" + (", with a random and a Sobel-edge control" if self.cfg.controls else ""))
        return run_quality(root, mp, methods, rated, self.cfg, self.masks, int(root["ids"].shape[0]), self.progress)


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
