"""Quality metrics over batches and over a store.

`evaluate` computes metrics of the registry (`convlens.kernels.metrics.registry`) on
arrays through the executor: one compiled program per batch holds every metric asked
for, item ``i`` draws from ``fold_in(fold_in(key(seed), i), metric)`` (the same numbers at
any batch size), and metrics whose score depends on the set (sufficiency) run once over
all items. `run_quality` does that for each audited method of a store and for the two
controls (`convlens.kernels.controls`), then gives each score a bootstrap interval, a
verdict per metric (does any method beat the random map?) and a ranking over the
informative metrics only.

Per-item scores go to ``audit/<source>/metrics/<name>`` (``[sample]``) and curves to
``.../<name>_curve`` (``[sample, step]``); the summary to the root attribute
``audit["quality"]``.
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from convlens.engine import store
from convlens.errors import ConvlensError

CONTROLS = ("control_random", "control_sobel")
FRESH_SEED = 1234  # one random initialisation shared by every method and control


def layers_with_weights(model, params) -> list[str]:
    """The layers the randomisation tests replace: those with variables, output first."""
    return [n for n in reversed(model.layer_names) if n in params and params[n]]


def superpixels(images: np.ndarray) -> np.ndarray:
    """SLIC superpixels of each image ``[N, H, W, C]`` (scikit-image's defaults, labels
    from 0, as Quantus's IROF), ``[N, H, W]`` int32, labels made consecutive."""
    from skimage.segmentation import slic
    out = np.zeros(images.shape[:3], np.int32)
    for i, img in enumerate(images):
        seg = slic(img.astype(np.float64) / max(float(img.max()), 1e-12), start_label=0,
                   channel_axis=-1 if img.shape[-1] > 1 else None)
        out[i] = np.unique(seg, return_inverse=True)[1].reshape(seg.shape)
    return out


def metric_salt(name: str) -> int:
    """A metric's own salt for its draws (stable across versions and metric lists)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class Plan:
    """What one source's metrics need on a batch: the registry's specs and configs, the
    method whose maps they rate (a `MethodSpec` and config, re-run where a metric needs
    it), and the model's static facts.

    Args:
      model: a convlens `Model` (or None for metrics of maps alone).
      names: metric names; cfgs: their configs (`MetricSpec.resolve`).
      method, method_cfg: the method (controls included), or None for given maps only.
      maps_given: the maps come with the batch (``inputs["maps"]``) rather than from the
        method run here.
    """

    def __init__(self, model, names, cfgs, method=None, method_cfg=None, *, maps_given=True, n_segments=0,
                 num_classes=0, layers=(), every_output=False):
        from convlens.kernels.metrics.registry import METRICS
        self.model, self.names, self.cfgs = model, tuple(names), tuple(cfgs[n] for n in names)
        self.every_output = every_output  # every array a metric returns, as "name:output"
        self.method, self.method_cfg, self.maps_given = method, method_cfg, maps_given
        self.n_segments, self.num_classes, self.layers = int(n_segments), int(num_classes), tuple(layers)
        self.specs = tuple(METRICS[n] for n in self.names)
        self.needs = set().union(*(s.needs for s in self.specs)) if self.specs else set()
        if not maps_given:
            self.needs |= {"explain"}
        self.weights = bool({"fresh", "layers"} & self.needs)

    def key(self) -> tuple:
        comp = None if self.model is None else self.model.computation
        return ("quality", comp, getattr(self.method, "name", None), self.method_cfg, self.names, self.cfgs,
                self.maps_given, self.n_segments, self.num_classes, self.layers, self.every_output)

    def inputs(self, masks: bool, segments: bool) -> tuple[str, ...]:
        need = ["images", "targets"] if self.model is not None else []
        if self.maps_given:
            need.append("maps")
        if masks:
            need.append("masks")
        if segments:
            need.append("segments")
        return tuple(need)

    def __call__(self, variables, inputs, keys) -> dict:
        """Every metric on one batch: ``{name: score [B], name_curve: [B, S]}``."""
        import jax

        from convlens.kernels.metrics.registry import batch_inputs
        params, fresh, replay = variables["model"], variables.get("fresh"), variables.get("replay") or {}
        ins = batch_inputs(self.needs, model=self.model, params=params, method=self.method,
                           method_cfg=self.method_cfg, x=inputs.get("images"), y=inputs.get("targets"),
                           a=inputs.get("maps"), masks=inputs.get("masks"), segments=inputs.get("segments"),
                           n_segments=self.n_segments, num_classes=self.num_classes, fresh=fresh,
                           layers=self.layers, keys=keys)
        if not self.maps_given:
            ins["a"] = ins["explain"](ins["x"], ins["y"])
        out = {}
        for name, spec, cfg in zip(self.names, self.specs, self.cfgs):
            salt = metric_salt(name)
            res = spec.run(ins, cfg, jax.vmap(lambda k, s=salt: jax.random.fold_in(k, s))(keys),
                           {k: v for k, v in replay.items() if k in spec.replay})
            if self.every_output:
                out.update({f"{name}:{k}": v for k, v in res.items()})
                continue
            out[name] = res["score"].astype("float32")
            if "curve" in res:
                out[f"{name}_curve"] = res["curve"].astype("float32")
        return out


def evaluate(model, params, plan: Plan, inputs: dict[str, np.ndarray], *, key=0, batch: int | None = None,
             xla=None, replay: dict | None = None) -> dict[str, np.ndarray]:
    """``plan``'s metrics over arrays of ``N`` items (``images``, ``targets``, ``maps``,
    ``masks``, ``segments`` as the plan needs), ``batch`` items per compiled call (per-item
    metrics) or all at once (metrics of the set, and ``replay``: arrays replacing the
    draws, for the whole set); ``{name: [N], name_curve: [N, S]}``."""
    from convlens.engine.executor import Executor, Fn
    n = len(next(iter(inputs.values())))
    variables = {"model": params}
    if plan.weights:
        variables["fresh"] = model.init(FRESH_SEED)
    if replay:
        variables["replay"] = dict(replay)
        batch = n
    names = plan.inputs("masks" in inputs, "segments" in inputs)
    missing = [k for k in names if k not in inputs]
    if missing:
        raise ConvlensError(f"the metrics {', '.join(plan.names)} need {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    groups = [[i for i, s in enumerate(plan.specs) if s.per_item], [i for i, s in enumerate(plan.specs)
                                                                    if not s.per_item]]
    for kind, idx in zip(("items", "set"), groups):
        if not idx:
            continue
        sub = Plan(plan.model, [plan.names[i] for i in idx], dict(zip(plan.names, plan.cfgs)), plan.method,
                   plan.method_cfg, maps_given=plan.maps_given, n_segments=plan.n_segments,
                   num_classes=plan.num_classes, layers=plan.layers, every_output=plan.every_output)
        comp = Fn(sub, sub.key(), names, "quality", xla=xla)
        size = n if kind == "set" else min(batch or n, n)
        with Executor(variables, batch=size, key=key, tune=False) as ex:
            res = ex.map({"q": comp}, {k: inputs[k] for k in names})["q"]
        out.update(res)
    return out


# ---------------------------------------------------------------- over a store

def bootstrap(values: np.ndarray, reps: int = 2000, seed: int = 0, level: float = 0.95):
    """Mean of ``values`` (NaN left out) and its percentile bootstrap interval."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (reps, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi), int(len(v))


