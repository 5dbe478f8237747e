"""Robustness: does the map stay put when the input barely changes? Each function
re-runs the method, ``explain(x [B, H, W, C], y [B]) -> [B, H, W]`` (pure), on
``nr_samples`` perturbed copies of the batch, one batch per step of a compiled loop;
``score`` (see `convlens.kernels.metrics.base`) tells whether the prediction changed
(and gives ROS its outputs).

Noise amplitudes are fractions of each image's value range (``max - min``): Quantus
states them in the model's input units assuming inputs in [0, 1], where the two agree.
``noises [R, B, H, W, C]`` replaces the draws (for parity with another implementation).
A sample whose predicted class changes is NaN where the option
``return_nan_when_prediction_changes`` says so (Quantus's defaults per metric), and
NaN samples are left out of the mean / max."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from convlens.config import Config, option
from convlens.kernels.metrics.base import need_keys, per_item, prepare
from convlens.kernels.metrics.spec import LOWER, MetricSpec


def _draws(kind, keys, n, x, lo, hi=None):
    """``[n, B, H, W, C]`` noise from each item's key, in units of its value range:
    uniform in ``[lo, hi]`` or Gaussian with std ``lo``."""
    rng = (x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True))[None]
    keys = need_keys(keys, "a robustness metric")
    if kind == "uniform":
        d = per_item(keys, lambda k: jax.random.uniform(k, (n, *x.shape[1:]), minval=lo, maxval=hi))
    else:
        d = per_item(keys, lambda k: jax.random.normal(k, (n, *x.shape[1:]))) * lo
    return jnp.moveaxis(d, 0, 1) * rng


def _over_samples(explain, score, x, y, noises, per_sample, nan_on_change, outputs=False):
    """``per_sample(xs, a_s, out_s, out) -> [B]`` for every noise: ``[R, B]``. The model's
    outputs (``out``, ``out_s``) are computed only where needed: for ``nan_on_change``
    or when ``outputs`` (ROS) asks for them; otherwise they are ``None``."""
    need = bool(nan_on_change) or outputs
    out = score(x) if need else None

    def one(noise):
        xs = x + noise
        out_s = score(xs) if need else None
        v = per_sample(xs, explain(xs, y), out_s, out)
        if nan_on_change:
            v = jnp.where(jnp.argmax(out_s, axis=1) != jnp.argmax(out, axis=1), jnp.nan, v)
        return v
    # Unrolled, not lax.map: XLA:CPU runs a convolution's backward pass inside a loop
    # body about 5x slower than at the top level (VGG16, measured), and R is small.
    return jnp.stack([one(noises[r]) for r in range(noises.shape[0])])


def _norm(v):
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1))


def sensitivity(explain, score, x, a, y, *, reduce="mean", nr_samples=200, lower_bound=0.2, abs=False,
                normalise=False, return_nan_when_prediction_changes=False, keys=None, noises=None):
    """Avg- (``reduce="mean"``) and max-sensitivity (Yeh et al. 2019):
    ``||a(x) - a(x + d)||_F / ||a(x)||_F`` for uniform noise ``d`` in
    ``[-lower_bound, lower_bound]``, averaged or maximised over samples (lower is more
    robust). Quantus divides by the map's norm, not the paper's ``r``; so do we."""
    a = prepare(a, abs, normalise)
    if noises is None:
        noises = _draws("uniform", keys, nr_samples, x, -lower_bound, lower_bound)
    den = _norm(a)
    r = _over_samples(explain, score, x, y, noises,
                      lambda xs, a_s, o_s, o: _norm(a - prepare(a_s, abs, normalise)) / den,
                      return_nan_when_prediction_changes)
    return {"score": jnp.nanmean(r, axis=0) if reduce == "mean" else jnp.nanmax(r, axis=0)}


def local_lipschitz_estimate(explain, score, x, a, y, *, nr_samples=200, perturb_std=0.1, abs=False,
                             normalise=True, return_nan_when_prediction_changes=False, keys=None, noises=None):
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): the largest
    ``||a(x) - a(x')||_2 / ||x - x'||_2`` over Gaussian neighbours ``x'`` (std
    ``perturb_std``); lower is more robust."""
    a = prepare(a, abs, normalise)
    if noises is None:
        noises = _draws("normal", keys, nr_samples, x, perturb_std)
    r = _over_samples(explain, score, x, y, noises,
                      lambda xs, a_s, o_s, o: _norm(a - prepare(a_s, abs, normalise)) / _norm(x - xs),
                      return_nan_when_prediction_changes)
    return {"score": jnp.nanmax(r, axis=0)}


