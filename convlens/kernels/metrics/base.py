"""What the metric families share: map preparation, baselines, scoring perturbed images
in chunks, and batched correlations.

Conventions (every metric of `convlens.kernels.metrics`):

* images ``x [B, H, W, C]`` in the space the scorer takes (convlens: the model's pixels,
  before its preprocessing); maps ``a [B, H, W]``, one value per pixel; targets ``y [B]``.
* A *feature* is a pixel (all its channels at once). Quantus flattens ``C x H x W``
  values with the map broadcast over channels, so its ``features_in_step = C * k``
  is our ``k``.
* ``score(images [N, H, W, C]) -> [N, K]``: the model's scores (probabilities by
  default, as Quantus's ``softmax=True``), a pure function; metrics call it on
  ``chunk``-sized batches inside one compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BASELINES = ("black", "white", "mean", "uniform")


class Scorer:
    """A model's ``score``: ``images [N, H, W, C]`` (pixels) -> ``[N, K]`` logits, or
    (``softmax``) the probabilities the model reports. Metrics call it like any scoring
    function; those whose steps change one patch at a time also use the model inside
    (`convlens.kernels.incremental.patch_curve`) and `finish` its logits."""

    def __init__(self, model, params, softmax: bool):
        self.model, self.params, self.softmax = model, params, softmax

    def finish(self, logits):
        from convlens.kernels.common import probabilities
        return probabilities(self.model, logits) if self.softmax else logits

    def __call__(self, images):
        from convlens.kernels.common import forward_logits
        return self.finish(forward_logits(self.model, self.params, images))


def prepare(a, abs_: bool, normalise: bool):
    """Quantus's map preparation: ``|a|`` if ``abs_``, then divided by ``max |a|`` per
    map if ``normalise`` (a map of zeros is left alone). ``a [B, H, W]``."""
    if abs_:
        a = jnp.abs(a)
    if normalise:
        top = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
        a = jnp.where(top > 0, a / jnp.where(top > 0, top, 1.0), a)
    return a


def need_keys(keys, what: str):
    """``keys``, or a clear error where a draw has none (never a silent fixed key)."""
    if keys is None:
        raise ValueError(f"{what} draws random numbers: give keys [B], one PRNG key per item")
    return keys


def per_item(keys, draw):
    """``draw(key) -> [...]`` for each item's key: ``[B, ...]``. An item's draws come from
    its own key, so they do not depend on the batch it is in."""
    return jax.vmap(draw)(keys)


def sub_keys(keys, i):
    """Each item's key folded with ``i`` (a step, a sample): ``[B]`` keys."""
    return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)


def baseline_value(x, kind: str | float, keys=None):
    """Per-item fill value ``[B, 1, 1, 1]`` for removed pixels: ``black`` / ``white`` the
    image's smallest / largest value, ``mean`` its mean, ``uniform`` a draw between
    them from each item's key (Quantus draws U(0, 1), which assumes inputs in [0, 1]),
    or a number."""
    lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
    hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
    if kind == "black":
        return lo
    if kind == "white":
        return hi
    if kind == "mean":
        return jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    if kind == "uniform":
        u = per_item(need_keys(keys, "baseline='uniform'"), lambda k: jax.random.uniform(k, ()))
        return lo + (hi - lo) * u[:, None, None, None]
    return jnp.full_like(lo, float(kind))


def target_score(score, images, targets):
    """``score`` of each target: ``images [N, H, W, C]``, ``targets [N]`` -> ``[N]``."""
    return jnp.take_along_axis(score(images), targets[:, None], axis=1)[:, 0]


