"""Faithfulness metrics: how much an explanation map agrees with what the model does.

* Deletion and insertion curves (Petsiuk et al. 2018, RISE): pixels are removed from the
  image (deletion) or added to a blank image (insertion) in the order of the map, most
  salient first, ``steps`` equal slices at a time; the curve is the target's
  probability after each slice (``steps + 1`` points, the first on the untouched
  image) and its area (trapezoid rule over [0, 1]) is the score: low for deletion and
  high for insertion mean a faithful map. Removed pixels take the ``replacement``:
  a constant pixel value, or the image blurred (Gaussian, ``blur_sigma``).
* Average drop and increase in confidence (Chattopadhay et al. 2018, Grad-CAM++): the
  image is kept only where the map says (``x * m + r * (1 - m)`` with the map scaled
  to [0, 1] and ``r`` the replacement); ``drop = max(0, p - p_kept) / p`` and
  ``increase = p_kept > p``, averaged over items by ``convlens compare``.

All evaluations are batched on the device, ``chunk`` images per forward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from convlens.errors import ConvlensError
from convlens.kernels import common
from convlens.kernels.baselines import gaussian_blur
from convlens.models.network import Model


@dataclasses.dataclass(frozen=True)
class FaithfulnessConfig:
    """Options of the faithfulness metrics.

    Attributes:
      steps: slices of the deletion / insertion curves.
      replacement: ``"blur"`` or a pixel value for removed pixels.
      blur_sigma: sigma in pixels of the blurred replacement.
      chunk: images per forward pass (memory only).
    """

    steps: int = 32
    replacement: float | str = "blur"
    blur_sigma: float = 10.0
    chunk: int = 32

    def __post_init__(self):
        if self.steps < 1 or self.chunk < 1:
            raise ConvlensError("faithfulness metrics need steps >= 1 and chunk >= 1")
        if isinstance(self.replacement, str) and self.replacement != "blur":
            try:
                object.__setattr__(self, "replacement", float(self.replacement))
            except ValueError:
                raise ConvlensError(f"replacement {self.replacement!r}: 'blur' or a pixel value") from None


def replacement_images(images, cfg: FaithfulnessConfig):
    if cfg.replacement == "blur":
        return gaussian_blur(images, cfg.blur_sigma)
    return jnp.full_like(images, float(cfg.replacement))


def _target_probs(model, params, images, targets, chunk):
    """``images [M, H, W, C]``, ``targets [M]`` -> probability of each target, ``chunk`` at a time."""
    m = images.shape[0]
    n = -(-m // chunk)
    pad = n * chunk - m
    x = jnp.concatenate([images, jnp.repeat(images[-1:], pad, axis=0)]) if pad else images
    t = jnp.concatenate([targets, jnp.repeat(targets[-1:], pad)]) if pad else targets

    def one(args):
        xs, ts = args
        p = common.probabilities(model, common.forward_logits(model, params, xs))
        return jnp.take_along_axis(p, ts[:, None], axis=1)[:, 0]
    out = jax.lax.map(one, (x.reshape(n, chunk, *x.shape[1:]), t.reshape(n, chunk)))
    return out.reshape(-1)[:m]


def pixel_ranks(maps):
    """Rank of each pixel by its map value, most salient first: ``[..., H, W]`` ints
    (ties broken by position, so the order is fully determined)."""
    flat = maps.reshape(*maps.shape[:-2], -1)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return ranks.reshape(maps.shape)


def deletion_insertion(model: Model, params, images, maps, targets, cfg: FaithfulnessConfig):
    """Deletion and insertion curves and their areas.

    Args:
      images: pixels ``[B, H, W, C]``.
      maps: explanation maps ``[B, T, H, W]`` (at input resolution).
      targets: ``[B, T]`` classes the maps explain.

    Returns:
      ``deletion``, ``insertion`` ``[B, T, steps + 1]`` and ``deletion_auc``,
      ``insertion_auc`` ``[B, T]``.
    """
    b, t = targets.shape
    h, w = images.shape[1:3]
    rep = replacement_images(images, cfg)
    ranks = pixel_ranks(maps)  # [B, T, H, W]
    counts = jnp.asarray(np.round(np.linspace(0, h * w, cfg.steps + 1)).astype(np.int32))  # pixels moved per point
    moved = ranks[:, :, None] < counts[None, None, :, None, None]  # [B, T, S+1, H, W]
    x = images[:, None, None]
    r = rep[:, None, None]
    deleted = jnp.where(moved[..., None], r, x)
    inserted = jnp.where(moved[..., None], x, r)
    tt = jnp.broadcast_to(targets[:, :, None], (b, t, cfg.steps + 1)).reshape(-1)
    both = jnp.concatenate([deleted.reshape(-1, h, w, images.shape[-1]), inserted.reshape(-1, h, w, images.shape[-1])])
    p = _target_probs(model, params, both, jnp.concatenate([tt, tt]), cfg.chunk)
    dcurve, icurve = p[:tt.shape[0]].reshape(b, t, -1), p[tt.shape[0]:].reshape(b, t, -1)
    frac = counts.astype(jnp.float32) / (h * w)
    return {"deletion": dcurve, "insertion": icurve, "deletion_auc": jnp.trapezoid(dcurve, frac, axis=-1),
            "insertion_auc": jnp.trapezoid(icurve, frac, axis=-1)}


def normalise_maps(maps):
    """Maps ``[..., H, W]`` scaled to [0, 1] per map (negative values clipped to 0)."""
    m = jnp.maximum(maps, 0.0)
    top = jnp.max(m, axis=(-2, -1), keepdims=True)
    return jnp.where(top > 0, m / jnp.where(top > 0, top, 1.0), 0.0)


def keep_explained(model: Model, params, images, maps, targets, cfg: FaithfulnessConfig):
    """Average-drop ingredients: probability of each target on the image and on the image
    kept only where the map says. Returns ``p``, ``p_kept``, ``drop`` (``max(0, p -
    p_kept) / p``) and ``increase`` (1 where ``p_kept > p``), each ``[B, T]``."""
    b, t = targets.shape
    m = normalise_maps(maps)[..., None]  # [B, T, H, W, 1]
    rep = replacement_images(images, cfg)
    kept = images[:, None] * m + rep[:, None] * (1.0 - m)
    logits = common.forward_logits(model, params, images)
    p = jnp.take_along_axis(common.probabilities(model, logits), targets, axis=1)
    pk = _target_probs(model, params, kept.reshape(-1, *images.shape[1:]), targets.reshape(-1),
                       cfg.chunk).reshape(b, t)
    drop = jnp.maximum(p - pk, 0.0) / jnp.maximum(p, 1e-12)
    return {"p": p, "p_kept": pk, "drop": drop, "increase": (pk > p).astype(jnp.float32)}


def faithfulness(model: Model, params, images, maps, targets, cfg: FaithfulnessConfig) -> dict:
    """`deletion_insertion` and `keep_explained` together (one compiled call)."""
    return {**deletion_insertion(model, params, images, maps, targets, cfg),
            **keep_explained(model, params, images, maps, targets, cfg)}


def average_ranks(x):
    """Ranks of a vector ``[n]`` (from 0) with ties given their average rank (as
    Spearman's rho needs): ``#(x < v) + (#(x == v) - 1) / 2``, counted by binary search in
    the sorted values (a sort of values alone is much faster than an argsort on CPU)."""
    from convlens.kernels.metrics.base import sort_rows
    xs = sort_rows(x)
    v = jnp.where(x == 0, 0.0, x).astype(jnp.float32)
    below = jnp.searchsorted(xs, v, side="left")
    upto = jnp.searchsorted(xs, v, side="right")
    return below.astype(jnp.float32) + (upto - below - 1).astype(jnp.float32) / 2


def spearman(a, b):
    """Spearman rank correlation (ties averaged) of maps ``[..., H, W]`` per leading index;
    0 where a map is constant."""
    fa = a.reshape(-1, a.shape[-2] * a.shape[-1])
    fb = b.reshape(-1, b.shape[-2] * b.shape[-1])
    ra, rb = jax.vmap(average_ranks)(fa), jax.vmap(average_ranks)(fb)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = jnp.sqrt(jnp.sum(ra * ra, -1) * jnp.sum(rb * rb, -1))
    rho = jnp.where(den > 0, jnp.sum(ra * rb, -1) / jnp.where(den > 0, den, 1.0), 0.0)
    return rho.reshape(a.shape[:-2])