def _relative(v, ref, eps):
    return v / (ref + (ref == 0) * eps)


def relative_stability(explain, score, x, a, y, *, of="input", nr_samples=200, lower_bound=0.02, upper_bound=0.2,
                       eps_min=1e-6, abs=False, normalise=False, return_nan_when_prediction_changes=True, keys=None,
                       noises=None):
    """Relative input (``of="input"``) and output (``of="output"``) stability (Agarwal et
    al. 2022): the largest ``||(a - a') / a|| / max(||(x - x') / x||, eps)`` (input) or
    ``... / max(||h(x) - h(x')||, eps)`` with ``h`` the model's outputs (output), over
    uniform noise in ``[lower_bound, upper_bound]`` (one-sided, as Quantus draws it);
    relative differences divide by ``eps_min`` where the reference is 0, as Quantus.
    Lower is more stable."""
    a = prepare(a, abs, normalise)
    if noises is None:
        noises = _draws("uniform", keys, nr_samples, x, lower_bound, upper_bound)

    def per(xs, a_s, o_s, o):
        num = _norm(_relative(a - prepare(a_s, abs, normalise), a, eps_min))
        den = _norm(_relative(x - xs, x, eps_min)) if of == "input" else _norm(o - o_s)
        return num / (den + (den == 0) * eps_min)
    r = _over_samples(explain, score, x, y, noises, per, return_nan_when_prediction_changes,
                      outputs=of == "output")
    return {"score": jnp.nanmax(r, axis=0)}


def continuity(explain, score, x, a, y, *, nr_steps=28, abs=True, normalise=True,
               return_nan_when_prediction_changes=False):
    """Continuity (Montavon et al. 2018, "explanation continuity"): the largest
    ``||a(x) - a(x')||_1 / ||x - x'||_2`` over translates ``x'`` of the image. As in
    Quantus 0.6, the image is shifted along its width by ``t = -W + k * dx`` pixels,
    ``k = 1 .. nr_steps`` with ``dx = (2W + 1) // nr_steps``, the uncovered columns filled
    with the image's smallest value ("black"); ``1e-9`` is added to the denominator. The
    reference map is the method re-run on ``x`` (as Quantus; ``a`` only gives the shape):
    a stored map may differ from a re-run in its last digits, which a near-zero
    denominator would blow up. A translate equal to the image (a shift of 0) scores 0:
    the definition takes ``x' != x``. Lower is more continuous. (Quantus's
    ``patch_size`` option is unused by its own code and is not taken.)"""
    b, h, w = a.shape
    a = prepare(explain(x, y), abs, normalise)
    dx = (2 * w + 1) // nr_steps
    black = x.min(axis=(1, 2, 3), keepdims=True)
    out = score(x) if return_nan_when_prediction_changes else None

    def one(t):
        src = jnp.arange(w) - t
        inside = (src >= 0) & (src < w)
        xs = jnp.where(inside[None, None, :, None], x[:, :, jnp.clip(src, 0, w - 1)], black)
        num = jnp.sum(jnp.abs(a - prepare(explain(xs, y), abs, normalise)).reshape(b, -1), axis=1)
        den = jnp.sqrt(jnp.sum(((x - xs) ** 2).reshape(b, -1), axis=1))
        v = jnp.where(den > 0, num / (den + 1e-9), 0.0)
        if return_nan_when_prediction_changes:
            v = jnp.where(jnp.argmax(score(xs), axis=1) != jnp.argmax(out, axis=1), jnp.nan, v)
        return v
    # Unrolled, as in _over_samples; shifts beyond the width give an all-black image.
    r = jnp.stack([one(min(-w + k * dx, w)) for k in range(1, nr_steps + 1)])  # [S, B]
    return {"score": jnp.nanmax(r, axis=0)}


# ---------------------------------------------------------------- declarations

RERUN = ("explain", "score", "x", "a", "y")


