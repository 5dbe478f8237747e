"""Shapley sampling: GradientShap (expected gradients) and KernelSHAP over superpixels.

GradientShap (Lundberg & Lee 2017; Erion et al. 2021, as Captum's ``GradientShap``):
for each of ``samples`` draws, a reference ``r`` from a set of references and a point
``a`` uniform in [0, 1]; the attribution is the mean of ``(x - r) * grad f(r + a (x - r))``
over the draws, whose expectation sums to ``f(x) - E[f(r)]``. Draw ``s`` of image ``b``
takes its reference index and its point from ``fold_in(keys[b], s)``, so the key fixes
the result, whatever the batch or chunk. The references are DeepLiftShap's (uniform
noise images by default: `convlens.kernels.propagation.references`).

KernelSHAP (Lundberg & Lee 2017, as shap's ``KernelExplainer``): the players are LIME's
superpixels, a coalition shows its superpixels and the baseline elsewhere, and the
Shapley values are the weighted least-squares fit of the target's score on the
coalitions under the Shapley kernel, constrained to sum to ``f(all) - f(none)``. With
few superpixels (``2^features - 2 <= samples``, at most 12) every coalition is evaluated, and the
fit is the exact Shapley values; otherwise ``samples`` coalitions are drawn from the
kernel's size distribution, each with its complement (paired sampling), from
``fold_in(keys[b], i)``. Coalitions are evaluated on the device, ``chunk`` images per
forward pass, as LIME's are.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from convlens.config import Config, option
from convlens.kernels import common
from convlens.kernels.baselines import BASELINE_CHOICES, baseline_pixels, parse_baseline
from convlens.kernels.propagation import references
from convlens.kernels.sampling import SEGMENTATIONS, segment_mean_images, segments
from convlens.kernels.spec import INPUT_ATTR, INPUT_MAP, SAMPLE, TARGET, MethodSpec, Output
from convlens.models.network import Model


@dataclasses.dataclass(frozen=True)
class GradientShapConfig(Config):
    """GradientShap (expected gradients), as Captum's GradientShap.

    Attributes:
      samples: draws (reference, point on the path) per image.
      background: the references: ``noise``, ``blur`` or ``constant`` (see deeplift_shap).
      references: how many references the draws choose from.
      noise: standard deviation of Gaussian noise added to the image per draw, as a
        fraction of the pixel range (Captum's ``stdevs``; 0: none).
      chunk: images (draws x batch) per forward/backward pass: memory, not results.
    """

    samples: int = option(16, min=1)
    background: str = option("noise", choices=("noise", "blur", "constant"))
    references: int = option(8, min=1)
    noise: float = option(0.0, min=0, max=10)
    chunk: int = option(16, min=1)

    _owner = "gradient_shap"


def _terms(model, params, images, targets, refs, alphas, noise=None):
    """``(x_s - r_s) * grad f(r_s + a_s (x_s - r_s))`` per draw: ``[S, B, T, H, W, C]``."""
    s, b = alphas.shape
    x = images[None] if noise is None else images[None] + noise
    x = jnp.broadcast_to(x, refs.shape)
    a = alphas[..., None, None, None]
    points = (refs + a * (x - refs)).reshape(s * b, *images.shape[1:])
    g = common.input_gradients(model, params, points, jnp.tile(targets, (s, 1)))[2]
    g = g.reshape(s, b, *g.shape[1:])
    return g * (x - refs)[:, :, None]


def gradient_shap_with(model: Model, params, images, targets, refs, alphas, noise=None):
    """``mean_s (x_s - r_s) * grad f(r_s + a_s (x_s - r_s))`` with ``x_s = images +
    noise[s]``: ``images [B, H, W, C]``, ``refs [S, B, H, W, C]``, ``alphas [S, B]``,
    ``noise`` ``[S, B, H, W, C]`` or None; targets ``[B, T]``. Returns
    ``[B, T, H, W, C]`` (all draws in one pass)."""
    return jnp.mean(_terms(model, params, images, targets, refs, alphas, noise), axis=0)


def gradient_shap(model: Model, params, images, targets, cfg: GradientShapConfig, keys):
    """GradientShap: ``attribution [B, T, H, W, C]``, ``heatmap`` = channel sum."""
    logits = common.forward_logits(model, params, images)
    t = common.select_targets(logits, targets)
    refs = references(images, keys, cfg.background, cfg.references)  # [R, B, H, W, C]
    per = max(1, min(cfg.samples, cfg.chunk // max(images.shape[0], 1)))
    n = -(-cfg.samples // per) * per

    def draw(k, s):
        k = jax.random.fold_in(k, s)
        ki, ka, kn = jax.random.split(k, 3)
        return (jax.random.randint(ki, (), 0, cfg.references), jax.random.uniform(ka),
                cfg.noise * 255.0 * jax.random.normal(kn, images.shape[1:]))

    def body(acc, s):  # draws s [per]
        idx, alpha, noise = jax.vmap(lambda si: jax.vmap(lambda k: draw(k, si))(keys))(s)  # [per, B], ...
        r = jnp.take_along_axis(jnp.moveaxis(refs, 0, 1), jnp.moveaxis(idx, 0, 1)[..., None, None, None],
                                axis=1)  # [B, per, H, W, C]
        keep = (s < cfg.samples).astype(jnp.float32)  # padded draws beyond `samples` weigh nothing
        terms = _terms(model, params, images, t, jnp.moveaxis(r, 1, 0), alpha, noise if cfg.noise > 0 else None)
        return acc + jnp.tensordot(keep, terms, 1), None

    init = jnp.zeros((*t.shape, *images.shape[1:]), jnp.float32)
    total, _ = jax.lax.scan(body, init, jnp.arange(n).reshape(-1, per), unroll=True)
    attr = total / cfg.samples
    return {"attribution": attr, "heatmap": jnp.sum(attr, axis=-1), "targets": t, "logits": logits}


# ---------------------------------------------------------------- KernelSHAP

# Up to this many superpixels every coalition may be evaluated (4094 forward passes).
MAX_EXACT = 12
RIDGE = 1e-4


@dataclasses.dataclass(frozen=True)
class KernelShapConfig(Config):
    """KernelSHAP over superpixels, as shap's KernelExplainer.

    Attributes:
      samples: coalitions per image (beyond the empty and the full one); when
        ``2^features - 2 <= samples`` (and features <= 12) every coalition is evaluated
        and the values are exact.
      features: the most superpixels an image is cut into (the players).
      segmentation: ``slic`` (scikit-image's SLIC on the image) or ``grid``.
      compactness: SLIC's colour / space trade-off.
      baseline: what an absent superpixel shows: ``segment_mean`` (its mean colour), a
        pixel value, ``mean``, ``blur`` or ``image:PATH``.
      blur_sigma: Gaussian sigma (pixels) of the ``blur`` baseline.
      score: what is explained: each target's ``logit`` or its ``prob``.
      chunk: masked images per forward pass; 0 picks it from ``memory_mb``.
      memory_mb: activation memory per forward pass the automatic chunk aims at.
    """

    samples: int = option(2048, min=2)
    features: int = option(49, min=2, max=4096)
    segmentation: str = option("slic", choices=SEGMENTATIONS)
    compactness: float = option(10.0, above=0)
    baseline: float | str = option("segment_mean", min=0, max=255, choices=("segment_mean",) + BASELINE_CHOICES)
    blur_sigma: float = option(8.0, above=0)
    score: str = option("logit", choices=("logit", "prob"))
    chunk: int = option(0, min=0)
    memory_mb: int = option(1024, min=1)

    _owner = "kernelshap"

    def __post_init__(self):
        object.__setattr__(self, "baseline", parse_baseline(self.baseline, "kernelshap", ("segment_mean",)))
        super().__post_init__()

    @property
    def exact(self) -> bool:
        return self.features <= MAX_EXACT and 2 ** self.features - 2 <= self.samples


def shapley_kernel(m: int, k):
    """The Shapley kernel's weight of one coalition of ``k`` of ``m`` players (0 < k < m)."""
    return (m - 1) / (math.comb(m, int(k)) * k * (m - k))


def all_coalitions(m: int):
    """Every coalition but the empty and the full one, ``[2^m - 2, m]`` float32, and its
    Shapley kernel weight ``[2^m - 2]`` (normalised)."""
    z = np.asarray([bits for bits in itertools.product((0, 1), repeat=m) if 0 < sum(bits) < m], np.float32)
    w = np.asarray([shapley_kernel(m, k) for k in z.sum(1)], np.float64)
    return z, (w / w.sum()).astype(np.float32)


def sampled_coalitions(keys, n: int, m: int):
    """``n`` coalitions per image ``[B, n, m]``: pairs of a coalition and its complement,
    the first's size drawn from the Shapley kernel's size distribution ``p(k) ~ (m - 1) /
    (k (m - k))`` and its members uniformly, from ``fold_in(keys[b], pair)``. Equal
    weights: the kernel is in the draw."""
    sizes = np.arange(1, m)
    p = (m - 1) / (sizes * (m - sizes))
    logp = jnp.asarray(np.log(p / p.sum()), jnp.float32)

    def one(k, i):
        ks, kp = jax.random.split(jax.random.fold_in(k, i))
        size = jax.random.categorical(ks, logp) + 1
        rank = jnp.argsort(jnp.argsort(jax.random.uniform(kp, (m,))))
        return (rank < size).astype(jnp.float32)
    pairs = jax.vmap(lambda k: jax.vmap(lambda i: one(k, i))(jnp.arange((n + 1) // 2)))(keys)  # [B, n/2, m]
    return jnp.stack([pairs, 1.0 - pairs], axis=2).reshape(keys.shape[0], -1, m)[:, :n]


def constrained_fit(z, y, w, y0, y1, free):
    """Shapley values from coalitions: minimise ``sum_n w_n (y_n - y0 - z_n . phi)^2``
    subject to ``sum phi = y1 - y0``, with ``phi_j = 0`` where ``free`` is false (shap's
    KernelExplainer fit, solved through its KKT system with a `RIDGE` too small to move
    a determined solution by more than ~1e-4 of itself).

    Args:
      z: coalitions ``[B, N, S]``; y: their scores ``[B, N, T]``; w: weights ``[B, N]``;
      y0, y1: scores of the empty and the full coalition ``[B, T]``; free ``[B, S]``.

    Returns:
      ``phi [B, T, S]``.
    """
    b, _, s = z.shape
    fz = jnp.where(free[:, None, :], z, 0.0)
    a = jnp.einsum("bn,bni,bnj->bij", w, fz, fz)
    # Few drawn coalitions (each with its complement) can leave directions of phi
    # undetermined, where float32 rounding would decide: a ridge of 1e-4 of the mean
    # diagonal picks the smallest solution there and moves determined ones by ~1e-4.
    a = a + RIDGE * jnp.mean(jnp.diagonal(a, axis1=1, axis2=2), axis=1)[:, None, None] * jnp.eye(s)
    fixed = jnp.logical_not(free).astype(z.dtype)
    a = a + fixed[:, :, None] * jnp.eye(s)  # phi_j = 0 rows for unused superpixels
    one = free.astype(z.dtype)
    kkt = jnp.concatenate([jnp.concatenate([a, one[:, :, None]], 2),
                           jnp.concatenate([one[:, None, :], jnp.zeros((b, 1, 1), z.dtype)], 2)], 1)
    rhs = jnp.concatenate([jnp.einsum("bn,bni,bnt->bit", w, fz, y - y0[:, None]), (y1 - y0)[:, None, :]], 1)
    sol = jnp.linalg.solve(kkt, rhs)  # [B, S + 1, T]
    return jnp.moveaxis(sol[:, :s], 1, 2)


def kernel_shap(model: Model, params, images, targets, cfg: KernelShapConfig, keys):
    """KernelSHAP: ``values [B, T, S]`` per superpixel (summing to ``f(image) -
    f(baseline)``), ``base [B, T]`` = f(baseline), ``segments [B, H, W]`` and
    ``heatmap [B, T, H, W]`` (each pixel its superpixel's value)."""
    b, h, w, c = images.shape
    s = cfg.features
    logits = common.forward_logits(model, params, images)
    t = common.select_targets(logits, targets)
    seg = segments(images, cfg)
    used = jnp.arange(s)[None, :] < (jnp.max(seg, axis=(1, 2)) + 1)[:, None]  # [B, S]
    base = (segment_mean_images(images, seg, s) if cfg.baseline == "segment_mean"
            else baseline_pixels(images, cfg.baseline, cfg.blur_sigma))
    if cfg.exact:
        zc, wc = all_coalitions(s)
        z = jnp.broadcast_to(jnp.asarray(zc), (b, *zc.shape))
        weights = jnp.broadcast_to(jnp.asarray(wc), (b, len(wc)))
    else:
        z = sampled_coalitions(keys, cfg.samples, s)
        weights = jnp.full(z.shape[:2], 1.0 / z.shape[1])
    # The empty and the full coalition first, then the others.
    z_all = jnp.concatenate([jnp.zeros((b, 1, s)), jnp.ones((b, 1, s)), z], axis=1)
    n = z_all.shape[1]
    per = common.copies_per_step(cfg.chunk, cfg.memory_mb, b, n, common.image_bytes(model, (h, w)))

    def step(idx):  # coalition indices [B, per]
        zs = jnp.take_along_axis(z_all, idx[..., None], axis=1)
        on = jax.vmap(lambda zb, sb: zb[:, sb])(zs, seg) > 0.5  # [B, per, H, W]
        x = jnp.where(on[..., None], images[:, None], base[:, None])
        q = idx.shape[1]
        return common.forward_logits(model, params, x.reshape(b * q, h, w, c)).reshape(b, q, -1)

    lz = common.map_steps(step, jnp.broadcast_to(jnp.arange(n), (b, n)), per)
    y = common.target_scores(model, lz, t, cfg.score)  # [B, N, T]
    phi = constrained_fit(z, y[:, 2:], weights, y[:, 0], y[:, 1], used)
    heat = jnp.take_along_axis(phi, seg.reshape(b, 1, h * w), axis=2).reshape(b, t.shape[1], h, w)
    return {"values": phi, "base": y[:, 0], "segments": seg, "heatmap": heat, "targets": t, "logits": logits}


SPECS = (
    MethodSpec("gradient_shap", "shapley", GradientShapConfig, gradient_shap,
               (Output("attribution", INPUT_ATTR, "expected gradient x (image - reference), per pixel and channel"),
                Output("heatmap", INPUT_MAP, "channel sum of the attribution")),
               True, "GradientShap (expected gradients) over references, as Captum's GradientShap"),
    MethodSpec("kernelshap", "shapley", KernelShapConfig, kernel_shap,
               (Output("values", (SAMPLE, TARGET, "segment"), "Shapley value per superpixel"),
                Output("base", (SAMPLE, TARGET), "the score with every superpixel absent"),
                Output("segments", (SAMPLE, "y", "x"), "superpixel index per pixel"),
                Output("heatmap", INPUT_MAP, "each pixel its superpixel's Shapley value")),
               True, "KernelSHAP over superpixels (exact when every coalition fits in samples), as shap's"),
)