def forward_options(model, params, images: np.ndarray, batch: int):
    """The XLA options and lowering (a `Tuning`) measured, or remembered, for the model's
    forward pass at this batch size on this machine: the metric programs are mostly
    forward passes, too long to measure themselves."""
    from convlens.engine.executor import Executor, Forward
    with Executor(params, batch=batch, tune=True) as ex:
        return ex.tuning(Forward(model), {"images": np.asarray(images, np.float32)})


def run_quality(root, mp, methods: dict, rated, cfg, masks, n: int, progress=None) -> dict:
    """Every metric of ``cfg.quality`` for each of ``methods`` (``{name: (heat [N, H, W],
    targets [N], spec, method cfg)}``) and the two controls, on the items ``rated``."""
    from convlens.engine.targets import n_classes
    from convlens.kernels.metrics.registry import METRICS, expand, parse_options
    from convlens.kernels.registry import METHODS

    names = expand(cfg.quality)
    given = parse_options(cfg.quality_options)
    cfgs = {m: METRICS[m].resolve(given.get(m)) for m in names}
    skipped = [m for m in names if "masks" in METRICS[m].needs] if masks is None else []
    names = [m for m in names if m not in skipped]
    model, params = mp
    idx = np.asarray(rated)[:cfg.quality_items]
    first = next(iter(methods.values()))
    sources = {**methods, **({c: (None, first[1], METHODS[c], METHODS[c].resolve(model, {})) for c in CONTROLS}
                             if cfg.controls else {})}
    images = root["inputs"].get_orthogonal_selection((idx,)).astype(np.float32)
    segments = superpixels(images) if any("segments" in METRICS[m].needs for m in names) else None
    t0 = time.perf_counter()
    xla = forward_options(model, params, images[:cfg.batch], min(cfg.batch, len(idx)))
    layers = layers_with_weights(model, params)
    scores: dict[str, dict] = {}
    for source, (heat, targets, spec, mcfg) in sources.items():
        rerun = [m for m in names if {"explain", "explain_with", "explain_shifted"} & set(METRICS[m].needs)]
        use = names if spec is not None else [m for m in names if m not in rerun]
        if not use:
            continue
        plan = Plan(model, use, cfgs, spec, mcfg, maps_given=heat is not None,
                    n_segments=0 if segments is None else int(segments.max()) + 1, num_classes=n_classes(model),
                    layers=layers)
        arrays = {"images": images, "targets": targets[idx].astype(np.int32)}
        if heat is not None:
            arrays["maps"] = heat[idx].astype(np.float32)
        if masks is not None:
            arrays["masks"] = masks[idx].astype(bool)
        if segments is not None:
            arrays["segments"] = segments
        res = evaluate(model, params, plan, arrays, key=cfg.seed, batch=cfg.batch, xla=xla)
        per = {}
        for k, v in res.items():
            full = np.full((n, *v.shape[1:]), np.nan, np.float32)
            full[idx] = v
            store.write(root, f"audit/{source}/metrics/{k}", full)
            if not k.endswith("_curve"):
                mean, lo, hi, count = bootstrap(v.astype(np.float64))
                per[k] = {"mean": mean, "ci": [lo, hi], "items": count}
        scores[source] = per
        if progress:
            progress(f"quality metrics of {source}: {len(per)} on {len(idx)} items")
    verdicts = informative(scores, names)
    return {"metrics": names, "skipped_without_masks": skipped, "items": int(len(idx)),
            "options": {m: store.jsonable(cfgs[m]) for m in names}, "scores": scores, "informative": verdicts,
            "ranking": ranking(scores, verdicts), "seconds": time.perf_counter() - t0,
            "higher_is_better": {m: METRICS[m].higher_is_better for m in names}, "controls": bool(cfg.controls)}


