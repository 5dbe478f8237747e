"""Occlusion sensitivity (Zeiler & Fergus 2014): slide a patch over the image and record
how much each target's score drops.

Geometry (Captum's ``Occlusion`` convention): along an axis of length ``D`` with window
``w`` and stride ``s``, windows start at ``0, s, 2s, ...``, ``ceil((D - w) / s) + 1`` of
them, so every pixel is covered; the last window is cut at the image border when the
stride does not tile the image exactly. The window covers every channel.

Outputs per image and target:

* ``sensitivity [B, T, gy, gx]``: ``f(x) - f(x occluded at window (i, j))`` of the
  target's logit (the score before softmax/sigmoid);
* ``prob_drop [B, T, gy, gx]``: the same drop of the model's output probability;
* ``heatmap [B, T, H, W]``: each pixel's mean ``sensitivity`` over the windows covering
  it (Captum's attribution, summed over channels' identical values; 0 where no window
  covers a pixel, possible only with stride > window).

Occluded images are built on the device and evaluated ``chunk`` images per forward pass
(positions x batch), so peak memory follows ``chunk``, not the number of positions; the
result does not depend on ``chunk``.

``incremental=True`` (exact) recomputes, for each window, only the region of each layer
that the patch can change, reading everything else from the unoccluded activations
(Nakandala et al., SIGMOD 2019, "Krypton"); see `convlens.kernels.incremental`.
Two approximations from the same paper: ``tau < 1`` caps that region at ``tau`` of
each layer's map per side, and ``drilldown < 1`` evaluates a coarse sweep first and
then only the most sensitive fraction of the remaining positions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from convlens.config import Config, option
from convlens.errors import OptionError
from convlens.kernels import common
from convlens.kernels.baselines import BASELINE_CHOICES, Pixels, baseline_images, parse_baseline
from convlens.kernels.spec import INPUT_MAP, SAMPLE, TARGET, MethodSpec, Output
from convlens.models.network import Model


@dataclasses.dataclass(frozen=True)
class OcclusionConfig(Config):
    """Options of occlusion sensitivity.

    Attributes:
      window: patch size, ``n`` or ``(h, w)`` pixels.
      stride: step between patches, ``n`` or ``(sy, sx)``.
      baseline: what the patch shows: a pixel value (0 = black), ``"mean"`` (the image's
        mean colour), ``"blur"`` (the image blurred with ``blur_sigma``), or
        ``"image:PATH"`` (a given image, resized to the input).
      blur_sigma: Gaussian sigma in pixels for the ``blur`` baseline.
      chunk: images (positions x batch) per forward pass; 0 picks it from ``memory_mb``.
        Memory, not results.
      memory_mb: peak activation memory per forward pass the automatic chunk aims at.
      incremental: recompute only the patch's projective field at each layer (exact).
      tau: cap the incremental mode's recomputed region at ``tau`` of each map's side
        (approximate when < 1, which turns the incremental mode on; Krypton's projective-field
        threshold).
      drilldown: approximate when < 1 (Krypton's adaptive drill-down): a coarse sweep at
        twice the stride, spread bilinearly over the grid, then only this fraction of the
        remaining positions, those where the coarse drop is largest, evaluated.
    """

    window: int | tuple[int, int] = option(16, min=1, max=1 << 16)
    stride: int | tuple[int, int] = option(8, min=1, max=1 << 16)
    baseline: float | str | Pixels = option(0.0, min=0, max=255, choices=BASELINE_CHOICES)
    blur_sigma: float = option(8.0, above=0)
    chunk: int = option(0, min=0)
    memory_mb: int = option(1024, min=1)
    incremental: bool = False
    tau: float = option(1.0, above=0, max=1)
    drilldown: float = option(1.0, min=0, max=1)

    _owner = "occlusion"

    def __post_init__(self):
        def pair(v):
            if isinstance(v, str):  # "16" or "16x8" from the command line
                v = [int(a) for a in v.lower().split("x")]
                v = v * 2 if len(v) == 1 else v
            return (int(v), int(v)) if isinstance(v, (int, float, np.integer)) else tuple(int(a) for a in v)
        try:
            object.__setattr__(self, "window", pair(self.window))
            object.__setattr__(self, "stride", pair(self.stride))
        except (TypeError, ValueError):
            raise OptionError(f"occlusion window/stride must be n or (h, w); got {self.window!r}, "
                                f"{self.stride!r}") from None
        if len(self.window) != 2 or len(self.stride) != 2:
            raise OptionError("occlusion window and stride must be n or (h, w)")
        object.__setattr__(self, "baseline", parse_baseline(self.baseline, "occlusion"))
        super().__post_init__()
        if self.tau < 1.0:  # an approximation of the incremental mode: it implies it, however it is asked for
            object.__setattr__(self, "incremental", True)


def check_fits(model: Model, cfg: OcclusionConfig) -> None:
    """Refuses a window larger than the input: one position, a constant map, no information."""
    h, w = model.input_size
    if cfg.window[0] > h or cfg.window[1] > w:
        raise OptionError(f"occlusion window {cfg.window[0]}x{cfg.window[1]} is larger than the model's "
                            f"{h}x{w} input: it would cover the whole image at one position (a constant map); "
                            "give a window smaller than the image")


# ---------------------------------------------------------------- geometry

def axis_windows(length: int, window: int, stride: int) -> np.ndarray:
    """Window starts along one axis (Captum's convention; see the module docstring)."""
    w = min(window, length)
    n = math.ceil((length - w) / stride) + 1
    return np.arange(n) * stride


def axis_masks(length: int, window: int, stride: int) -> np.ndarray:
    """``[n, length]`` bool: which pixels each window covers (cut at the border)."""
    starts = axis_windows(length, window, stride)
    idx = np.arange(length)
    return (idx[None, :] >= starts[:, None]) & (idx[None, :] < starts[:, None] + window)


# ---------------------------------------------------------------- the kernel

def brute_force_logits(model: Model, params, images, base, cfg: OcclusionConfig, rows: np.ndarray,
                       cols: np.ndarray, idx):
    """Logits of occluded images: positions ``idx [B, Q]`` (row-major grid indices, per
    image) -> ``[B, Q, K]``, ``chunk`` images per forward pass."""
    b = images.shape[0]
    gx = cols.shape[0]
    per = common.copies_per_step(cfg.chunk, cfg.memory_mb, b, idx.shape[1],
                                 common.image_bytes(model, images.shape[1:3]))
    rows_j, cols_j = jnp.asarray(rows), jnp.asarray(cols)

    def step(p):  # p [B, per]
        m = rows_j[p // gx][:, :, :, None] & cols_j[p % gx][:, :, None, :]  # [B, per, H, W]
        occ = jnp.where(m[..., None], base[:, None], images[:, None])  # [B, per, H, W, C]
        flat = occ.reshape(b * per, *images.shape[1:])
        return common.forward_logits(model, params, flat).reshape(b, per, -1)

    return common.map_steps(step, idx, per)


def evaluate(model: Model, params, images, base, cfg: OcclusionConfig, rows, cols, idx):
    """Logits at grid positions ``idx [B, Q]``: brute force or incremental."""
    if cfg.incremental:
        from convlens.kernels.incremental import incremental_logits
        return incremental_logits(model, params, images, base, cfg, rows, cols, idx)
    return brute_force_logits(model, params, images, base, cfg, rows, cols, idx)


def coarse_to_fine(gy: int, gx: int) -> tuple[np.ndarray, np.ndarray]:
    """The coarse sweep (every other position along each axis, plus the last) and the
    bilinear weights ``[P, Pc]`` that spread its values over the whole grid."""
    ys = np.unique(np.r_[np.arange(0, gy, 2), gy - 1])
    xs = np.unique(np.r_[np.arange(0, gx, 2), gx - 1])
    coarse = (ys[:, None] * gx + xs[None, :]).ravel()

    def axis_weights(n, knots):
        w = np.zeros((n, len(knots)))
        for i in range(n):
            k = np.searchsorted(knots, i, side="right") - 1
            k = min(k, len(knots) - 2) if len(knots) > 1 else 0
            if len(knots) == 1:
                w[i, 0] = 1.0
                continue
            a = (i - knots[k]) / (knots[k + 1] - knots[k])
            w[i, k], w[i, k + 1] = 1 - a, a
        return w
    wy, wx = axis_weights(gy, ys), axis_weights(gx, xs)
    return coarse, np.einsum("ia,jb->ijab", wy, wx).reshape(gy * gx, len(ys) * len(xs))


def occluded_scores(model: Model, params, images, base, cfg: OcclusionConfig, rows, cols, t):
    """Target logits and probabilities of every occluded image, ``[B, P, T]`` each:
    every position evaluated, or (``drilldown < 1``) a coarse sweep spread bilinearly
    and then the positions where it says the drop is largest evaluated exactly."""
    b = images.shape[0]
    gy, gx = rows.shape[0], cols.shape[0]
    positions = gy * gx

    def at(idx):
        occ = evaluate(model, params, images, base, cfg, rows, cols, idx)
        g = jnp.broadcast_to(t[:, None, :], (b, idx.shape[1], t.shape[1]))
        return (jnp.take_along_axis(occ, g, axis=2),
                jnp.take_along_axis(common.probabilities(model, occ), g, axis=2))

    if cfg.drilldown >= 1.0:
        return at(jnp.broadcast_to(jnp.arange(positions), (b, positions)))
    coarse, weights = coarse_to_fine(gy, gx)
    lz_c, pz_c = at(jnp.broadcast_to(jnp.asarray(coarse), (b, len(coarse))))
    wj = jnp.asarray(weights, jnp.float32)
    lz = jnp.einsum("pc,bct->bpt", wj, lz_c)
    pz = jnp.einsum("pc,bct->bpt", wj, pz_c)
    rest = positions - len(coarse)
    k = int(math.ceil(cfg.drilldown * rest))
    if k == 0:
        return lz, pz
    # Where the coarse map's drop (first target) is largest, the fine positions are evaluated.
    clean = jnp.take_along_axis(common.forward_logits(model, params, images), t, axis=1)
    score = jnp.abs(clean[:, None, 0] - lz[:, :, 0]).at[:, coarse].set(-jnp.inf)
    _, fine = jax.lax.top_k(score, k)  # [B, k]
    lz_f, pz_f = at(fine)
    rows_b = jnp.arange(b)[:, None]
    lz = lz.at[:, coarse].set(lz_c).at[rows_b, fine].set(lz_f)
    pz = pz.at[:, coarse].set(pz_c).at[rows_b, fine].set(pz_f)
    return lz, pz


def occlusion(model: Model, params, images, targets, cfg: OcclusionConfig, keys=None):
    """Occlusion sensitivity of ``images [B, H, W, C]``: ``sensitivity`` and
    ``prob_drop [B, T, gy, gx]`` and ``heatmap [B, T, H, W]`` (see the module docstring)."""
    h, w = images.shape[1:3]
    rows = axis_masks(h, cfg.window[0], cfg.stride[0])
    cols = axis_masks(w, cfg.window[1], cfg.stride[1])
    gy, gx = rows.shape[0], cols.shape[0]
    logits = common.forward_logits(model, params, images)
    t = common.select_targets(logits, targets)
    base = baseline_images(images, cfg)
    occ_t, p_occ = occluded_scores(model, params, images, base, cfg, rows, cols, t)  # [B, P, T]
    clean_t = jnp.take_along_axis(logits, t, axis=1)
    sens = (clean_t[:, None, :] - occ_t).transpose(0, 2, 1).reshape(t.shape[0], t.shape[1], gy, gx)
    p_clean = jnp.take_along_axis(common.probabilities(model, logits), t, axis=1)
    pdrop = (p_clean[:, None, :] - p_occ).transpose(0, 2, 1).reshape(sens.shape)
    r, c = jnp.asarray(rows, jnp.float32), jnp.asarray(cols, jnp.float32)
    total = jnp.einsum("btij,iy,jx->btyx", sens, r, c)
    count = jnp.outer(r.sum(0), c.sum(0))
    heat = jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
    return {"sensitivity": sens, "prob_drop": pdrop, "heatmap": heat, "targets": t, "logits": logits}


GRID = (SAMPLE, TARGET, "grid_y", "grid_x")
SPECS = (
    MethodSpec("occlusion", "perturbation", OcclusionConfig, occlusion,
               (Output("sensitivity", GRID, "logit drop per window position"),
                Output("prob_drop", GRID, "probability drop per window position"),
                Output("heatmap", INPUT_MAP, "mean logit drop of the windows covering each pixel")),
               False, "occlusion sensitivity: score drop under a sliding patch", check=check_fits),
)