def scan_steps(score, make, steps: int, targets, with_class: bool = False):
    """Scores of the images ``make(s) -> [B, H, W, C]`` for ``s = 0 .. steps - 1``, one
    step (one batch of ``B`` images) per forward pass, without holding all steps'
    images at once. Returns ``[B, steps]`` (and the predicted classes ``[B, steps]``
    with ``with_class``)."""

    def one(s):
        out = score(make(s))
        t = jnp.take_along_axis(out, targets[:, None], axis=1)[:, 0]
        return (t, jnp.argmax(out, axis=1)) if with_class else t

    res = jax.lax.map(one, jnp.arange(steps))
    if with_class:
        return res[0].T, res[1].T
    return res.T


def _int_keys(v):
    """float32 -> int32 keys with the same order (XLA:CPU sorts int32 keys about 3.5x
    faster than floats: no NaN-aware comparator). Negative floats have their 31 lower bits
    flipped so that larger magnitudes come first."""
    v = v.astype(jnp.float32)
    v = jnp.where(v == 0, jnp.float32(0), v)  # -0.0 and +0.0 tie, as in a float sort
    k = jax.lax.bitcast_convert_type(v, jnp.int32)
    return jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k)


def sort_rows(v):
    """Each row of ``v [..., n]`` sorted ascending (float32)."""
    k = jax.lax.sort(_int_keys(v), dimension=v.ndim - 1, is_stable=False)
    return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k), jnp.float32)


def argsort_rows(v, descending: bool = False):
    """Stable argsort of each row of ``v [..., n]`` (ties keep their order)."""
    k = _int_keys(v)
    if descending:
        k = ~k  # reverses the order of int32 keys exactly
    iota = jax.lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 1)
    return jax.lax.sort((k, iota), dimension=v.ndim - 1, is_stable=True, num_keys=1)[1]


def pixel_order(a, descending: bool = True):
    """Pixel indices of maps ``[B, H, W]`` by value, ``[B, H*W]`` (stable: ties keep
    raster order)."""
    return argsort_rows(a.reshape(a.shape[0], -1), descending=descending)


def ranks_of(order):
    """Position of each pixel in ``order [B, P]``: ``[B, P]``."""
    b, p = order.shape
    return jnp.zeros((b, p), jnp.int32).at[jnp.arange(b)[:, None], order].set(jnp.arange(p, dtype=jnp.int32)[None])


def pearson(a, b, axis=-1):
    """Pearson correlation along ``axis`` (NaN where either side is constant, as scipy)."""
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    den = jnp.sqrt(jnp.sum(a * a, axis) * jnp.sum(b * b, axis))
    return jnp.where(den > 0, jnp.sum(a * b, axis) / jnp.where(den > 0, den, 1.0), jnp.nan)


def average_ranks(x):
    """Ranks of a vector ``[n]`` (from 0) with ties given their average rank (as
    Spearman's rho needs): ``#(x < v) + (#(x == v) - 1) / 2``, counted by binary search in
    the sorted values (a sort of values alone is much faster than an argsort on CPU)."""
    xs = sort_rows(x)
    v = jnp.where(x == 0, 0.0, x).astype(jnp.float32)
    below = jnp.searchsorted(xs, v, side="left")
    upto = jnp.searchsorted(xs, v, side="right")
    return below.astype(jnp.float32) + (upto - below - 1).astype(jnp.float32) / 2


def spearman_rows(a, b):
    """Spearman correlation (ties averaged) of ``a, b [B, n]`` row by row (NaN where a row
    is constant)."""
    return pearson(jax.vmap(average_ranks)(a), jax.vmap(average_ranks)(b))


def spearman(a, b):
    """Spearman rank correlation (ties averaged) of maps ``[..., H, W]`` per leading index;
    0 where a map is constant."""
    fa = a.reshape(-1, a.shape[-2] * a.shape[-1])
    fb = b.reshape(-1, b.shape[-2] * b.shape[-1])
    rho = spearman_rows(fa, fb)
    return jnp.where(jnp.isnan(rho), 0.0, rho).reshape(a.shape[:-2])


def trapezoid(curve, axis=-1):
    """Area under a curve with unit spacing (Quantus's ``calculate_auc``)."""
    return jnp.trapezoid(curve, dx=1.0, axis=axis)
