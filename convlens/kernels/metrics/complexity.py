"""Complexity: how concentrated is a map? Maps ``a [B, H, W]``; Quantus 0.6's defaults
(``abs`` and ``normalise`` on)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from convlens.config import Config, option
from convlens.kernels.metrics.base import prepare, sort_rows
from convlens.kernels.metrics.spec import HIGHER, LOWER, MetricSpec


def sparseness(a, *, abs=True, normalise=True):
    """Sparseness (Chalasani et al. 2020): the Gini index of the (absolute) relevance,
    ``sum_i (2i - n - 1) a_(i) / (n sum a)`` over the ascending values ``a_(i)`` (with
    Quantus's ``1e-7`` added so an empty map is defined); 1 is one pixel, 0 uniform."""
    a = prepare(a, abs, normalise)
    v = sort_rows(a.reshape(a.shape[0], -1) + 1e-7)
    n = v.shape[1]
    i = jnp.arange(1, n + 1, dtype=v.dtype)
    return {"score": jnp.sum((2 * i - n - 1) * v, axis=1) / (n * v.sum(axis=1))}


def complexity(a, *, abs=True, normalise=True):
    """Complexity (Bhatt et al. 2020): the entropy of the map's fractional relevance
    ``|a_i| / sum |a|`` (natural log; lower is simpler)."""
    a = prepare(a, abs, normalise)
    v = a.reshape(a.shape[0], -1)
    p = v / jnp.abs(v).sum(axis=1, keepdims=True)
    return {"score": -jnp.sum(p * jnp.log(p + 1e-12), axis=1)}


def effective_complexity(a, *, eps=1e-5, abs=True, normalise=True):
    """Effective complexity (Nguyen & Martínez 2020): how many pixels have relevance
    above ``eps``."""
    a = prepare(a, abs, normalise)
    return {"score": jnp.sum(a.reshape(a.shape[0], -1) > eps, axis=1).astype(jnp.float32)}


# ---------------------------------------------------------------- declarations

@dataclasses.dataclass(frozen=True)
class PrepareConfig(Config):
    """Options of sparseness and complexity.

    Attributes:
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
    """

    abs: bool = True
    normalise: bool = True

    _owner = "complexity"


@dataclasses.dataclass(frozen=True)
class EffectiveComplexityConfig(Config):
    """Options of effective complexity.

    Attributes:
      eps: relevance above this counts.
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
    """

    eps: float = option(1e-5, min=0)
    abs: bool = True
    normalise: bool = True

    _owner = "effective_complexity"


METRICS = (
    MetricSpec("sparseness", "complexity", HIGHER, ("a",), PrepareConfig, sparseness),
    MetricSpec("complexity", "complexity", LOWER, ("a",), PrepareConfig, complexity),
    MetricSpec("effective_complexity", "complexity", LOWER, ("a",), EffectiveComplexityConfig, effective_complexity),
)
