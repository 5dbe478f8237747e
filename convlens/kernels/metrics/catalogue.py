"""Every quality metric by name: its family, what it needs, which way is better, its
options and defaults, and how to call it on a batch.

``evaluate(name, ctx, options)`` runs one metric on one batch, where ``ctx`` holds the
pure functions and arrays of `Context`. A metric's result is ``score [B]`` and possibly
``curve [B, S]`` (stored as ``audit/<method>/metrics/<name>`` and ``.../<name>_curve``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from convlens.kernels.metrics import axioms, complexity, faithful, localise, randomise, robust

FAMILIES = ("faithfulness", "robustness", "localisation", "complexity", "randomisation", "axiomatic")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """A metric: ``call(ctx, **options) -> {"score": [B], ...}``.

    Attributes:
      needs: what beyond maps it uses: ``model`` (scores of perturbed images),
        ``explain`` (re-runs the method), ``weights`` (re-runs it with other weights),
        ``masks`` (object masks), ``segments``.
      higher_is_better: the direction of ``score``.
      softmax: scores are probabilities (else logits), Quantus's default per metric.
      defaults: options and their defaults (what ``--metric-option`` may set).
    """

    name: str
    family: str
    call: Callable
    needs: tuple[str, ...]
    higher_is_better: bool
    softmax: bool = True
    defaults: dict = dataclasses.field(default_factory=dict)
    doc: str = ""


@dataclasses.dataclass
class Context:
    """What a metric may use for one batch: ``x [B, H, W, C]``, maps ``a [B, H, W]``,
    targets ``y [B]``, ``probs``/``logits`` (pure ``images -> [N, K]``), ``explain``
    (``(images, targets [B]) -> [B, H, W]``), ``masks [B, H, W]``, ``segments [B, H, W]``
    with ``n_segments``, ``key`` and ``num_classes``; for the randomisation tests,
    ``explain_with`` (``(params, images, targets) -> [B, H, W]``), the model's ``params``,
    ``fresh`` (a random initialisation of the same variables) and ``layers`` (names of
    the layers with variables, output first)."""

    x: Any
    a: Any
    y: Any
    probs: Callable | None = None
    logits: Callable | None = None
    explain: Callable | None = None
    masks: Any = None
    segments: Any = None
    n_segments: int = 0
    key: Any = None
    num_classes: int = 0
    explain_with: Callable | None = None
    params: Any = None
    fresh: Any = None
    layers: tuple = ()

    def score(self, softmax: bool):
        return self.probs if softmax else self.logits


def _model(fn, softmax):
    return lambda c, **o: fn(c.score(softmax), c.x, c.a, c.y, key=c.key, **o)


def _masks(fn):
    return lambda c, **o: fn(c.a, c.masks, **o)


def _maps(fn):
    return lambda c, **o: fn(c.a, **o)


def _segments(fn, softmax):
    return lambda c, **o: fn(c.score(softmax), c.x, c.a, c.y, c.segments, n_segments=c.n_segments, key=c.key, **o)


def layers_with_weights(model, params) -> list[str]:
    """The layers the randomisation tests replace: those with variables, output first."""
    return [n for n in reversed(model.layer_names) if n in params and params[n]]


def stages(layers, n: int) -> list[tuple]:
    """``layers`` (output first) cut into ``n`` cascading steps as the audit's sanity
    check does: the top layer alone first, the last step ending with every layer."""
    n = max(1, min(int(n), len(layers)))
    ends = sorted({max(1, round(len(layers) * (k + 1) / n)) for k in range(n)} | {1})
    return [tuple(layers[a:b]) for a, b in zip([0] + ends[:-1], ends)]


# The randomisation tests compare the method's map re-run in the program (not the
# stored one, which may be float16) with its maps under random weights: the same
# function at the same precision on both sides.
def _mprt(c, stages_=4, independent=False, smooth_samples=0, smooth_noise=0.1, abs=True, normalise=True):
    return randomise.model_parameter_randomisation(
        c.explain_with, c.params, c.fresh, stages(c.layers, stages_), c.x, c.explain(c.x, c.y), c.y, abs=abs,
        normalise=normalise, independent=independent, smooth_samples=smooth_samples, smooth_noise=smooth_noise,
        key=c.key)


def _efficient_mprt(c, **o):
    return randomise.efficient_mprt(c.explain_with, c.params, c.fresh, c.x, c.explain(c.x, c.y), c.y, **o)


def _explain(fn, softmax):
    return lambda c, **o: fn(c.explain, c.score(softmax), c.x, c.a, c.y, key=c.key, **o)


def _spec(name, family, fn, needs, higher, softmax=True, **defaults):
    call = {"model": _model(fn, softmax), "masks": _masks(fn), "maps": _maps(fn),
            "explain": _explain(fn, softmax), "segments": _segments(fn, softmax)}[needs[0]]
    return MetricSpec(name, family, call, needs, higher, softmax, defaults, (fn.__doc__ or "").strip())


SPECS = (
    _spec("pixel_flipping", "faithfulness", faithful.pixel_flipping, ("model",), False, steps=64, baseline="black"),
    _spec("region_perturbation", "faithfulness", faithful.region_perturbation, ("model",), True, patch_size=8,
          regions_evaluation=100),
    _spec("selectivity", "faithfulness", faithful.selectivity, ("model",), False, patch_size=8),
    _spec("faithfulness_estimate", "faithfulness", faithful.faithfulness_estimate, ("model",), True, False, steps=64),
    _spec("faithfulness_correlation", "faithfulness", faithful.faithfulness_correlation, ("model",), True, False,
          nr_runs=100, subset_size=224),
    _spec("monotonicity", "faithfulness", faithful.monotonicity, ("model",), True, steps=64),
    _spec("monotonicity_correlation", "faithfulness", faithful.monotonicity_correlation, ("model",), True, steps=32,
          nr_samples=16),
    _spec("sensitivity_n", "faithfulness", faithful.sensitivity_n, ("model",), True, nr_samples=32),
    # ROAD on logits: a confident model's probability saturates (0.999 whatever is removed
    # on the README demo) and hides the differences; the accuracy curve is the same either way.
    _spec("road_morf", "faithfulness", faithful.road, ("model",), False, False, order="morf", noise=0.01,
          percentages=tuple(range(5, 100, 10))),
    _spec("road_lerf", "faithfulness", faithful.road, ("model",), True, False, order="lerf", noise=0.01,
          percentages=tuple(range(5, 100, 10))),
    _spec("road_gain", "faithfulness", faithful.road_gain, ("model",), True, False, noise=0.01,
          percentages=tuple(range(5, 100, 10))),
    _spec("irof", "faithfulness", faithful.irof, ("segments",), True),
    _spec("infidelity", "faithfulness", faithful.infidelity, ("model",), False, False, n_perturb_samples=1),
    _spec("avg_sensitivity", "robustness", robust.sensitivity, ("explain",), False, False, reduce="mean",
          nr_samples=8),
    _spec("max_sensitivity", "robustness", robust.sensitivity, ("explain",), False, False, reduce="max",
          nr_samples=8),
    _spec("local_lipschitz_estimate", "robustness", robust.local_lipschitz_estimate, ("explain",), False,
          nr_samples=8),
    _spec("relative_input_stability", "robustness", robust.relative_stability, ("explain",), False, False,
          of="input", nr_samples=8),
    _spec("relative_output_stability", "robustness", robust.relative_stability, ("explain",), False, False,
          of="output", nr_samples=8),
    _spec("continuity", "robustness", robust.continuity, ("explain",), False, False, nr_steps=8),
    _spec("pointing_game", "localisation", localise.pointing_game, ("masks",), True),
    _spec("attribution_localisation", "localisation", localise.attribution_localisation, ("masks",), True),
    _spec("top_k_intersection", "localisation", localise.top_k_intersection, ("masks",), True, k=1000),
    _spec("relevance_rank_accuracy", "localisation", localise.relevance_rank_accuracy, ("masks",), True),
    _spec("relevance_mass_accuracy", "localisation", localise.relevance_mass_accuracy, ("masks",), True),
    _spec("auc", "localisation", localise.auc, ("masks",), True),
    _spec("sparseness", "complexity", complexity.sparseness, ("maps",), True),
    _spec("complexity", "complexity", complexity.complexity, ("maps",), False),
    _spec("effective_complexity", "complexity", complexity.effective_complexity, ("maps",), False),
    MetricSpec("random_logit", "randomisation",
               lambda c, **o: randomise.random_logit(c.explain, c.x, c.a, c.y, num_classes=c.num_classes,
                                                     key=c.key, **o),
               ("explain",), False, False, {}, (randomise.random_logit.__doc__ or "").strip()),
    MetricSpec("mprt", "randomisation", lambda c, stages=4, **o: _mprt(c, stages, **o), ("weights",), False, False,
               {"stages": 4, "independent": False}, (randomise.model_parameter_randomisation.__doc__ or "").strip()),
    MetricSpec("smooth_mprt", "randomisation", lambda c, stages=4, **o: _mprt(c, stages, **o), ("weights",), False,
               False, {"stages": 4, "smooth_samples": 4, "smooth_noise": 0.1},
               (randomise.model_parameter_randomisation.__doc__ or "").strip()),
    MetricSpec("efficient_mprt", "randomisation", _efficient_mprt, ("weights",), True, False,
               {"bins": 100, "abs": False, "normalise": False}, (randomise.efficient_mprt.__doc__ or "").strip()),
    _spec("completeness", "axiomatic", axioms.completeness, ("model",), True, False),
    _spec("non_sensitivity", "axiomatic", axioms.non_sensitivity, ("model",), False, True, features_in_step=64),
)
METRICS: dict[str, MetricSpec] = {s.name: s for s in SPECS}


# The default set: what an audit computes when asked for a family (cheap enough for a
# store of thousands of items on a CPU).
DEFAULT = ("road_gain", "pixel_flipping", "faithfulness_estimate", "monotonicity_correlation",
           "avg_sensitivity", "local_lipschitz_estimate", "pointing_game", "attribution_localisation",
           "relevance_rank_accuracy", "auc", "sparseness", "complexity", "random_logit")


def expand(names: str | tuple | list) -> list[str]:
    """Metric names from names and family names (``"faithfulness,sparseness"``);
    ``"default"`` is `DEFAULT` and ``"all"`` every metric. Unknown names raise
    ``KeyError`` with the name."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        if n == "all":
            pick = list(METRICS)
        elif n == "default":
            pick = list(DEFAULT)
        elif n in FAMILIES:
            pick = [m for m, s in METRICS.items() if s.family == n]
        elif n in METRICS:
            pick = [n]
        else:
            raise KeyError(n)
        out += [p for p in pick if p not in out]
    return out


def evaluate(name: str, ctx: Context, options: dict | None = None) -> dict:
    """Metric ``name`` on the batch ``ctx`` with its defaults updated by ``options``."""
    spec = METRICS[name]
    opts = {**spec.defaults, **(options or {})}
    out = spec.call(ctx, **opts)
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}
