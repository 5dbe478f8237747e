"""Axioms an attribution can satisfy (on ``x [B, H, W, C]``, maps ``a [B, H, W]``)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from convlens.config import Config, option
from convlens.kernels.metrics.base import BASELINES, baseline_value, prepare, scan_steps, target_score
from convlens.kernels.metrics.spec import HIGHER, LOWER, MetricSpec


def completeness(score, x, a, y, *, baseline="black", abs=False, normalise=False, rtol=1e-3, keys=None):
    """Completeness (Sundararajan et al. 2017): the relevance sums to the output's change
    from the baseline image, ``sum(a) = f(x) - f(x0)``. ``score`` is 1 where it does
    within ``rtol`` and ``gap`` the relative difference. Quantus compares with ``==``
    (floats: never true but for exact arithmetic) and normalises the map first, which
    breaks the sum; we default to no normalisation and a tolerance."""
    a = prepare(a, abs, normalise)
    f0 = target_score(score, x, y)
    fb = target_score(score, jnp.broadcast_to(baseline_value(x, baseline, keys), x.shape), y)
    total = a.reshape(a.shape[0], -1).sum(axis=1)
    gap = jnp.abs(total - (f0 - fb)) / jnp.maximum(jnp.abs(f0 - fb), 1e-12)
    return {"score": (gap <= rtol).astype(jnp.float32), "gap": gap}


def non_sensitivity(score, x, a, y, *, eps=1e-5, features_in_step=1, baseline="black", abs=True, normalise=True,
                    keys=None):
    """Non-sensitivity (Nguyen & Martínez 2020): pixels with no relevance (``|a| < eps``)
    should be those whose removal does not change the output. Each step's
    ``features_in_step`` pixels (raster order) are replaced alone; ``score`` counts the
    pixels where the two disagree (0 is best). Quantus XORs per-step output changes
    with per-pixel zero relevance, which only lines up with ``features_in_step=1``;
    for larger steps we give a step's verdict to each of its pixels (the paper)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    k = int(features_in_step)
    n = math.ceil(h * w / k)
    pix = jnp.arange(h * w).reshape(h, w) // k
    base = baseline_value(x, baseline, keys)
    f0 = target_score(score, x, y)
    fs = scan_steps(score, lambda s: jnp.where((pix == s)[None, ..., None], base, x), n, y)
    unchanged = jnp.abs(fs - f0[:, None]) < eps  # [B, n]
    no_rel = a.reshape(b, -1) < eps
    per_pixel = unchanged[:, pix.reshape(-1)]
    return {"score": jnp.sum(per_pixel ^ no_rel, axis=1).astype(jnp.float32)}


def input_invariance(explain_shifted, explain, x, y, *, shift=-1.0, atol=1e-5, abs=False, normalise=False):
    """Input invariance (Kindermans et al. 2017): a constant ``shift`` of the input,
    compensated so the model's outputs do not change, should not change the map.
    ``explain_shifted(shift, x + shift, y)`` runs the method on the compensated model
    (convlens compensates in the model's preprocessing, which subtracts the shift before
    anything else). ``score`` is 1 where the maps agree within ``atol``, ``gap`` their
    largest difference. (Quantus 0.6 shifts every pixel but the first: its
    ``perturb_batch`` drops each item's first index.)"""
    a1 = prepare(explain(x, y), abs, normalise)
    a2 = prepare(explain_shifted(shift, x + shift, y), abs, normalise)
    gap = jnp.max(jnp.abs(a1 - a2).reshape(a1.shape[0], -1), axis=1)
    return {"score": (gap <= atol).astype(jnp.float32), "gap": gap}


# ---------------------------------------------------------------- declarations

@dataclasses.dataclass(frozen=True)
class CompletenessConfig(Config):
    """Options of completeness.

    Attributes:
      baseline: the reference image's value (black, white, mean, uniform or a pixel value).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first (breaks the sum).
      rtol: the relative gap still counted as complete.
      softmax: score probabilities (false: logits).
    """

    baseline: str | float = option("black", choices=BASELINES)
    abs: bool = False
    normalise: bool = False
    rtol: float = option(1e-3, min=0)
    softmax: bool = False

    _owner = "completeness"


@dataclasses.dataclass(frozen=True)
class NonSensitivityConfig(Config):
    """Options of non-sensitivity.

    Attributes:
      eps: relevance and output changes below this count as none.
      features_in_step: pixels replaced per step (raster order).
      baseline: what replaced pixels show (black, white, mean, uniform or a pixel value).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      softmax: score probabilities (false: logits).
    """

    eps: float = option(1e-5, min=0)
    features_in_step: int = option(64, min=1)
    baseline: str | float = option("black", choices=BASELINES)
    abs: bool = True
    normalise: bool = True
    softmax: bool = True

    _owner = "non_sensitivity"


@dataclasses.dataclass(frozen=True)
class InputInvarianceConfig(Config):
    """Options of input invariance.

    Attributes:
      shift: the constant added to every pixel (and compensated in the model).
      atol: the largest map difference still counted as equal.
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
    """

    shift: float = option(-1.0)
    atol: float = option(1e-5, min=0)
    abs: bool = False
    normalise: bool = False

    _owner = "input_invariance"


METRICS = (
    MetricSpec("completeness", "axiomatic", HIGHER, ("score", "x", "a", "y"), CompletenessConfig, completeness,
               departure="Quantus compares floats with == and normalises the map first (which breaks the sum); "
                         "convlens takes a relative tolerance and no normalisation"),
    MetricSpec("non_sensitivity", "axiomatic", LOWER, ("score", "x", "a", "y"), NonSensitivityConfig,
               non_sensitivity,
               departure="Quantus's per-step verdicts only line up with features_in_step=1; for larger steps each "
                         "pixel gets its step's verdict, as the paper"),
    MetricSpec("input_invariance", "axiomatic", HIGHER, ("explain_shifted", "explain", "x", "y"),
               InputInvarianceConfig, input_invariance,
               departure="Quantus 0.6 shifts every pixel but the first (its perturb_batch drops each item's first "
                         "index); convlens shifts them all"),
)
