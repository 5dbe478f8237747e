"""Controls: maps that know nothing of the model, for scoring the methods against.

A quality metric says something about a method on a data set only where the method beats
a map that could not have learned anything (Adebayo et al. 2018; Hedström et al. 2023):

* ``control_random``: uniform noise, drawn from the item's key (the same map for every
  target, and for every copy of the image a metric makes: it ignores the input);
* ``control_sobel``: the gradient magnitude of the grey image (Sobel), an edge detector
  that looks at the input alone.

They are registered methods like any other (family ``control``): `convlens audit`
computes every quality metric for them beside the audited methods, and they can be run,
stored and drawn as methods too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from convlens.config import Config
from convlens.kernels import common
from convlens.kernels.spec import INPUT_MAP, MethodSpec, Output


@dataclasses.dataclass(frozen=True)
class ControlConfig(Config):
    """Controls take no options."""


def _targets(model, params, images, targets):
    logits = common.forward_logits(model, params, images)
    return common.select_targets(logits, targets), logits


def control_random(model, params, images, targets, cfg: ControlConfig, keys) -> dict:
    """A uniform random map per image from its key: ``heatmap [B, T, H, W]``."""
    t, logits = _targets(model, params, images, targets)
    maps = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 7), images.shape[1:3]))(keys)
    return {"heatmap": jnp.broadcast_to(maps[:, None], (t.shape[0], t.shape[1], *maps.shape[1:])), "targets": t,
            "logits": logits}


def sobel(images):
    """The gradient magnitude of the grey image (Sobel, edge-replicated borders):
    ``[B, H, W, C]`` -> ``[B, H, W]``."""
    g = images.mean(axis=-1)
    p = jnp.pad(g, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    return jnp.sqrt(gx * gx + gy * gy)


def control_sobel(model, params, images, targets, cfg: ControlConfig, keys) -> dict:
    """The Sobel edge map of each image: ``heatmap [B, T, H, W]``."""
    t, logits = _targets(model, params, images, targets)
    maps = sobel(images)
    return {"heatmap": jnp.broadcast_to(maps[:, None], (t.shape[0], t.shape[1], *maps.shape[1:])), "targets": t,
            "logits": logits}


_MAP = (Output("heatmap", INPUT_MAP, "the control's map (the same for every target)"),)

SPECS = (
    MethodSpec("control_random", "control", ControlConfig, control_random, _MAP, True,
               "a uniform random map (a control: knows nothing of the model or the image)"),
    MethodSpec("control_sobel", "control", ControlConfig, control_sobel, _MAP, False,
               "the image's Sobel edges (a control: looks at the input alone)"),
)
