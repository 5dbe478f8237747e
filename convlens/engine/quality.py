"""The metric catalogue over a store: every selected metric of
`convlens.kernels.metrics.catalogue` for each audited method and for two controls
computed the same way (a random map, and a Sobel edge map of the input alone), with a
bootstrap confidence interval per score, a verdict per metric (does it separate the
methods from the random control on this store?) and a ranking over the informative
metrics only.

Per-item scores go to ``audit/<method>/metrics/<name>`` (``[sample]``) and curves to
``.../<name>_curve`` (``[sample, step]``); the controls' to ``audit/control_random`` and
``audit/control_sobel``; the summary to the root attribute ``audit["quality"]``.
"""

from __future__ import annotations

import numpy as np

from convlens.engine import store
from convlens.errors import OptionError

CONTROLS = ("control_random", "control_sobel")


def parse_quality(text: str) -> list[str]:
    from convlens.kernels.metrics.catalogue import FAMILIES, METRICS, expand
    if not text:
        return []
    try:
        return expand(text)
    except KeyError as e:
        raise OptionError(f"audit: unknown metric {e.args[0]!r} in --quality; choose from the families "
                          f"{', '.join(FAMILIES)}, 'default', 'all', or the metrics {', '.join(METRICS)} "
                         ) from None


def parse_options(text: str) -> dict[str, dict]:
    """``"road_morf.noise=0,pixel_flipping.steps=32"`` -> ``{metric: {option: value}}``;
    values are read as numbers where they are numbers."""
    from convlens.kernels.metrics.catalogue import METRICS
    out: dict[str, dict] = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        key, eq, value = part.partition("=")
        name, dot, opt = key.partition(".")
        if not (eq and dot) or name not in METRICS:
            raise OptionError(f"audit: --quality-options {part!r}: write metric.option=value with one of "
                              f"the metrics {', '.join(METRICS)}")
        if opt not in METRICS[name].defaults and opt not in ("abs", "normalise", "baseline"):
            known = ", ".join(list(METRICS[name].defaults) + ["abs", "normalise"])
            raise OptionError(f"audit: {name} has no option {opt!r} (options: {known})")
        out.setdefault(name, {})[opt] = _value(value)
    return out


