"""Localisation: does the map put its relevance on the object? Maps ``a [B, H, W]``,
object masks ``s [B, H, W]`` (bool). An item with an empty mask scores NaN. Defaults
are Quantus 0.6's (``abs`` and ``normalise`` as its metrics set them)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from convlens.config import Config, option
from convlens.kernels.metrics.base import average_ranks, prepare, sort_rows
from convlens.kernels.metrics.spec import HIGHER, MetricSpec


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
    a, s = _flat(prepare(a, abs, normalise), s)
    r = jax.vmap(average_ranks)(a) + 1.0
    npos = s.sum(axis=1).astype(jnp.float32)
    nneg = s.shape[1] - npos
    u = jnp.sum(r * s, axis=1) - npos * (npos + 1) / 2
    v = u / jnp.maximum(npos * nneg, 1.0)
    return {"score": jnp.where((npos > 0) & (nneg > 0), v, jnp.nan)}


# ---------------------------------------------------------------- declarations

MASKED = ("a", "masks")
_PREP = """
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
"""


def _config(name: str, doc: str, abs_: bool = False, **fields):
    """A localisation metric's config: ``fields`` (name: (default, option kwargs, doc))
    then ``abs`` and ``normalise`` (their defaults as Quantus sets them)."""
    ns = {"__annotations__": {}, "_owner": name}
    lines = []
    for f, (default, kw, text) in fields.items():
        ns["__annotations__"][f] = type(default).__name__
        ns[f] = option(default, **kw)
        lines.append(f"      {f}: {text}")
    ns["__annotations__"].update({"abs": "bool", "normalise": "bool"})
    ns["abs"], ns["normalise"] = abs_, True
    ns["__doc__"] = f"Options of {doc}.\n\n    Attributes:\n" + "\n".join(lines) + (
        "\n" if lines else "") + _PREP.strip("\n").replace("      ", "      ", 1) + "\n    "
    return dataclasses.dataclass(frozen=True)(type(f"{name.title().replace('_', '')}Config", (Config,), ns))


PointingGameConfig = _config("pointing_game", "the pointing game",
                             weighted=(False, {}, "score a hit 1 - the object's area share"))
AttributionLocalisationConfig = _config(
    "attribution_localisation", "attribution localisation", abs_=True,
    weighted=(False, {}, "multiply by the object's area share"),
    positive_attributions=(False, {}, "count positive relevance only"))
TopKIntersectionConfig = _config("top_k_intersection", "the top-k intersection",
                                 k=(1000, {"min": 1}, "how many of the most relevant pixels"),
                                 concept_influence=(False, {}, "divide by the object's area share"))
RelevanceRankAccuracyConfig = _config("relevance_rank_accuracy", "relevance rank accuracy")
RelevanceMassAccuracyConfig = _config("relevance_mass_accuracy", "relevance mass accuracy")
AucConfig = _config("auc", "the ROC AUC of the map against the mask")

METRICS = (
    MetricSpec("pointing_game", "localisation", HIGHER, MASKED, PointingGameConfig, pointing_game),
    MetricSpec("attribution_localisation", "localisation", HIGHER, MASKED, AttributionLocalisationConfig,
               attribution_localisation),
    MetricSpec("top_k_intersection", "localisation", HIGHER, MASKED, TopKIntersectionConfig, top_k_intersection),
    MetricSpec("relevance_rank_accuracy", "localisation", HIGHER, MASKED, RelevanceRankAccuracyConfig,
               relevance_rank_accuracy),
    MetricSpec("relevance_mass_accuracy", "localisation", HIGHER, MASKED, RelevanceMassAccuracyConfig,
               relevance_mass_accuracy),
    MetricSpec("auc", "localisation", HIGHER, MASKED, AucConfig, auc,
               doc="ROC AUC of the map against the object mask (Fawcett 2006)"),
)
