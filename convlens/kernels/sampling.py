"""Random-mask perturbation methods: LIME and RISE.

Both score many randomly masked copies of each image. Copy ``n`` of image ``b`` draws
its mask from ``fold_in(keys[b], n)``, so the key fixes the result and an image's
result depends neither on its batch-mates nor on how many copies share a forward pass
(``chunk``, or the ``memory_mb`` budget). Copies are built on the device a step at a
time, so memory follows the step, never the number of samples.

LIME (Ribeiro et al. 2016, as the authors' ``lime_image`` and MATLAB's ``imageLIME``):
the image is cut into at most ``features`` superpixels (SLIC from scikit-image, or a
regular grid); each sample switches every superpixel on or off with probability 1/2
(the first sample keeps them all); "off" superpixels show the baseline (by default
their own mean colour, lime's ``hide_color=None``). A weighted ridge regression of the
target's score on the on/off vectors, weights ``sqrt(exp(-d^2 / width^2))`` of the
cosine distance ``d`` to the all-on vector, gives one coefficient per superpixel
(``weights``), an ``intercept`` and the surrogate's weighted ``r2``. It is solved in
closed form on the device (a QR factorisation of the weighted, ridge-augmented design).

RISE (Petsiuk et al. 2018): each mask is an ``grid x grid`` grid of cells kept with
probability ``keep``, upsampled bilinearly to ``(grid + 1)`` cells of ``ceil(H / grid)``
pixels and cropped at a random shift; the map is ``sum_n score_n M_n / (N keep)``, the
masks averaged with the target's score on each masked image as weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from convlens.config import Config, option
from convlens.errors import ConvlensError, OptionError
from convlens.kernels import common
from convlens.kernels.baselines import BASELINE_CHOICES, baseline_pixels, parse_baseline
from convlens.kernels.spec import INPUT_MAP, SAMPLE, TARGET, MethodSpec, Output
from convlens.models.network import Model

SEGMENTATIONS = ("slic", "grid")


@dataclasses.dataclass(frozen=True)
class LimeConfig(Config):
    """Options of LIME.

    Attributes:
      samples: masked copies per image (the first keeps every superpixel).
      features: the most superpixels an image is cut into (MATLAB's ``NumFeatures``).
      segmentation: ``slic`` (scikit-image's SLIC on the image) or ``grid`` (a regular
        grid of about ``features`` cells).
      compactness: SLIC's colour / space trade-off (higher: squarer superpixels).
      baseline: what an "off" superpixel shows: ``segment_mean`` (its own mean colour,
        lime's default), a pixel value, ``mean`` (the image's mean colour), ``blur`` or
        ``image:PATH``.
      blur_sigma: Gaussian sigma (pixels) of the ``blur`` baseline.
      kernel_width: width of the sample weights' kernel on the cosine distance (lime: 0.25).
      ridge: the ridge penalty (lime: 1); 0 is plain weighted least squares.
      score: what is regressed: each target's ``logit`` or its ``prob``.
      chunk: masked images per forward pass; 0 picks it from ``memory_mb``.
      memory_mb: activation memory per forward pass the automatic chunk aims at.
    """

    samples: int = option(1000, min=2)
    features: int = option(49, min=1, max=4096)
    segmentation: str = option("slic", choices=SEGMENTATIONS)
    compactness: float = option(10.0, above=0)
    baseline: float | str = option("segment_mean", min=0, max=255, choices=("segment_mean",) + BASELINE_CHOICES)
    blur_sigma: float = option(8.0, above=0)
    kernel_width: float = option(0.25, above=0)
    ridge: float = option(1.0, min=0)
    score: str = option("logit", choices=("logit", "prob"))
    chunk: int = option(0, min=0)
    memory_mb: int = option(1024, min=1)

    _owner = "lime"

    def __post_init__(self):
        object.__setattr__(self, "baseline", parse_baseline(self.baseline, "lime", ("segment_mean",)))
        super().__post_init__()
        if self.ridge == 0 and self.samples <= self.features:
            raise OptionError(f"lime with ridge=0 needs more samples than features ({self.samples} <= "
                                f"{self.features}): add samples or a ridge penalty")


@dataclasses.dataclass(frozen=True)
class RiseConfig(Config):
    """Options of RISE.

    Attributes:
      samples: random masks per image (Petsiuk et al.: 4000 for ResNet50, 8000 for VGG16).
      grid: cells per side of a mask before upsampling (7 in the paper).
      keep: probability that a cell is kept (0.5).
      baseline: what masked-out pixels show: a pixel value (0 = black, the paper's
        ``I * M``), ``mean``, ``blur`` or ``image:PATH``.
      blur_sigma: Gaussian sigma (pixels) of the ``blur`` baseline.
      score: the weight of each mask: the target's ``prob`` (the paper) or its ``logit``.
      chunk: masked images per forward pass; 0 picks it from ``memory_mb``.
      memory_mb: activation memory per forward pass the automatic chunk aims at.
    """

    samples: int = option(4000, min=1)
    grid: int = option(7, min=1, max=1024)
    keep: float = option(0.5, above=0, max=1)
    baseline: float | str = option(0.0, min=0, max=255, choices=BASELINE_CHOICES)
    blur_sigma: float = option(8.0, above=0)
    score: str = option("prob", choices=("logit", "prob"))
    chunk: int = option(0, min=0)
    memory_mb: int = option(1024, min=1)

    _owner = "rise"

    def __post_init__(self):
        object.__setattr__(self, "baseline", parse_baseline(self.baseline, "rise"))
        super().__post_init__()


# ---------------------------------------------------------------- superpixels

def grid_segments(size: tuple[int, int], features: int) -> np.ndarray:
    """A regular grid of at most ``features`` cells, about square, ``[H, W]`` int32 labels."""
    h, w = size
    gy = max(1, min(h, round(math.sqrt(features * h / w))))
    gx = max(1, min(w, features // gy))
    ys = np.arange(h) * gy // h
    xs = np.arange(w) * gx // w
    return (ys[:, None] * gx + xs[None, :]).astype(np.int32)


def slic_segments(images: np.ndarray, features: int, compactness: float) -> np.ndarray:
    """SLIC superpixels (scikit-image) of ``images [B, H, W, 3]``: ``[B, H, W]`` int32
    labels ``0..n-1`` with ``n <= features`` (SLIC's count is approximate: it is run
    again with fewer seeds while it overshoots)."""
    try:
        from skimage.segmentation import slic
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        raise ConvlensError("lime's slic segmentation needs scikit-image (pip install scikit-image), "
                            "or use segmentation=grid") from None
    out = np.empty(images.shape[:3], np.int32)
    for i, img in enumerate(np.clip(np.rint(np.asarray(images)), 0, 255).astype(np.uint8)):
        want = features
        for _ in range(8):
            seg = slic(img, n_segments=want, compactness=compactness, start_label=0, channel_axis=-1)
            _, seg = np.unique(seg, return_inverse=True)
            n = int(seg.max()) + 1
            if n <= features or want == 1:
                break
            want = max(1, want - (n - features))
        out[i] = np.minimum(seg.reshape(img.shape[:2]), features - 1)
    return out


def segments(images, cfg: LimeConfig):
    """Superpixel labels ``[B, H, W]`` int32 (``< cfg.features``)."""
    b, h, w = images.shape[:3]
    if cfg.segmentation == "grid":
        return jnp.broadcast_to(jnp.asarray(grid_segments((h, w), cfg.features)), (b, h, w))
    # SLIC is scikit-image's host code: called back from the compiled kernel with the pixels.
    return jax.pure_callback(lambda x: slic_segments(x, cfg.features, cfg.compactness),
                             jax.ShapeDtypeStruct((b, h, w), jnp.int32), images, vmap_method="sequential")


def segment_mean_images(images, seg, n: int):
    """Every superpixel filled with its own mean colour: ``[B, H, W, C]``."""
    b, h, w, c = images.shape
    flat, s = images.reshape(b, h * w, c), seg.reshape(b, h * w)
    sums = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=n))(flat, s)  # [B, n, C]
    counts = jax.vmap(lambda i: jax.ops.segment_sum(jnp.ones(i.shape, jnp.float32), i, num_segments=n))(s)
    means = sums / jnp.maximum(counts, 1.0)[..., None]
    return jnp.take_along_axis(means, s[..., None], axis=1).reshape(b, h, w, c)


# ---------------------------------------------------------------- LIME

def lime_samples(keys, n: int, features: int, used):
    """On/off vectors ``[B, n, features]`` float: bit ``j`` of sample ``i`` of image ``b``
    from ``fold_in(keys[b], i)``; sample 0 all on; unused slots (``used [B, features]``
    false) always off."""
    def one(k):
        return jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(k, i), 0.5, (features,)))(jnp.arange(n))
    bits = jax.vmap(one)(keys).at[:, 0].set(True)
    return (bits & used[:, None, :]).astype(jnp.float32)


def lime_kernel(z, used, width: float):
    """lime's sample weights: ``sqrt(exp(-d^2 / width^2))`` of the cosine distance between
    each on/off vector ``z [B, n, S]`` and the all-on vector (distance 1 for all-off)."""
    ones = used.astype(jnp.float32)[:, None, :]
    dot = jnp.sum(z * ones, axis=-1)
    norm = jnp.sqrt(jnp.sum(z * z, axis=-1)) * jnp.sqrt(jnp.sum(ones, axis=-1))
    d = 1.0 - jnp.where(norm > 0, dot / jnp.where(norm > 0, norm, 1.0), 0.0)
    return jnp.sqrt(jnp.exp(-(d ** 2) / width ** 2))


def weighted_ridge(z, y, w, alpha: float, free):
    """Weighted ridge regression with an intercept, per image and target.

    Minimises ``sum_n w_n (y_n - b - z_n . beta)^2 + alpha |beta|^2`` over ``beta`` and
    ``b``; columns where ``free`` is false get ``beta = 0``.

    Args:
      z: inputs ``[B, N, S]``; y: scores ``[B, N, T]``; w: weights ``[B, N]``;
      free: ``[B, S]`` bool.

    Returns:
      ``(beta [B, T, S], intercept [B, T], r2 [B, T])`` with ``r2`` the weighted
      coefficient of determination on the samples (1 where ``y`` is constant).
    """
    sw = jnp.sum(w, axis=1)
    zm = jnp.einsum("bn,bns->bs", w, z) / sw[:, None]
    ym = jnp.einsum("bn,bnt->bt", w, y) / sw[:, None]
    zc, yc = z - zm[:, None], y - ym[:, None]
    r = jnp.sqrt(w)[..., None]
    s = z.shape[-1]
    # Ridge as least squares on an augmented design (better conditioned than the normal
    # equations in float32); fixed columns get a unit penalty row, hence beta = 0.
    pen = jnp.where(free, math.sqrt(alpha), 1.0)
    design = jnp.concatenate([r * zc, pen[:, :, None] * jnp.eye(s)], axis=1)  # [B, N + S, S]
    rhs = jnp.concatenate([r * yc, jnp.zeros((z.shape[0], s, y.shape[-1]), y.dtype)], axis=1)
    q, rr = jnp.linalg.qr(design)
    beta = jax.scipy.linalg.solve_triangular(rr, jnp.einsum("bms,bmt->bst", q, rhs), lower=False)
    beta = jnp.where(free[..., None], beta, 0.0)
    intercept = ym - jnp.einsum("bs,bst->bt", zm, beta)
    resid = y - intercept[:, None] - jnp.einsum("bns,bst->bnt", z, beta)
    ss_res = jnp.einsum("bn,bnt->bt", w, resid ** 2)
    ss_tot = jnp.einsum("bn,bnt->bt", w, yc ** 2)
    r2 = jnp.where(ss_tot > 0, 1.0 - ss_res / jnp.where(ss_tot > 0, ss_tot, 1.0), 1.0)
    return jnp.moveaxis(beta, 1, 2), intercept, r2


def lime(model: Model, params, images, targets, cfg: LimeConfig, keys):
    """LIME: ``weights [B, T, S]`` per superpixel, ``intercept``/``r2 [B, T]``,
    ``segments [B, H, W]`` and ``heatmap [B, T, H, W]`` (each pixel its superpixel's weight)."""
    b, h, w, c = images.shape
    s, n = cfg.features, cfg.samples
    logits = common.forward_logits(model, params, images)
    t = common.select_targets(logits, targets)
    seg = segments(images, cfg)
    used = jnp.arange(s)[None, :] < (jnp.max(seg, axis=(1, 2)) + 1)[:, None]  # [B, S]
    base = (segment_mean_images(images, seg, s) if cfg.baseline == "segment_mean"
            else baseline_pixels(images, cfg.baseline, cfg.blur_sigma))
    z = lime_samples(keys, n, s, used)  # [B, N, S]
    per = common.copies_per_step(cfg.chunk, cfg.memory_mb, b, n, common.image_bytes(model, (h, w)))

    def step(idx):  # sample indices [B, per]
        zs = jnp.take_along_axis(z, idx[..., None], axis=1)  # [B, per, S]
        on = jax.vmap(lambda zb, sb: zb[:, sb])(zs, seg) > 0.5  # [B, per, H, W]
        x = jnp.where(on[..., None], images[:, None], base[:, None])
        per_ = idx.shape[1]
        return common.forward_logits(model, params, x.reshape(b * per_, h, w, c)).reshape(b, per_, -1)

    lz = common.map_steps(step, jnp.broadcast_to(jnp.arange(n), (b, n)), per)  # [B, N, K]
    y = common.target_scores(model, lz, t, cfg.score)  # [B, N, T]
    beta, intercept, r2 = weighted_ridge(z, y, lime_kernel(z, used, cfg.kernel_width), cfg.ridge, used)
    heat = jnp.take_along_axis(beta, seg.reshape(b, 1, h * w), axis=2).reshape(b, t.shape[1], h, w)
    return {"weights": beta, "intercept": intercept, "r2": r2, "segments": seg, "heatmap": heat,
            "targets": t, "logits": logits}


# ---------------------------------------------------------------- RISE

def rise_mask(key, size: tuple[int, int], grid: int, keep: float):
    """One RISE mask ``[H, W]`` in [0, 1] from ``key``."""
    h, w = size
    cell = (-(-h // grid), -(-w // grid))
    kg, ky, kx = jax.random.split(key, 3)
    g = jax.random.bernoulli(kg, keep, (grid, grid)).astype(jnp.float32)
    up = jax.image.resize(g, ((grid + 1) * cell[0], (grid + 1) * cell[1]), method="bilinear")
    dy = jax.random.randint(ky, (), 0, cell[0])
    dx = jax.random.randint(kx, (), 0, cell[1])
    return jax.lax.dynamic_slice(up, (dy, dx), (h, w))


def rise(model: Model, params, images, targets, cfg: RiseConfig, keys):
    """RISE: ``heatmap [B, T, H, W]``, the masks averaged with the target's score on each
    masked image as weights (see the module docstring)."""
    b, h, w, c = images.shape
    n = cfg.samples
    logits = common.forward_logits(model, params, images)
    t = common.select_targets(logits, targets)
    base = baseline_pixels(images, cfg.baseline, cfg.blur_sigma)
    per = common.copies_per_step(cfg.chunk, cfg.memory_mb, b, n, common.image_bytes(model, (h, w)))
    steps = -(-n // per)
    idx = np.minimum(np.arange(steps * per), n - 1).reshape(steps, per)
    valid = (np.arange(steps * per) < n).reshape(steps, per).astype(np.float32)
    masks_of = jax.vmap(jax.vmap(lambda k, i: rise_mask(jax.random.fold_in(k, i), (h, w), cfg.grid, cfg.keep),
                                 in_axes=(None, 0)), in_axes=(0, None))

    def body(acc, xs):
        i, v = xs
        m = masks_of(keys, i)  # [B, per, H, W]
        x = base[:, None] + m[..., None] * (images - base)[:, None]
        lz = common.forward_logits(model, params, x.reshape(b * per, h, w, c)).reshape(b, per, -1)
        sc = common.target_scores(model, lz, t, cfg.score)  # [B, per, T]
        return acc + jnp.einsum("bpt,p,bphw->bthw", sc, v, m), None

    init = jnp.zeros((b, t.shape[1], h, w), jnp.float32)
    total, _ = jax.lax.scan(body, init, (jnp.asarray(idx), jnp.asarray(valid)))
    return {"heatmap": total / (n * cfg.keep), "targets": t, "logits": logits}


SPECS = (
    MethodSpec("lime", "perturbation", LimeConfig, lime,
               (Output("weights", (SAMPLE, TARGET, "segment"), "surrogate coefficient per superpixel"),
                Output("intercept", (SAMPLE, TARGET), "surrogate intercept"),
                Output("r2", (SAMPLE, TARGET), "weighted R^2 of the surrogate on its samples"),
                Output("segments", (SAMPLE, "y", "x"), "superpixel label of each pixel"),
                Output("heatmap", INPUT_MAP, "each pixel's superpixel coefficient")),
               True, "LIME: weighted linear surrogate over superpixels switched on and off"),
    MethodSpec("rise", "perturbation", RiseConfig, rise,
               (Output("heatmap", INPUT_MAP, "random masks averaged, weighted by the target's score"),),
               True, "RISE: random masks weighted by the target's score on each masked image"),
)