def _value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def sobel(images):
    """Input-only control: the gradient magnitude of the grey image (Sobel), ``[B, H, W]``."""
    import jax.numpy as jnp
    g = images.mean(axis=-1)
    p = jnp.pad(g, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    return jnp.sqrt(gx * gx + gy * gy)


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


def bootstrap(values: np.ndarray, reps: int = 2000, seed: int = 0, level: float = 0.95):
    """Mean of ``values`` (NaN left out) and its percentile bootstrap interval."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (reps, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi), int(len(v))


def _metric_fn(model, names, options, source, spec, cfg_method, num_classes, n_segments=0, layers=()):
    """The pure batch function computing every metric for one map source. With
    ``layers`` (the randomisation tests), its variables are ``{"model": params, "fresh":
    a random initialisation}``: arguments, not constants folded into the program."""
    import jax

    from convlens.kernels import common
    from convlens.kernels.metrics.catalogue import Context, evaluate

    def fn(variables, inputs, keys):
        params, fresh = (variables["model"], variables["fresh"]) if layers else (variables, None)
        x, y = inputs["images"], inputs["targets"]

        def logits(im):
            return common.forward_logits(model, params, im)

        def probs(im):
            return common.probabilities(model, logits(im))

        if source == "control_random":
            def explain_with(p, im, t):
                return jax.random.uniform(jax.random.fold_in(keys[0], 7), im.shape[:3])
        elif source == "control_sobel":
            def explain_with(p, im, t):
                return sobel(im)
        else:
            def explain_with(p, im, t):
                return spec.explain(model, p, im, t[:, None], cfg_method, keys)[spec.heatmap][:, 0]

        def explain(im, t):
            return explain_with(params, im, t)
        a = inputs["maps"] if source not in CONTROLS else explain(x, y)
        ctx = Context(x=x, a=a, y=y, probs=probs, logits=logits, explain=explain, masks=inputs.get("masks"),
                      segments=inputs.get("segments"), n_segments=n_segments, key=keys[0], num_classes=num_classes,
                      explain_with=explain_with, params=params, fresh=fresh, layers=tuple(layers))
        out = {}
        for name in names:
            res = evaluate(name, ctx, options.get(name))
            out[name] = res["score"]
            if "curve" in res:
                out[f"{name}_curve"] = res["curve"]
        return out
    return fn


def run_quality(root, mp, methods: dict, rated, cfg, masks, n: int, progress=None) -> dict:
    """Every metric of ``cfg.quality`` for each of ``methods`` (``{name: (heat [N, H, W],
    targets [N], spec, method cfg)}``) and the two controls, on the items ``rated``."""
    import time

    from convlens.engine.executor import Batch, Executor, Fn
    from convlens.kernels.metrics.catalogue import METRICS, layers_with_weights

    names = parse_quality(cfg.quality)
    options = parse_options(cfg.quality_options)
    if masks is None:
        skipped = [m for m in names if "masks" in METRICS[m].needs]
        names = [m for m in names if m not in skipped]
    else:
        skipped = []
    model, params = mp
    idx = np.asarray(rated)[:cfg.quality_items]
    from convlens.engine.targets import n_classes
    num_classes = n_classes(model)
    first = next(iter(methods.values()))
    sources = {**methods, **{c: (None, first[1], None, None) for c in CONTROLS}}
    segments = None
    if any("segments" in METRICS[m].needs for m in names):
        segments = superpixels(root["inputs"].get_orthogonal_selection((idx,)).astype(np.float32))
    n_segments = 0 if segments is None else int(segments.max()) + 1
    seg_rows = {int(i): k for k, i in enumerate(idx)}
    scores: dict[str, dict] = {}
    t0 = time.perf_counter()
    xla = forward_options(model, params, root["inputs"].get_orthogonal_selection((idx[:cfg.batch],)), cfg.batch)
    # The randomisation tests: the layers with variables, output first, as the sanity
    # check takes them, and one random initialisation shared by every source.
    layers = layers_with_weights(model, params) if any("weights" in METRICS[m].needs for m in names) else []
    variables = {"model": params, "fresh": model.init(1234)} if layers else params  # the sanity check's seed
    for source, (heat, targets, spec, mcfg) in sources.items():
        need_explain = [m for m in names if {"explain", "weights"} & set(METRICS[m].needs)]
        use = names if (spec is not None or source in CONTROLS) else [m for m in names if m not in need_explain]
        if not use:
            continue
        key = ("quality", model.computation, source, getattr(spec, "name", None), mcfg, tuple(use),
               repr(sorted(options.items())), n_segments)
        inputs = ("images", "targets") + (("maps",) if source not in CONTROLS else ()) + \
            (("masks",) if masks is not None else ()) + (("segments",) if segments is not None else ())
        comp = {"q": Fn(_metric_fn(model, use, options, source, spec, mcfg, num_classes, n_segments, layers), key,
                        inputs, source, xla=xla)}
        res: dict[str, list] = {}

        def groups(ex):
            for s in range(0, len(idx), ex.batch):
                part = idx[s:s + ex.batch]
                data = {"images": root["inputs"].get_orthogonal_selection((part,)).astype(np.float32),
                        "targets": targets[part].astype(np.int32)}
                if source not in CONTROLS:
                    data["maps"] = heat[part].astype(np.float32)
                if masks is not None:
                    data["masks"] = masks[part].astype(bool)
                if segments is not None:
                    data["segments"] = segments[[seg_rows[int(i)] for i in part]]
                yield s, [Batch(data, part)]

        with Executor(variables, batch=min(cfg.batch, max(len(idx), 1)), tune=False) as ex:
            for _, results in ex.stream(comp, groups(ex)):
                for k, v in results[0]["q"].items():
                    res.setdefault(k, []).append(np.asarray(v))
        g = f"audit/{source}/metrics"
        per = {}
        for k, v in res.items():
            v = np.concatenate(v)
            full = np.full((n, *v.shape[1:]), np.nan, np.float32)
            full[idx] = v
            store.write(root, f"{g}/{k}", full)
            if not k.endswith("_curve"):
                mean, lo, hi, count = bootstrap(v.astype(np.float64))
                per[k] = {"mean": mean, "ci": [lo, hi], "items": count}
        scores[source] = per
        if progress:
            progress(f"quality metrics of {source}: {len(per)} on {len(idx)} items")
    verdicts = informative(scores, names)
    return {"metrics": names, "skipped_without_masks": skipped, "items": int(len(idx)), "options": options,
            "scores": scores, "informative": verdicts, "ranking": ranking(scores, verdicts),
            "seconds": time.perf_counter() - t0,
            "higher_is_better": {m: METRICS[m].higher_is_better for m in names}}


def forward_options(model, params, images: np.ndarray, batch: int) -> str:
    """The XLA options measured (or remembered) for the model's forward pass at this
    batch size on this machine: the metric programs are mostly forward passes, too long
    to measure themselves."""
    from convlens.engine.executor import Executor, Forward
    with Executor(params, batch=batch, tune=True) as ex:
        from convlens.engine.executor import pad_rows
        x = pad_rows(np.asarray(images, np.float32), ex.batch)
        return ex.function(Forward(model)).tuning(ex.params, {"images": x}, ex.keys(np.arange(ex.batch))).choice


def _better(a: dict, b: dict, higher: bool) -> bool:
    """``a``'s interval lies strictly on the better side of ``b``'s."""
    return a["ci"][0] > b["ci"][1] if higher else a["ci"][1] < b["ci"][0]


def informative(scores: dict, names) -> dict:
    """Per metric: informative when at least one method's interval is strictly better
    than the random control's (the random map is the null any explanation must beat);
    else "uninformative here"."""
    from convlens.kernels.metrics.catalogue import METRICS
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
    from convlens.kernels.metrics.catalogue import METRICS
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