def _better(a: dict, b: dict, higher: bool) -> bool:
    """``a``'s interval lies strictly on the better side of ``b``'s."""
    return a["ci"][0] > b["ci"][1] if higher else a["ci"][1] < b["ci"][0]


def informative(scores: dict, names) -> dict:
    """Per metric: informative when at least one method's interval is strictly better
    than the random control's (the random map is the null any explanation must beat);
    else "uninformative here"."""
    from convlens.kernels.metrics.registry import METRICS
    out = {}
    methods = [s for s in scores if s not in CONTROLS]
    for m in names:
        rnd = scores.get("control_random", {}).get(m)
        if rnd is None or not np.isfinite(rnd["mean"]):
            out[m] = {"informative": False, "why": "no score for the random control"}
            continue
        beat = [s for s in methods if m in scores[s] and np.isfinite(scores[s][m]["mean"])
                and _better(scores[s][m], rnd, METRICS[m].higher_is_better)]
        out[m] = {"informative": bool(beat), "beats_random": beat,
                  "why": (f"{', '.join(beat)} beat the random map with non-overlapping intervals" if beat else
                          "no method's interval is better than the random map's: uninformative here")}
    return out


def ranking(scores: dict, verdicts: dict) -> list[dict]:
    """Methods and controls by their mean rank over the informative metrics only."""
    from convlens.kernels.metrics.registry import METRICS
    used = [m for m, v in verdicts.items() if v["informative"]]
    ranks: dict[str, list] = {s: [] for s in scores}
    for m in used:
        entries = [(s, scores[s][m]["mean"]) for s in scores if m in scores[s] and np.isfinite(scores[s][m]["mean"])]
        entries.sort(key=lambda e: -e[1] if METRICS[m].higher_is_better else e[1])
        for r, (s, _) in enumerate(entries, 1):
            ranks[s].append(r)
    rows = [{"source": s, "mean_rank": float(np.mean(r)) if r else float("nan"), "metrics": used}
            for s, r in ranks.items()]
    rows.sort(key=lambda r: np.nan_to_num(r["mean_rank"], nan=np.inf))
    return rows
