"""Axioms an attribution can satisfy (on ``x [B, H, W, C]``, maps ``a [B, H, W]``)."""

from __future__ import annotations

import math

import jax.numpy as jnp

from convlens.kernels.metrics.base import baseline_value, prepare, scan_steps, target_score


def completeness(score, x, a, y, *, baseline="black", abs=False, normalise=False, rtol=1e-3, key=None):
    """Completeness (Sundararajan et al. 2017): the relevance sums to the output's change
    from the baseline image, ``sum(a) = f(x) - f(x0)``. ``score`` is 1 where it does
    within ``rtol`` and ``gap`` the relative difference. Quantus compares with ``==``
    (floats: never true but for exact arithmetic) and normalises the map first, which
    breaks the sum; we default to no normalisation and a tolerance."""
    a = prepare(a, abs, normalise)
    f0 = target_score(score, x, y)
    fb = target_score(score, jnp.broadcast_to(baseline_value(x, baseline), x.shape), y)
    total = a.reshape(a.shape[0], -1).sum(axis=1)
    gap = jnp.abs(total - (f0 - fb)) / jnp.maximum(jnp.abs(f0 - fb), 1e-12)
    return {"score": (gap <= rtol).astype(jnp.float32), "gap": gap}


def non_sensitivity(score, x, a, y, *, eps=1e-5, features_in_step=1, baseline="black", abs=True, normalise=True,
                    key=None):
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
    base = baseline_value(x, baseline)
    f0 = target_score(score, x, y)
    fs = scan_steps(score, lambda s: jnp.where((pix == s)[None, ..., None], base, x), n, y)
    unchanged = jnp.abs(fs - f0[:, None]) < eps  # [B, n]
    no_rel = a.reshape(b, -1) < eps
    per_pixel = unchanged[:, pix.reshape(-1)]
    return {"score": jnp.sum(per_pixel ^ no_rel, axis=1).astype(jnp.float32)}


def input_invariance(explain_shifted, explain, x, y, *, shift=-1.0, atol=1e-5, abs=False, normalise=False):
    """Input invariance (Kindermans et al. 2017): a constant ``shift`` of the input,
    compensated in the first layer's bias so the model's outputs do not change, should
    not change the map. ``explain_shifted(x + shift, y)`` runs the method on the
    compensated model. ``score`` is 1 where the maps agree within ``atol``, ``gap``
    their largest difference. (Quantus 0.6 shifts every pixel but the first: its
    ``perturb_batch`` drops each item's first index.)"""
    a1 = prepare(explain(x, y), abs, normalise)
    a2 = prepare(explain_shifted(x + shift, y), abs, normalise)
    gap = jnp.max(jnp.abs(a1 - a2).reshape(a1.shape[0], -1), axis=1)
    return {"score": (gap <= atol).astype(jnp.float32), "gap": gap}