@dataclasses.dataclass(frozen=True)
class SensitivityConfig(Config):
    """Options of avg- and max-sensitivity.

    Attributes:
      nr_samples: noisy copies of each image.
      lower_bound: the uniform noise's half-width, as a fraction of the image's value range.
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
      return_nan_when_prediction_changes: leave out copies whose predicted class changes.
      softmax: score probabilities (false: logits; used to see the prediction change).
    """

    nr_samples: int = option(8, min=1, max=4096)
    lower_bound: float = option(0.2, above=0)
    abs: bool = False
    normalise: bool = False
    return_nan_when_prediction_changes: bool = False
    softmax: bool = False

    _owner = "sensitivity"


@dataclasses.dataclass(frozen=True)
class LipschitzConfig(Config):
    """Options of the local Lipschitz estimate.

    Attributes:
      nr_samples: noisy copies of each image.
      perturb_std: the Gaussian noise's std, as a fraction of the image's value range.
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
      return_nan_when_prediction_changes: leave out copies whose predicted class changes.
      softmax: score probabilities (false: logits).
    """

    nr_samples: int = option(8, min=1, max=4096)
    perturb_std: float = option(0.1, above=0)
    abs: bool = False
    normalise: bool = True
    return_nan_when_prediction_changes: bool = False
    softmax: bool = True

    _owner = "local_lipschitz_estimate"


@dataclasses.dataclass(frozen=True)
class RelativeStabilityConfig(Config):
    """Options of the relative input and output stabilities.

    Attributes:
      nr_samples: noisy copies of each image.
      lower_bound: the smallest noise, as a fraction of the image's value range.
      upper_bound: the largest noise, as a fraction of the image's value range.
      eps_min: the floor of every denominator.
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
      return_nan_when_prediction_changes: leave out copies whose predicted class changes
        (Agarwal et al.: the maximum over perturbations that keep the prediction).
      softmax: score probabilities (false: logits; the output stability's outputs).
    """

    nr_samples: int = option(8, min=1, max=4096)
    lower_bound: float = option(0.02, min=0)
    upper_bound: float = option(0.2, above=0)
    eps_min: float = option(1e-6, above=0)
    abs: bool = False
    normalise: bool = False
    return_nan_when_prediction_changes: bool = True
    softmax: bool = False

    _owner = "relative_stability"


@dataclasses.dataclass(frozen=True)
class ContinuityConfig(Config):
    """Options of continuity.

    Attributes:
      nr_steps: translations along the width.
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
      return_nan_when_prediction_changes: leave out translates whose predicted class changes.
      softmax: score probabilities (false: logits).
    """

    nr_steps: int = option(8, min=1, max=4096)
    abs: bool = True
    normalise: bool = True
    return_nan_when_prediction_changes: bool = False
    softmax: bool = False

    _owner = "continuity"


METRICS = (
    MetricSpec("avg_sensitivity", "robustness", LOWER, RERUN, SensitivityConfig, sensitivity, {"reduce": "mean"},
               doc="Average sensitivity (Yeh et al. 2019)",
               departure="8 samples by default instead of 200; noise is a fraction of the image's value range "
                         "(Quantus's assumes inputs in [0, 1])"),
    MetricSpec("max_sensitivity", "robustness", LOWER, RERUN, SensitivityConfig, sensitivity, {"reduce": "max"},
               doc="Maximum sensitivity (Yeh et al. 2019)",
               departure="as avg_sensitivity"),
    MetricSpec("local_lipschitz_estimate", "robustness", LOWER, RERUN, LipschitzConfig, local_lipschitz_estimate,
               departure="as avg_sensitivity"),
    MetricSpec("relative_input_stability", "robustness", LOWER, RERUN, RelativeStabilityConfig, relative_stability,
               {"of": "input"},
               doc="Relative input stability (Agarwal et al. 2022)",
               departure="the maximum over the perturbations that keep the prediction, as Agarwal et al. 2022; Quantus"
                         " returns NaN for the whole item when any perturbation changes it; noise is a fraction of the"
                         " image's value range"),
    MetricSpec("relative_output_stability", "robustness", LOWER, RERUN, RelativeStabilityConfig, relative_stability,
               {"of": "output"},
               doc="Relative output stability (Agarwal et al. 2022)",
               departure="as relative_input_stability"),
    MetricSpec("continuity", "robustness", LOWER, RERUN, ContinuityConfig, continuity,
               doc="Continuity (Montavon et al. 2018)",
               departure="8 translations by default instead of 28; Quantus's patch_size option is unused by its own "
                         "code and not taken"),
)
