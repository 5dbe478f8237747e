"""Randomisation: does the map depend on what the model learned and on the class asked?"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from convlens.config import Config, option
from convlens.kernels.metrics.base import need_keys, per_item, prepare, spearman_rows
from convlens.kernels.metrics.spec import HIGHER, LOWER, MetricSpec


def ssim(a, b, *, win_size=7, k1=0.01, k2=0.03):
    """Structural similarity of ``a, b [B, ...]`` (1-D rows or 2-D maps) as
    scikit-image computes it (uniform ``win_size`` window, sample covariance, symmetric
    edges, the data range from both, the mean over the interior): ``[B]``."""
    nd = a.ndim - 1
    pad = (win_size - 1) // 2
    rng = jnp.max(jnp.maximum(a, b).reshape(a.shape[0], -1), axis=1) - \
        jnp.min(jnp.minimum(a, b).reshape(a.shape[0], -1), axis=1)
    rng = rng.reshape(-1, *([1] * nd))

    def filt(v):
        v = jnp.pad(v, [(0, 0)] + [(pad, pad)] * nd, mode="symmetric")
        for ax in range(1, nd + 1):
            k = jnp.ones(win_size) / win_size
            v = jnp.apply_along_axis(lambda r: jnp.convolve(r, k, mode="valid"), ax, v)
        return v
    n = win_size ** nd
    cov = n / (n - 1)
    ux, uy = filt(a), filt(b)
    vx = cov * (filt(a * a) - ux * ux)
    vy = cov * (filt(b * b) - uy * uy)
    vxy = cov * (filt(a * b) - ux * uy)
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    inner = (slice(None),) + tuple(slice(pad, d - pad) for d in s.shape[1:])
    return s[inner].reshape(a.shape[0], -1).mean(axis=1)


def random_logit(explain, x, a, y, num_classes, *, flat=True, abs=False, normalise=True, keys=None, y_off=None):
    """Random logit (Sixt et al. 2020): the map for the target against the map for a
    random other class, by SSIM (higher means the map ignores the class asked: lower
    is better). ``flat`` compares the maps as rows of pixels, as Quantus does (SSIM's
    window then runs along raster lines); ``flat=False`` compares them as images.
    ``y_off [B]`` gives the other classes."""
    a = prepare(a, abs, normalise)
    if y_off is None:
        d = per_item(need_keys(keys, "random logit"), lambda k: jax.random.randint(k, (), 1, num_classes))
        y_off = (y + d) % num_classes
    b2 = prepare(explain(x, y_off), abs, normalise)
    if flat:
        return {"score": ssim(a.reshape(a.shape[0], -1), b2.reshape(a.shape[0], -1))}
    return {"score": ssim(a, b2)}


def model_parameter_randomisation(explain_with, params, fresh, layers, x, a, y, *, abs=True, normalise=True,
                                  independent=False, smooth_samples=0, smooth_noise=0.1, keys=None, noises=None):
    """Model-parameter randomisation (Adebayo et al. 2018): the layers (top first) are
    replaced by a fresh random initialisation, cascading (each step keeps the layers
    randomised before) or ``independent``; an entry of ``layers`` may be a tuple of
    names, randomised together as one step; the map is recomputed with
    ``explain_with(params, x, y) -> [B, H, W]`` and compared with the original by the
    Spearman rank correlation of absolute values. ``curve [B, L]`` per layer; ``score``
    the correlation with every layer random (cascading) or the mean over layers
    (independent); lower is better.

    ``smooth_samples > 0`` is smooth MPRT (Hedström et al. 2024): every map, the
    original included, is the mean over that many copies of the input with Gaussian
    noise (std ``smooth_noise`` of the image's value range), which removes the noise
    of gradient maps from the comparison. The same draws serve every map (common random
    numbers: the comparison sees the weights change, not the noise). ``noises`` replaces
    them, in input units: ``[S, B, H, W, C]`` for every map, or ``[L + 1, S, B, H, W, C]``
    one set per map, the original's first (Quantus draws afresh for each map, and makes
    its last sample noise-free)."""
    b = x.shape[0]
    if smooth_samples > 0 or noises is not None:
        if noises is None:
            spread = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)
            d = per_item(need_keys(keys, "smooth MPRT"), lambda k: jax.random.normal(k, (smooth_samples, *x.shape[1:])))
            noises = smooth_noise * spread * jnp.moveaxis(d, 0, 1)
        per_map = noises.ndim == x.ndim + 2

        def maps(q, i):
            ns = noises[i] if per_map else noises
            # Unrolled: see `convlens.kernels.metrics.robust` (backward passes in loops are slow on CPU).
            return jnp.mean(jnp.stack([explain_with(q, x + n, y) for n in ns]), axis=0)
        a = maps(params, 0)
    else:
        def maps(q, i):
            return explain_with(q, x, y)
    a = prepare(a, abs, normalise)
    out = []
    p = dict(params)
    for i, stage in enumerate(layers):
        q = dict(params) if independent else dict(p)
        for name in ((stage,) if isinstance(stage, str) else stage):
            q[name] = fresh[name]
        p = q if not independent else p
        m = prepare(maps(q, i + 1), abs, normalise)
        out.append(spearman_rows(a.reshape(b, -1), m.reshape(b, -1)))
    curve = jnp.stack(out, axis=1)
    return {"curve": curve, "score": curve[:, -1] if not independent else jnp.nanmean(curve, axis=1)}


def histogram_entropy(a, bins=100):
    """Entropy (natural log) of the histogram of each map's values, ``bins`` equal bins
    between its min and max: ``[B]`` (0 for a constant map)."""
    v = a.reshape(a.shape[0], -1)
    lo, hi = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
    idx = jnp.clip(((v - lo) / jnp.where(hi > lo, hi - lo, 1.0) * bins).astype(jnp.int32), 0, bins - 1)
    counts = jax.vmap(lambda i: jnp.bincount(i, length=bins))(idx).astype(jnp.float32)
    pr = counts / v.shape[1]
    return -jnp.sum(jnp.where(pr > 0, pr * jnp.log(jnp.where(pr > 0, pr, 1.0)), 0.0), axis=1)


def cascade(layers, n: int) -> list[tuple]:
    """``layers`` (output first) cut into ``n`` cascading steps: the top layer alone first,
    the last step ending with every layer."""
    n = max(1, min(int(n), len(layers)))
    ends = sorted({max(1, round(len(layers) * (k + 1) / n)) for k in range(n)} | {1})
    return [tuple(layers[a:b]) for a, b in zip([0] + ends[:-1], ends)]


def mprt(explain_with, params, fresh, layers, x, y, *, stages=4, independent=False, smooth_samples=0,
         smooth_noise=0.1, abs=True, normalise=True, keys=None, noises=None):
    """Model-parameter randomisation test (Adebayo et al. 2018): the layers (output first)
    randomised in ``stages`` cascading steps, the top layer alone first (``independent``:
    each step alone), the method re-run and compared with its map under the trained
    weights; see `model_parameter_randomisation`. ``smooth_samples > 0`` is smooth MPRT.
    The reference map is the method re-run here, not a stored one (which may be float16):
    both sides are the same function at the same precision. Lower is better: the map
    depends on what the model learned."""
    a = explain_with(params, x, y) if smooth_samples == 0 and noises is None else jnp.zeros(x.shape[:3])
    return model_parameter_randomisation(explain_with, params, fresh, cascade(layers, stages), x, a, y,
                                         abs=abs, normalise=normalise, independent=independent,
                                         smooth_samples=smooth_samples, smooth_noise=smooth_noise, keys=keys,
                                         noises=noises)


def efficient_mprt(explain_with, params, fresh, x, y, *, bins=100, abs=False, normalise=False):
    """Efficient MPRT (Hedström et al. 2024): how much more complex the map becomes when
    every layer is randomised at once, ``H(a_random) / H(a)`` with ``H`` the entropy of
    the histogram of the map's values (``bins`` bins) and ``a`` the method re-run with
    the trained weights; higher means the map depends more on what the model learned.
    Quantus reports the relative rise, this ratio minus 1."""
    a = prepare(explain_with(params, x, y), abs, normalise)
    r = prepare(explain_with(dict(fresh), x, y), abs, normalise)
    h0 = histogram_entropy(a, bins)
    return {"score": histogram_entropy(r, bins) / jnp.where(h0 > 0, h0, jnp.nan)}


# ---------------------------------------------------------------- declarations

@dataclasses.dataclass(frozen=True)
class RandomLogitConfig(Config):
    """Options of the random logit test.

    Attributes:
      flat: compare the maps as rows of pixels (Quantus's way; false: as images).
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
    """

    flat: bool = True
    abs: bool = False
    normalise: bool = True

    _owner = "random_logit"


@dataclasses.dataclass(frozen=True)
class MprtConfig(Config):
    """Options of the model-parameter randomisation tests.

    Attributes:
      stages: cascading randomisation steps, top layer first.
      independent: randomise each step alone (not cascading); the score is then the mean
        over steps.
      smooth_samples: noisy copies each map is averaged over (smooth MPRT; 0: off).
      smooth_noise: their noise's std, as a fraction of the image's value range.
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
    """

    stages: int = option(4, min=1, max=1024)
    independent: bool = False
    smooth_samples: int = option(0, min=0, max=256)
    smooth_noise: float = option(0.1, min=0)
    abs: bool = True
    normalise: bool = True

    _owner = "mprt"


@dataclasses.dataclass(frozen=True)
class SmoothMprtConfig(MprtConfig):
    """Options of smooth MPRT (MPRT with maps averaged over noisy copies).

    Attributes:
      stages: cascading randomisation steps, top layer first.
      independent: randomise each step alone (not cascading).
      smooth_samples: noisy copies each map is averaged over.
      smooth_noise: their noise's std, as a fraction of the image's value range.
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
    """

    smooth_samples: int = option(4, min=1, max=256)

    _owner = "smooth_mprt"


@dataclasses.dataclass(frozen=True)
class EfficientMprtConfig(Config):
    """Options of efficient MPRT.

    Attributes:
      bins: bins of the histogram of map values.
      abs: take the maps' absolute values first.
      normalise: divide each map by its largest absolute value first.
    """

    bins: int = option(100, min=2, max=1 << 16)
    abs: bool = False
    normalise: bool = False

    _owner = "efficient_mprt"


WEIGHTS = ("explain_with", "params", "fresh", "layers", "x", "y")

METRICS = (
    MetricSpec("random_logit", "randomisation", LOWER, ("explain", "x", "a", "y", "num_classes"), RandomLogitConfig,
               random_logit),
    MetricSpec("mprt", "randomisation", LOWER, WEIGHTS, MprtConfig, mprt,
               doc="Model-parameter randomisation, cascading (Adebayo et al. 2018)",
               departure="with independent=true, Quantus's return_average_correlation averages in the original-versus-"
                         "original score too; convlens averages over the randomised layers"),
    MetricSpec("smooth_mprt", "randomisation", LOWER, WEIGHTS, SmoothMprtConfig, mprt,
               doc="Smooth MPRT (Hedström et al. 2024)"),
    MetricSpec("efficient_mprt", "randomisation", HIGHER, ("explain_with", "params", "fresh", "x", "y"),
               EfficientMprtConfig, efficient_mprt,
               departure="the ratio H(random) / H(trained); Quantus reports the relative rise, the ratio minus 1"),
)
