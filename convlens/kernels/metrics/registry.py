"""Every quality metric, assembled from the family modules' declarations (``METRICS`` in
each of `FAMILY_MODULES`; see `convlens.kernels.metrics.spec`), the named sets of them,
and what one batch of a metric is computed from.

Adding a metric: its function, its config and one `MetricSpec` line in its family's
module. The audit, ``convlens metrics``, `convlens.evaluate`, the conformance tests and
the docs take it from here.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax.numpy as jnp

from convlens.errors import OptionError
from convlens.kernels.metrics.spec import FAMILIES, NEEDS, MetricSpec  # noqa: F401

FAMILY_MODULES = ("faithful", "robust", "localise", "complexity", "randomise", "axioms")


def _assemble() -> dict[str, MetricSpec]:
    out: dict[str, MetricSpec] = {}
    for mod in FAMILY_MODULES:
        for spec in importlib.import_module(f"convlens.kernels.metrics.{mod}").METRICS:
            if spec.name in out:
                raise ValueError(f"metric {spec.name!r} declared twice ({mod})")
            out[spec.name] = spec
    return out


METRICS: dict[str, MetricSpec] = _assemble()

# Named sets (``--quality default``): ``basic`` is what `convlens audit` computes unless
# told otherwise (deletion and insertion curves, average drop, increase in confidence and
# the model-randomisation sanity check); ``default`` one or two cheap metrics of every
# family, affordable on a CPU for a store of thousands of items.
PRESETS: dict[str, tuple[str, ...]] = {
    "basic": ("deletion", "insertion", "average_drop", "increase_in_confidence", "mprt"),
    "default": ("road_gain", "pixel_flipping", "faithfulness_estimate", "monotonicity_correlation",
                "avg_sensitivity", "local_lipschitz_estimate", "pointing_game", "attribution_localisation",
                "relevance_rank_accuracy", "auc", "sparseness", "complexity", "random_logit"),
}


def expand(names: str | tuple | list) -> list[str]:
    """Metric names from names, family names and presets (``"faithfulness,sparseness"``);
    ``"all"`` is every metric, ``"none"`` or ``""`` none. Unknown names raise a one-line
    `OptionError`."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        if n == "none":
            continue
        if n == "all":
            pick = list(METRICS)
        elif n in PRESETS:
            pick = list(PRESETS[n])
        elif n in FAMILIES:
            pick = [m for m, s in METRICS.items() if s.family == n]
        elif n in METRICS:
            pick = [n]
        else:
            raise OptionError(f"unknown metric {n!r}; choose metrics ({', '.join(METRICS)}), families "
                              f"({', '.join(FAMILIES)}), presets ({', '.join(PRESETS)}), all or none")
        out += [p for p in pick if p not in out]
    return out


def resolve(name: str, options: dict | None = None):
    """Metric ``name``'s config from keyword options (checked against its declaration)."""
    if name not in METRICS:
        expand([name])  # the one-line error
    return METRICS[name].resolve(options)


def parse_options(text: str) -> dict[str, dict]:
    """``"road_morf.noise=0,pixel_flipping.steps=32"`` -> ``{metric: {option: text}}``
    (values are coerced and checked by the metric's config); one-line errors name the
    part that is wrong."""
    out: dict[str, dict] = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        key, eq, value = part.partition("=")
        name, dot, opt = key.partition(".")
        if not (eq and dot) or name not in METRICS:
            raise OptionError(f"--quality-options {part!r}: write metric.option=value with one of the metrics "
                              f"{', '.join(METRICS)}")
        out.setdefault(name, {})[opt.strip().replace("-", "_")] = value.strip()
    for name, opts in out.items():
        resolve(name, opts)  # checked now: a bad value is a one-line error before any work
    return out


def options_help(name: str) -> list[tuple[str, object, str]]:
    """A metric's options: ``(name, default, meaning)``."""
    from convlens.config import field_help
    spec = METRICS[name]
    helps = field_help(spec.config)
    return [(f.name, f.default, helps.get(f.name, "")) for f in dataclasses.fields(spec.config)
            if not f.name.startswith("_")]


# ---------------------------------------------------------------- one batch

def batch_inputs(needs, *, model=None, params=None, method=None, method_cfg=None, x=None, y=None, a=None,
                 masks=None, segments=None, n_segments: int = 0, num_classes: int = 0, fresh=None, layers=(),
                 keys=None) -> dict:
    """What metrics with ``needs`` take on one batch (see `NEEDS`), built from the model,
    the method (a `MethodSpec` and its config; its maps re-run with the batch's keys) and
    the batch's arrays. Pure: traced into one program per batch."""
    from convlens.kernels.metrics.base import Scorer
    needs = set(needs)
    out = {"x": x, "y": y, "a": a, "masks": masks, "segments": segments, "n_segments": int(n_segments),
           "num_classes": int(num_classes), "params": params, "fresh": fresh, "layers": tuple(layers)}
    if {"score", "predicted"} & needs:
        out["logits"], out["probs"] = Scorer(model, params, False), Scorer(model, params, True)
        if "predicted" in needs:
            out["predicted"] = jnp.argmax(out["logits"](x), axis=-1)
    if {"explain", "explain_with", "explain_shifted"} & needs:
        def explain_with(p, im, t, m=model):
            return method.explain(m, p, im, t[:, None], method_cfg, keys)[method.heatmap][:, 0]

        def shifted(shift, im, t):
            pre = dataclasses.replace(model.preprocess_spec, shift=model.preprocess_spec.shift + shift)
            return explain_with(params, im, t, model.replace(preprocess=pre))
        out.update(explain_with=explain_with, explain=lambda im, t: explain_with(params, im, t),
                   explain_shifted=shifted)
    return out


def describe(name: str | None = None) -> str:
    """The metrics as text (``convlens metrics``): one a line with its family, which way
    is better and what it needs besides maps; or one metric in full with its options."""
    if name:
        if name not in METRICS:
            raise OptionError(f"{name!r} is not a metric; choose from {', '.join(METRICS)}")
        spec = METRICS[name]
        lines = [f"{name}: {spec.doc} ({spec.family}; {spec.direction} is better)",
                 f"  needs: {', '.join(spec.requires) or 'maps only'}"
                 + ("; its score depends on the set of items" if not spec.per_item else "")]
        lines += [f"  {name}.{opt}={default!r}: {text}" for opt, default, text in options_help(name)]
        if spec.replay:
            lines.append(f"  replays (Python): {', '.join(spec.replay)}")
        return "\n".join(lines)
    lines = [f"{n:27s} {s.family:14s} {s.direction:7s} {', '.join(s.requires) or 'maps':20s} {s.doc}"
             for n, s in METRICS.items()]
    lines += [f"preset {p}: {', '.join(names)}" for p, names in PRESETS.items()]
    return "\n".join(lines)
