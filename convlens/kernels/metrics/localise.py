"""Localisation: does the map put its relevance on the object? Maps ``a [B, H, W]``,
object masks ``s [B, H, W]`` (bool). An item with an empty mask scores NaN. Defaults
are Quantus 0.6's (``abs`` and ``normalise`` as its metrics set them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from convlens.kernels.metrics.base import prepare


def _flat(a, s):
    b = a.shape[0]
    return a.reshape(b, -1), s.reshape(b, -1).astype(bool)


def _nan_empty(v, s):
    return jnp.where(s.any(axis=1), v, jnp.nan)


def pointing_game(a, s, *, weighted=False, abs=False, normalise=True):
    """Pointing game (Zhang et al. 2018): 1 where a pixel of the map's maximum lies on the
    object; ``weighted`` scores a hit ``1 - object area share`` (small objects count more)."""
    a, s = _flat(prepare(a, abs, normalise), s)
    hit = jnp.any(s & (a == a.max(axis=1, keepdims=True)), axis=1).astype(jnp.float32)
    if weighted:
        hit = jnp.where(hit > 0, 1.0 - s.mean(axis=1), 0.0)
    return {"score": _nan_empty(hit, s)}


def attribution_localisation(a, s, *, weighted=False, positive_attributions=False, abs=True, normalise=True):
    """Attribution localisation (Kohlbrenner et al. 2020): the share of the map's total
    relevance inside the object; NaN where it exceeds 1 (negative relevance outside), as
    Quantus. ``weighted`` multiplies by the object's area share."""
    a = prepare(a, abs, normalise)
    if positive_attributions:
        a = jnp.maximum(a, 0.0)
    a, s = _flat(a, s)
    r = jnp.sum(a * s, axis=1) / (a.sum(axis=1) + 1e-9)
    r = jnp.where(r > 1, jnp.nan, r)
    if weighted:
        r = r * s.mean(axis=1)
    return {"score": _nan_empty(r, s)}


def top_k_intersection(a, s, *, k=1000, concept_influence=False, abs=False, normalise=True):
    """Top-k intersection (Theiner et al. 2021): the share of the ``k`` most relevant
    pixels on the object (``concept_influence`` divides by the object's area share)."""
    a, s = _flat(prepare(a, abs, normalise), s)
    k = min(int(k), a.shape[1])
    top = jax.lax.top_k(a, k)[1]
    r = jnp.take_along_axis(s, top, axis=1).mean(axis=1)
    if concept_influence:
        r = r * a.shape[1] / jnp.maximum(s.sum(axis=1), 1)
    return {"score": _nan_empty(r, s)}


def relevance_rank_accuracy(a, s, *, abs=False, normalise=True):
    """Relevance rank accuracy (Arras et al. 2022): of the ``K`` most relevant pixels,
    ``K`` the object's size, the share on the object (ties at the K-th value taken in
    raster order, as a stable sort takes them)."""
    from convlens.kernels.metrics.base import sort_rows
    a, s = _flat(prepare(a, abs, normalise), s)
    a = jnp.where(a == 0, 0.0, a)
    k = s.sum(axis=1)
    desc = sort_rows(a)[:, ::-1]
    t = jnp.take_along_axis(desc, jnp.maximum(k - 1, 0)[:, None], axis=1)  # the K-th largest value
    above = a > t
    tied = a == t
    room = k[:, None] - above.sum(axis=1, keepdims=True)  # how many tied pixels make the top K
    take = above | (tied & (jnp.cumsum(tied, axis=1) <= room))
    return {"score": _nan_empty(jnp.sum(take & s, axis=1) / jnp.maximum(k, 1), s)}


def relevance_mass_accuracy(a, s, *, abs=False, normalise=True):
    """Relevance mass accuracy (Arras et al. 2022): relevance inside the object over the
    total."""
    a, s = _flat(prepare(a, abs, normalise), s)
    return {"score": _nan_empty(jnp.sum(a * s, axis=1) / a.sum(axis=1), s)}


def auc(a, s, *, abs=False, normalise=True):
    """Area under the ROC curve of the map as a detector of object pixels (Fawcett 2006):
    the Mann-Whitney statistic, ties counted half (as scikit-learn's ``roc_curve`` and
    ``auc``)."""
    from convlens.kernels.metrics import average_ranks
    a, s = _flat(prepare(a, abs, normalise), s)
    r = jax.vmap(average_ranks)(a) + 1.0
    npos = s.sum(axis=1).astype(jnp.float32)
    nneg = s.shape[1] - npos
    u = jnp.sum(r * s, axis=1) - npos * (npos + 1) / 2
    v = u / jnp.maximum(npos * nneg, 1.0)
    return {"score": jnp.where((npos > 0) & (nneg > 0), v, jnp.nan)}
