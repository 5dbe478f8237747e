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

import jax
import jax.numpy as jnp

from convlens.kernels.metrics.base import prepare


def _draws(kind, key, n, x, amplitude):
    rng = (x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True))[None]
    if kind == "uniform":
        return jax.random.uniform(key, (n, *x.shape), minval=-amplitude, maxval=amplitude) * rng
    return jax.random.normal(key, (n, *x.shape)) * amplitude * rng


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
                normalise=False, return_nan_when_prediction_changes=False, key=None, noises=None):
    """Avg- (``reduce="mean"``) and max-sensitivity (Yeh et al. 2019):
    ``||a(x) - a(x + d)||_F / ||a(x)||_F`` for uniform noise ``d`` in
    ``[-lower_bound, lower_bound]``, averaged or maximised over samples (lower is more
    robust). Quantus divides by the map's norm, not the paper's ``r``; so do we."""
    a = prepare(a, abs, normalise)
    if noises is None:
        noises = _draws("uniform", key, nr_samples, x, lower_bound)
    den = _norm(a)
    r = _over_samples(explain, score, x, y, noises,
                      lambda xs, a_s, o_s, o: _norm(a - prepare(a_s, abs, normalise)) / den,
                      return_nan_when_prediction_changes)
    return {"score": jnp.nanmean(r, axis=0) if reduce == "mean" else jnp.nanmax(r, axis=0)}


def local_lipschitz_estimate(explain, score, x, a, y, *, nr_samples=200, perturb_std=0.1, abs=False,
                             normalise=True, return_nan_when_prediction_changes=False, key=None, noises=None):
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): the largest
    ``||a(x) - a(x')||_2 / ||x - x'||_2`` over Gaussian neighbours ``x'`` (std
    ``perturb_std``); lower is more robust."""
    a = prepare(a, abs, normalise)
    if noises is None:
        noises = _draws("normal", key, nr_samples, x, perturb_std)
    r = _over_samples(explain, score, x, y, noises,
                      lambda xs, a_s, o_s, o: _norm(a - prepare(a_s, abs, normalise)) / _norm(x - xs),
                      return_nan_when_prediction_changes)
    return {"score": jnp.nanmax(r, axis=0)}


def _relative(v, ref, eps):
    return v / (ref + (ref == 0) * eps)


def relative_stability(explain, score, x, a, y, *, of="input", nr_samples=200, lower_bound=0.02, upper_bound=0.2,
                       eps_min=1e-6, abs=False, normalise=False, return_nan_when_prediction_changes=True, key=None,
                       noises=None):
    """Relative input (``of="input"``) and output (``of="output"``) stability (Agarwal et
    al. 2022): the largest ``||(a - a') / a|| / max(||(x - x') / x||, eps)`` (input) or
    ``... / max(||h(x) - h(x')||, eps)`` with ``h`` the model's outputs (output), over
    uniform noise in ``[lower_bound, upper_bound]`` (one-sided, as Quantus draws it);
    relative differences divide by ``eps_min`` where the reference is 0, as Quantus.
    Lower is more stable."""
    a = prepare(a, abs, normalise)
    if noises is None:
        rng = (x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True))[None]
        noises = jax.random.uniform(key, (nr_samples, *x.shape), minval=lower_bound, maxval=upper_bound) * rng

    def per(xs, a_s, o_s, o):
        num = _norm(_relative(a - prepare(a_s, abs, normalise), a, eps_min))
        den = _norm(_relative(x - xs, x, eps_min)) if of == "input" else _norm(o - o_s)
        return num / (den + (den == 0) * eps_min)
    r = _over_samples(explain, score, x, y, noises, per, return_nan_when_prediction_changes,
                      outputs=of == "output")
    return {"score": jnp.nanmax(r, axis=0)}


def continuity(explain, score, x, a, y, *, nr_steps=28, abs=True, normalise=True,
               return_nan_when_prediction_changes=False, key=None):
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
