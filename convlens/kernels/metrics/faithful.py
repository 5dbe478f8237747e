"""Faithfulness: does the model's output follow the map when the pixels it ranks are
changed? Every function takes ``score`` (see `convlens.kernels.metrics.base`), images
``x [B, H, W, C]``, maps ``a [B, H, W]`` and targets ``y [B]``, and returns a dict with
``score [B]`` (and ``curve [B, S]`` where there is one). Options default to Quantus
0.6's where its default is affordable; where not, the docstring says why.

Step sizes count pixels (Quantus's ``features_in_step = C * k`` is our ``k``). A
``steps`` option sets ``features_in_step = ceil(H*W / steps)`` where Quantus's default
(one pixel per step: 50,176 forward passes per 224x224 image) would take hours.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from convlens.config import Config, option
from convlens.kernels.incremental import patch_curve, patch_grid
from convlens.kernels.metrics.base import (BASELINES, Scorer, baseline_value, need_keys, pearson, per_item, pixel_order,
                                           prepare, ranks_of, scan_steps, spearman_rows, sub_keys, target_score,
                                           trapezoid)
from convlens.kernels.metrics.spec import HIGHER, LOWER, MetricSpec


def _step(h: int, w: int, features_in_step: int, steps: int) -> int:
    return int(features_in_step) if features_in_step else max(1, math.ceil(h * w / steps))


def pixel_flipping(score, x, a, y, *, features_in_step=0, steps=64, baseline="black", abs=False, normalise=True,
                   keys=None):
    """Pixel flipping (Bach et al. 2015): the most relevant pixels are replaced by the
    baseline, ``features_in_step`` more at each step, cumulatively; ``curve [B, S]`` is
    the target's score after each step (Quantus's output) and ``score`` its area with
    unit spacing divided by ``S - 1`` (the mean height; lower is more faithful)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    k = _step(h, w, features_in_step, steps)
    n = math.ceil(h * w / k)
    ranks = ranks_of(pixel_order(a)).reshape(b, h, w)
    base = baseline_value(x, baseline, keys)

    def make(s):
        return jnp.where((ranks < (s + 1) * k)[..., None], base, x)
    curve = scan_steps(score, make, n, y)
    return {"curve": curve, "score": trapezoid(curve) / max(n - 1, 1)}


def _patches(h, w, p):
    """Patch index of each pixel ``[H, W]`` on a grid of ``p x p`` patches placed as
    Quantus places them (`incremental.patch_grid`), and the patch count."""
    idx, sy, sx = patch_grid(h, w, p)
    return jnp.asarray(idx), len(sy) * len(sx)


def _patch_order(a, p, order, keys):
    """``(rank [B, H, W]``: the step at which each pixel's patch goes, ``ordering [B, n]``:
    the patch removed at each step, ``n)``."""
    b, h, w = a.shape
    idx, n = _patches(h, w, p)
    sums = jax.vmap(lambda m: jax.ops.segment_sum(m.ravel(), idx.ravel(), num_segments=n))(a)
    if order == "random":
        ordering = per_item(need_keys(keys, "order='random'"), lambda k: jax.random.permutation(k, n))
    else:
        ordering = jnp.argsort(-sums if order == "morf" else sums, axis=1, stable=True)
    rank = ranks_of(ordering)  # [B, n]: when each patch goes
    return rank[:, idx], ordering, n


def _patch_removal(score, x, y, rank, ordering, steps, base, p, incremental):
    """The target's score after each of the first ``steps`` cumulative patch removals
    ``[B, steps]``: incrementally (each step's patch cone only, `patch_curve`) where the
    score is a model's and ``incremental``, else the whole model on each step's image."""
    if incremental and isinstance(score, Scorer):
        logits = patch_curve(score.model, score.params, x, base, ordering[:, :steps], p)
        return jnp.take_along_axis(score.finish(logits), y[:, None, None], axis=2)[..., 0]
    return scan_steps(score, lambda s: jnp.where((rank <= s)[..., None], base, x), steps, y)


def region_perturbation(score, x, a, y, *, patch_size=8, order="morf", regions_evaluation=100, baseline="black",
                        abs=False, normalise=True, incremental=True, keys=None):
    """Region perturbation (Samek et al. 2015): ``patch_size`` squares are replaced by the
    baseline in the order of their summed relevance (``morf``: most relevant first,
    ``lerf``, ``random``), cumulatively, ``regions_evaluation`` of them. ``curve`` is the
    drop ``f(x) - f(x_s)`` after each step, as Quantus; ``score`` its mean (higher is
    more faithful for ``morf``)."""
    a = prepare(a, abs, normalise)
    rank, ordering, n = _patch_order(a, patch_size, order, keys)
    steps = min(regions_evaluation, n)
    base = baseline_value(x, baseline, keys)
    f0 = target_score(score, x, y)
    curve = f0[:, None] - _patch_removal(score, x, y, rank, ordering, steps, base, patch_size, incremental)
    return {"curve": curve, "score": curve.mean(axis=1)}


def selectivity(score, x, a, y, *, patch_size=8, baseline="black", abs=False, normalise=True, incremental=True,
                keys=None):
    """Selectivity (Montavon et al. 2018): patches removed most relevant first, all of
    them; ``curve`` the target's score after each removal (as Quantus) and ``score`` its
    area with unit spacing over ``S - 1`` (lower is more faithful)."""
    a = prepare(a, abs, normalise)
    rank, ordering, n = _patch_order(a, patch_size, "morf", keys)
    base = baseline_value(x, baseline, keys)
    curve = _patch_removal(score, x, y, rank, ordering, n, base, patch_size, incremental)
    return {"curve": curve, "score": trapezoid(curve) / max(n - 1, 1)}


def faithfulness_estimate(score, x, a, y, *, features_in_step=0, steps=64, baseline="black", abs=False,
                          normalise=True, keys=None):
    """Faithfulness estimate (Alvarez-Melis & Jaakkola 2018): each step's pixels alone
    (not cumulatively) are replaced; ``score`` is the Pearson correlation between their
    summed relevance and the target's drop (higher is more faithful)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    k = _step(h, w, features_in_step, steps)
    n = math.ceil(h * w / k)
    ranks = ranks_of(pixel_order(a)).reshape(b, h, w)
    group = ranks // k  # [B, H, W]: the step that replaces the pixel
    base = baseline_value(x, baseline, keys)
    f0 = target_score(score, x, y)
    drops = f0[:, None] - scan_steps(score, lambda s: jnp.where((group == s)[..., None], base, x), n, y)
    sums = jax.vmap(lambda g, m: jax.ops.segment_sum(m.ravel(), g.ravel(), num_segments=n))(group, a)
    return {"score": pearson(sums, drops), "curve": drops}


def random_subsets(keys, pixels, runs, size):
    """``[B, runs, size]`` pixel indices from each item's key, each row drawn without
    replacement."""
    def one(k):
        return jax.vmap(lambda r: jax.random.choice(jax.random.fold_in(k, r), pixels, (size,), replace=False))(
            jnp.arange(runs))
    return per_item(keys, one)


def faithfulness_correlation(score, x, a, y, *, nr_runs=100, subset_size=224, baseline="black", abs=False,
                             normalise=True, keys=None, subsets=None):
    """Faithfulness correlation (Bhatt et al. 2020): ``nr_runs`` random sets of
    ``subset_size`` pixels are replaced; ``score`` is the Pearson correlation between
    each set's summed relevance and the target's drop (higher is more faithful).
    ``subsets [B, R, k]`` gives the draws (for parity with another implementation)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    if subsets is None:
        subsets = random_subsets(need_keys(keys, "faithfulness correlation"), h * w, nr_runs, subset_size)
    runs = subsets.shape[1]
    base = baseline_value(x, baseline, keys)
    f0 = target_score(score, x, y)
    flat = x.reshape(b, h * w, -1)
    bi = jnp.arange(b)[:, None]

    def make(r):
        m = jnp.zeros((b, h * w), bool).at[bi, subsets[:, r]].set(True)
        return jnp.where(m[..., None], base.reshape(b, 1, 1), flat).reshape(x.shape)
    drops = f0[:, None] - scan_steps(score, make, runs, y)
    sums = jnp.take_along_axis(a.reshape(b, 1, -1), subsets, axis=2).sum(-1)
    return {"score": pearson(sums, drops)}


def monotonicity(score, x, a, y, *, features_in_step=0, steps=64, baseline="black", abs=True, normalise=True,
                 keys=None):
    """Monotonicity (Arya et al. 2019): starting from the baseline image, pixels are put
    back least relevant first; ``score`` is 1 where the target's score never falls
    (Quantus's boolean), ``curve`` the scores."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    k = _step(h, w, features_in_step, steps)
    n = math.ceil(h * w / k)
    ranks = ranks_of(pixel_order(a, descending=False)).reshape(b, h, w)
    base = baseline_value(x, baseline, keys)
    curve = scan_steps(score, lambda s: jnp.where((ranks < (s + 1) * k)[..., None], x, base), n, y)
    return {"curve": curve, "score": jnp.all(jnp.diff(curve, axis=1) >= 0, axis=1).astype(jnp.float32)}


def monotonicity_correlation(score, x, a, y, *, features_in_step=0, steps=32, nr_samples=16, eps=1e-5,
                             abs=True, normalise=True, keys=None, fills=None):
    """Monotonicity correlation (Nguyen & Martínez 2020): pixels in ascending order of
    relevance, ``features_in_step`` at a time, are set to uniform noise ``nr_samples``
    times; the step's variance of the score, ``mean((f(x_s) - f(x))^2) / f(x)^2``, is
    ranked against its summed relevance: ``score`` is the Spearman correlation. Quantus
    draws U(0, 1) per item and sample (``fills [S, R, B]`` gives the draws); we draw
    between the image's min and max. Defaults (32 steps, 16 samples) instead of
    Quantus's (one pixel per step, 100 samples: 5 million passes per 224x224 image)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    k = _step(h, w, features_in_step, steps)
    n = math.ceil(h * w / k)
    ranks = ranks_of(pixel_order(a, descending=False)).reshape(b, h, w)
    group = ranks // k
    f0 = target_score(score, x, y)
    inv = jnp.where(jnp.abs(f0) >= eps, 1.0 / jnp.where(jnp.abs(f0) >= eps, jnp.abs(f0), 1.0), 1.0) ** 2
    if fills is None:
        lo, hi = x.min(axis=(1, 2, 3)), x.max(axis=(1, 2, 3))
        u = per_item(need_keys(keys, "monotonicity correlation"), lambda k: jax.random.uniform(k, (n, nr_samples)))
        fills = lo + (hi - lo) * jnp.moveaxis(u, 0, -1)
    r = fills.shape[1]

    def make(i):
        s, j = i // r, i % r
        return jnp.where((group == s)[..., None], fills[s, j][:, None, None, None], x)
    p = scan_steps(score, make, n * r, y).reshape(b, n, r)
    var = jnp.mean((p - f0[:, None, None]) ** 2, axis=2) * inv[:, None]
    sums = jax.vmap(lambda g, m: jax.ops.segment_sum(m.ravel(), g.ravel(), num_segments=n))(group, a)
    return {"score": spearman_rows(sums, var), "curve": var}


def sensitivity_n(score, x, a, y, *, fractions=(0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8), nr_samples=32,
                  baseline="black", abs=False, normalise=True, keys=None):
    """Sensitivity-n (Ancona et al. 2018), as the paper defines it: for each ``n`` (a
    fraction of the pixels), ``nr_samples`` random sets of ``n`` pixels are removed and
    the Pearson correlation between their summed relevance and the target's drop is
    taken; ``curve [B, len(fractions)]``, ``score`` its mean (higher is better).
    Quantus 0.6 instead removes the top-``n`` pixels cumulatively and correlates across
    the items of a batch, which makes an item's score depend on its batch."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    keys = need_keys(keys, "sensitivity-n")
    out = []
    for j, f in enumerate(fractions):
        size = max(1, int(round(f * h * w)))
        out.append(faithfulness_correlation(score, x, a, y, nr_runs=nr_samples, subset_size=size, baseline=baseline,
                                            abs=False, normalise=False, keys=sub_keys(keys, j))["score"])
    curve = jnp.stack(out, axis=1)
    return {"curve": curve, "score": jnp.nanmean(curve, axis=1)}


def irof(score, x, a, y, segments, n_segments, *, baseline="mean", abs=False, normalise=True, keys=None):
    """Iterative removal of features (Rieger & Hansen 2020): superpixels ``segments
    [B, H, W]`` (ints ``0 .. n-1``; SLIC, computed by the caller) are replaced by the
    image's mean in the order of their mean relevance, cumulatively; ``curve`` is
    ``f(x_s) / f(x)`` and ``score`` the area over it, ``n - trapz(curve)`` as Quantus
    (higher is more faithful). Deviation: Quantus fills with the mean of the whole
    batch's current images, which makes one item's score depend on the others; the
    paper (and we) use the item's own mean (``baseline``: another fill of
    `convlens.kernels.metrics.base.baseline_value`). ``n_segments`` (static) bounds the
    segment count of every item."""
    a = prepare(a, abs, normalise)
    b = a.shape[0]
    nmax = int(n_segments)
    seg = segments.reshape(b, -1)
    tot = jax.vmap(lambda s, m: jax.ops.segment_sum(m.ravel(), s, num_segments=nmax))(seg, a)
    cnt = jax.vmap(lambda s: jax.ops.segment_sum(jnp.ones_like(s, jnp.float32), s, num_segments=nmax))(seg)
    present = cnt > 0
    mean = jnp.where(present, tot / jnp.maximum(cnt, 1), -jnp.inf)
    order = jnp.argsort(-mean, axis=1, stable=True)
    rank = ranks_of(order)  # [B, nmax]: absent segments last
    pix = jnp.take_along_axis(rank, seg, axis=1).reshape(segments.shape)
    base = jnp.mean(x, axis=(1, 2), keepdims=True) if baseline == "mean" else baseline_value(x, baseline, keys)
    f0 = target_score(score, x, y)
    curve = scan_steps(score, lambda s: jnp.where((pix <= s)[..., None], base, x), nmax, y) / f0[:, None]
    n = present.sum(axis=1)
    valid = jnp.arange(nmax)[None] < n[:, None]
    curve = jnp.where(valid, curve, 0.0)
    return {"curve": curve, "score": n - trapezoid(curve)}


def infidelity(score, x, a, y, *, patch_sizes=(4,), n_perturb_samples=10, noise=0.0, abs=False, normalise=False,
               incremental=True, keys=None):
    """Infidelity (Yeh et al. 2019): ``E[(sum(a * I) - (f(x) - f(x - I)))^2]`` over
    perturbations ``I``. As Quantus: each ``p x p`` patch of a grid in turn is set to
    the image's minimum (so ``I = x - x_s``) and the squared errors averaged over patches,
    patch sizes and samples. Quantus's patches accumulate (patch ``i`` is removed with
    all before it) and its samples are identical with a fixed baseline; we keep its
    accumulation for parity, and with ``noise > 0`` add Gaussian noise of that standard
    deviation to each sample's fill, which makes the samples differ (the paper's
    random perturbations)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    f0 = target_score(score, x, y)
    errs = []
    for r in range(n_perturb_samples):
        for p in patch_sizes:
            idx, n = _patches(h, w, p)
            fill = baseline_value(x, "black")
            if noise:
                draws = per_item(sub_keys(need_keys(keys, "infidelity with noise"), r),
                                 lambda k: jax.random.normal(k, x.shape[1:]))
                fill = fill + noise * draws
            grid_order = jnp.broadcast_to(jnp.arange(n), (b, n))  # patches go in grid order, cumulatively
            fs = _patch_removal(score, x, y, idx[None], grid_order, n, fill, p, incremental)  # [B, n]

            def attr_sum(s, idx=idx, fill=fill):
                xs = jnp.where((idx <= s)[None, ..., None], fill, x)
                return jnp.sum(a * jnp.sum(x - xs, axis=-1), axis=(1, 2))
            sums = jax.lax.map(attr_sum, jnp.arange(n)).T
            errs.append(jnp.mean(((f0[:, None] - fs) - sums) ** 2, axis=1))
    return {"score": jnp.mean(jnp.stack(errs, 1), axis=1)}


def road(score, x, a, y, *, percentages=tuple(range(1, 100, 2)), noise=0.01, order="morf", abs=False,
         normalise=True, keys=None, tol=1e-5, max_iter=2000):
    """ROAD, remove and debias (Rong et al. 2022): the top (``morf``) or bottom (``lerf``)
    ``p`` % of the pixels are removed and filled by noisy linear imputation (each removed
    pixel the weighted mean of its 8 neighbours, 1/6 for edges and 1/12 for corners,
    solved jointly, plus Gaussian noise of std ``noise``), so a removed region carries no
    shape for the model to recognise. ``noise`` is a fraction of the image's value range
    (Quantus's 0.01 is meant for inputs in [0, 1]); ``tol`` the solver's relative
    residual. ``curve`` is the target's score per percentage,
    ``accuracy`` whether the target is still the top class (Quantus's ROAD curve is its
    mean over items), ``score`` the mean of ``curve`` (lower for ``morf`` and higher for
    ``lerf`` mean more faithful)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    ranks = ranks_of(pixel_order(a, descending=(order == "morf"))).reshape(b, h, w)
    counts = jnp.asarray([int(h * w * p / 100) for p in percentages])
    if noise:
        keys = need_keys(keys, "ROAD with noise")
    spread = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)

    def make(s):
        removed = ranks < counts[s]
        filled = impute(x, removed, tol=tol, max_iter=max_iter)
        if noise:
            filled = filled + noise * spread * per_item(sub_keys(keys, s), lambda k: jax.random.normal(k, x.shape[1:]))
        return jnp.where(removed[..., None], filled, x)
    curve, cls = scan_steps(score, make, len(percentages), y, with_class=True)
    return {"curve": curve, "accuracy": (cls == y[:, None]).astype(jnp.float32), "score": curve.mean(axis=1)}


def road_gain(score, x, a, y, *, percentages=tuple(range(1, 100, 2)), noise=0.01, abs=False, normalise=True,
              keys=None, tol=1e-5, max_iter=2000):
    """ROAD's two orders on the same item: ``curve`` is LeRF's score minus MoRF's per
    percentage and ``score`` its mean (the area between the curves, higher is more
    faithful). Both curves share the item's own level, so the difference drops it: the
    "symmetric relevance gain" of Blücher et al. (2024), which compares methods item by
    item where one order alone varies more across items than between methods."""
    k1, k2 = (None, None) if keys is None else (sub_keys(keys, 1), sub_keys(keys, 2))
    opts = dict(percentages=percentages, noise=noise, abs=abs, normalise=normalise, tol=tol, max_iter=max_iter)
    morf = road(score, x, a, y, order="morf", keys=k1, **opts)
    lerf = road(score, x, a, y, order="lerf", keys=k2, **opts)
    return {"curve": lerf["curve"] - morf["curve"], "score": lerf["score"] - morf["score"]}


def _replacement(x, replacement, blur_sigma):
    if replacement == "blur":
        from convlens.kernels.baselines import gaussian_blur
        return gaussian_blur(x, blur_sigma)
    return jnp.full_like(x, float(replacement))


def _deletion_curve(score, x, a, y, steps, replacement, blur_sigma, insert):
    b, h, w = a.shape
    rep = _replacement(x, replacement, blur_sigma)
    ranks = ranks_of(pixel_order(a)).reshape(b, h, w)
    counts = jnp.asarray(np.round(np.linspace(0, h * w, steps + 1)).astype(np.int32))  # pixels moved per point
    start, end = (rep, x) if insert else (x, rep)
    curve = scan_steps(score, lambda s: jnp.where((ranks < counts[s])[..., None], end, start), steps + 1, y)
    frac = counts.astype(jnp.float32) / (h * w)
    return {"curve": curve, "score": jnp.trapezoid(curve, frac, axis=-1)}


def deletion(score, x, a, y, *, steps=32, replacement="blur", blur_sigma=10.0):
    """Deletion (Petsiuk et al. 2018, RISE): pixels are replaced, most salient first,
    ``steps`` equal slices at a time, by the ``replacement`` (the image blurred with
    ``blur_sigma``, or a pixel value); ``curve [B, steps + 1]`` is the target's score after
    each slice (the first on the untouched image) and ``score`` its area over [0, 1]
    (lower is more faithful)."""
    return _deletion_curve(score, x, a, y, steps, replacement, blur_sigma, insert=False)


def insertion(score, x, a, y, *, steps=32, replacement="blur", blur_sigma=10.0):
    """Insertion (Petsiuk et al. 2018): from the replacement image, the pixels are put
    back most salient first; ``curve`` and its area ``score`` as for deletion (higher is
    more faithful)."""
    return _deletion_curve(score, x, a, y, steps, replacement, blur_sigma, insert=True)


def _keep_explained(score, x, a, y, replacement, blur_sigma):
    m = jnp.maximum(a, 0.0)
    top = jnp.max(m, axis=(-2, -1), keepdims=True)
    m = jnp.where(top > 0, m / jnp.where(top > 0, top, 1.0), 0.0)[..., None]  # the map scaled to [0, 1]
    kept = x * m + _replacement(x, replacement, blur_sigma) * (1.0 - m)
    return target_score(score, x, y), target_score(score, kept, y)


def average_drop(score, x, a, y, *, replacement="blur", blur_sigma=10.0):
    """Average drop (Chattopadhay et al. 2018, Grad-CAM++): the image kept only where the
    map says (``x * m + r * (1 - m)``, the map scaled to [0, 1], ``r`` the replacement);
    ``score`` is ``max(0, p - p_kept) / p`` with ``p`` the target's score (lower is more
    faithful); ``p`` and ``p_kept`` are returned too."""
    p, pk = _keep_explained(score, x, a, y, replacement, blur_sigma)
    return {"score": jnp.maximum(p - pk, 0.0) / jnp.maximum(p, 1e-12), "p": p, "p_kept": pk}


def increase_in_confidence(score, x, a, y, *, replacement="blur", blur_sigma=10.0):
    """Increase in confidence (Chattopadhay et al. 2018): 1 where the image kept only
    where the map says (as for average drop) scores higher than the whole image
    (higher is better; its mean over items is the paper's percentage)."""
    p, pk = _keep_explained(score, x, a, y, replacement, blur_sigma)
    return {"score": (pk > p).astype(jnp.float32)}


def sufficiency(a, predicted, *, threshold=0.6, abs=True, normalise=True):
    """Sufficiency (Dasgupta et al. 2022), over a set of items (a batch: the score of an
    item depends on the others): items whose maps lie within ``threshold`` of the item's
    should share its predicted class; ``score [B]`` is the share of those near items that
    do (0 where none is near). The distance is the standardised Euclidean distance of the
    flattened maps (the variances taken as scipy's ``cdist`` takes them, over the set
    stacked twice) divided by the set's largest, as Quantus does: ``threshold`` is a
    fraction of it (in absolute units, Quantus's 0.6 would find no neighbour among
    50,000-pixel maps). Pixels constant over the set are left out of the distance (scipy
    makes every distance NaN then, so Quantus finds no neighbour at all)."""
    a = prepare(a, abs, normalise)
    v = a.reshape(a.shape[0], -1)
    n = v.shape[0]
    var = jnp.sum((v - v.mean(0)) ** 2, axis=0) * 2 / (2 * n - 1)  # var(vstack([v, v]), ddof=1)
    w = jnp.where(var > 0, 1.0 / jnp.where(var > 0, var, 1.0), 0.0)
    d = jnp.sqrt(jnp.sum((v[:, None] - v[None]) ** 2 * w, axis=-1))
    top = jnp.max(d)
    d = jnp.where(top > 0, d / jnp.where(top > 0, top, 1.0), d)
    near = (d <= threshold) & ~jnp.eye(n, dtype=bool)
    same = predicted[:, None] == predicted[None]
    count = near.sum(axis=1)
    return {"score": jnp.where(count > 0, jnp.sum(near & same, axis=1) / jnp.maximum(count, 1), 0.0)}


_NEIGHBOURS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def _spread(v):
    """``sum_n w_n v[p + n]`` over the 8 neighbours inside the image: ``v [B, H, W, C]``."""
    # Eight shifted, weighted adds of the zero-padded input, not a grouped convolution:
    # XLA:CPU lowers a depthwise convolution about 70x slower (0.37 vs 28 ms per call at
    # [32, 64, 64, 3]), and the imputation's solver calls this hundreds of times.
    h, w = v.shape[1:3]
    p = jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = jnp.zeros_like(v)
    for i, row in enumerate(_NEIGHBOURS):
        for j, wt in enumerate(row):
            if wt:
                out = out + jnp.float32(wt) * p[:, i:i + h, j:j + w]
    return out


def impute(x, removed, tol=1e-6, max_iter=2000):
    """Linear imputation of the ``removed [B, H, W]`` pixels of ``x [B, H, W, C]``: the
    solution of ``d_p u_p - sum_n w_n u_n = sum_(known n) w_n x_n`` for every removed
    pixel ``p`` (``d_p`` the summed weight of its neighbours inside the image), the
    system ROAD solves with a sparse direct solver, here by conjugate gradients on the
    symmetric positive definite operator (a 3x3 depthwise convolution). Known pixels are
    returned as they are."""
    m = removed[..., None].astype(x.dtype)
    deg = _spread(jnp.ones_like(x[..., :1]))  # summed weights of the neighbours inside the image
    rhs = m * _spread(x * (1 - m))

    def op(v):  # on the removed pixels only (v is 0 elsewhere, and so is op(v))
        return m * (deg * v - _spread(m * v))

    known = jnp.sum(x * (1 - m), axis=(1, 2), keepdims=True) / jnp.maximum(jnp.sum(1 - m, axis=(1, 2), keepdims=True),
                                                                           1.0)
    v, _ = jax.scipy.sparse.linalg.cg(op, rhs, x0=m * known, tol=tol, maxiter=max_iter)
    return x * (1 - m) + m * v


# ---------------------------------------------------------------- declarations

SCORED = ("score", "x", "a", "y")
_BASELINE = dict(choices=BASELINES)


@dataclasses.dataclass(frozen=True)
class PixelFlippingConfig(Config):
    """Options of pixel flipping.

    Attributes:
      features_in_step: pixels replaced per step (0: ``ceil(H*W / steps)``).
      steps: steps of the curve when features_in_step is 0.
      baseline: what replaced pixels show: black, white, mean (the image's extremes or
        mean), uniform (a draw between them) or a pixel value.
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      softmax: score probabilities (false: logits).
    """

    features_in_step: int = option(0, min=0)
    steps: int = option(64, min=1, max=1 << 20)
    baseline: str | float = option("black", **_BASELINE)
    abs: bool = False
    normalise: bool = True
    softmax: bool = True

    _owner = "pixel_flipping"


@dataclasses.dataclass(frozen=True)
class RegionPerturbationConfig(Config):
    """Options of region perturbation.

    Attributes:
      patch_size: side of the square regions in pixels.
      order: morf (most relevant first), lerf (least relevant first) or random.
      regions_evaluation: regions removed (at most all).
      baseline: what removed regions show (black, white, mean, uniform or a pixel value).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      incremental: recompute only each step's patch cone on the previous step's maps (exact;
        false: run the whole model on every step's image).
      softmax: score probabilities (false: logits).
    """

    patch_size: int = option(8, min=1)
    order: str = option("morf", choices=("morf", "lerf", "random"))
    regions_evaluation: int = option(100, min=1)
    baseline: str | float = option("black", **_BASELINE)
    abs: bool = False
    normalise: bool = True
    incremental: bool = True
    softmax: bool = True

    _owner = "region_perturbation"


@dataclasses.dataclass(frozen=True)
class SelectivityConfig(Config):
    """Options of selectivity.

    Attributes:
      patch_size: side of the square regions in pixels.
      baseline: what removed regions show (black, white, mean, uniform or a pixel value).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      incremental: recompute only each step's patch cone on the previous step's maps (exact;
        false: run the whole model on every step's image).
      softmax: score probabilities (false: logits).
    """

    patch_size: int = option(8, min=1)
    baseline: str | float = option("black", **_BASELINE)
    abs: bool = False
    normalise: bool = True
    incremental: bool = True
    softmax: bool = True

    _owner = "selectivity"


@dataclasses.dataclass(frozen=True)
class FaithfulnessEstimateConfig(Config):
    """Options of the faithfulness estimate.

    Attributes:
      features_in_step: pixels replaced per step (0: ``ceil(H*W / steps)``).
      steps: steps when features_in_step is 0.
      baseline: what replaced pixels show (black, white, mean, uniform or a pixel value).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      softmax: score probabilities (false: logits).
    """

    features_in_step: int = option(0, min=0)
    steps: int = option(64, min=2, max=1 << 20)
    baseline: str | float = option("black", **_BASELINE)
    abs: bool = False
    normalise: bool = True
    softmax: bool = False

    _owner = "faithfulness_estimate"


@dataclasses.dataclass(frozen=True)
class FaithfulnessCorrelationConfig(Config):
    """Options of the faithfulness correlation.

    Attributes:
      nr_runs: random pixel sets per item.
      subset_size: pixels per set.
      baseline: what replaced pixels show (black, white, mean, uniform or a pixel value).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      softmax: score probabilities (false: logits).
    """

    nr_runs: int = option(100, min=2)
    subset_size: int = option(224, min=1)
    baseline: str | float = option("black", **_BASELINE)
    abs: bool = False
    normalise: bool = True
    softmax: bool = False

    _owner = "faithfulness_correlation"


@dataclasses.dataclass(frozen=True)
class MonotonicityConfig(Config):
    """Options of monotonicity.

    Attributes:
      features_in_step: pixels put back per step (0: ``ceil(H*W / steps)``).
      steps: steps when features_in_step is 0.
      baseline: the starting image's value (black, white, mean, uniform or a pixel value).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      softmax: score probabilities (false: logits).
    """

    features_in_step: int = option(0, min=0)
    steps: int = option(64, min=1, max=1 << 20)
    baseline: str | float = option("black", **_BASELINE)
    abs: bool = True
    normalise: bool = True
    softmax: bool = True

    _owner = "monotonicity"


@dataclasses.dataclass(frozen=True)
class MonotonicityCorrelationConfig(Config):
    """Options of the monotonicity correlation.

    Attributes:
      features_in_step: pixels per step (0: ``ceil(H*W / steps)``).
      steps: steps when features_in_step is 0.
      nr_samples: noise draws per step.
      eps: scores below this count as 0 (the variance is not divided by them).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      softmax: score probabilities (false: logits).
    """

    features_in_step: int = option(0, min=0)
    steps: int = option(32, min=2, max=1 << 20)
    nr_samples: int = option(16, min=1)
    eps: float = option(1e-5, min=0)
    abs: bool = True
    normalise: bool = True
    softmax: bool = True

    _owner = "monotonicity_correlation"


@dataclasses.dataclass(frozen=True)
class SensitivityNConfig(Config):
    """Options of sensitivity-n.

    Attributes:
      fractions: shares of the pixels removed at once (one correlation each; values
        separated by / on the command line).
      nr_samples: random pixel sets per fraction.
      baseline: what removed pixels show (black, white, mean, uniform or a pixel value).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      softmax: score probabilities (false: logits).
    """

    fractions: tuple = option((0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8), above=0, max=1)
    nr_samples: int = option(32, min=2)
    baseline: str | float = option("black", **_BASELINE)
    abs: bool = False
    normalise: bool = True
    softmax: bool = True

    _owner = "sensitivity_n"


@dataclasses.dataclass(frozen=True)
class IrofConfig(Config):
    """Options of IROF.

    Attributes:
      baseline: what removed superpixels show: mean (the image's mean colour), black,
        white, uniform or a pixel value.
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      softmax: score probabilities (false: logits).
    """

    baseline: str | float = option("mean", **_BASELINE)
    abs: bool = False
    normalise: bool = True
    softmax: bool = True

    _owner = "irof"


@dataclasses.dataclass(frozen=True)
class RoadConfig(Config):
    """Options of ROAD.

    Attributes:
      percentages: shares of the pixels removed (in %, one point of the curve each;
        values separated by / on the command line).
      noise: std of the noise added to imputed pixels, as a fraction of the image's range.
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      tol: the imputation solver's relative residual.
      max_iter: the imputation solver's iteration limit.
      softmax: score probabilities (false: logits; a confident model's probability
        saturates and hides the differences).
    """

    percentages: tuple = option(tuple(range(5, 100, 10)), min=0, max=100)
    noise: float = option(0.01, min=0)
    abs: bool = False
    normalise: bool = True
    tol: float = option(1e-5, above=0)
    max_iter: int = option(2000, min=1)
    softmax: bool = False

    _owner = "road"


@dataclasses.dataclass(frozen=True)
class InfidelityConfig(Config):
    """Options of infidelity.

    Attributes:
      patch_sizes: sides of the square patches (values separated by / on the command line).
      n_perturb_samples: perturbation samples.
      noise: std of Gaussian noise added to each sample's fill (0: Quantus's fixed fill).
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
      incremental: recompute only each step's patch cone on the previous step's maps (exact;
        false: run the whole model on every step's image).
      softmax: score probabilities (false: logits).
    """

    patch_sizes: tuple = option((4,), min=1)
    n_perturb_samples: int = option(1, min=1)
    noise: float = option(0.0, min=0)
    abs: bool = False
    normalise: bool = False
    incremental: bool = True
    softmax: bool = False

    _owner = "infidelity"


@dataclasses.dataclass(frozen=True)
class DeletionConfig(Config):
    """Options of the deletion and insertion curves.

    Attributes:
      steps: slices of the curve (steps + 1 points, the first on the untouched image).
      replacement: what removed pixels show: blur (the image blurred) or a pixel value.
      blur_sigma: sigma in pixels of the blurred replacement.
      softmax: score probabilities (false: logits).
    """

    steps: int = option(32, min=1, max=4096)
    replacement: float | str = option("blur", choices=("blur",))
    blur_sigma: float = option(10.0, above=0)
    softmax: bool = True

    _owner = "deletion"


@dataclasses.dataclass(frozen=True)
class KeepExplainedConfig(Config):
    """Options of average drop and increase in confidence.

    Attributes:
      replacement: what the unexplained region shows: blur (the image blurred) or a pixel value.
      blur_sigma: sigma in pixels of the blurred replacement.
      softmax: score probabilities (false: logits).
    """

    replacement: float | str = option("blur", choices=("blur",))
    blur_sigma: float = option(10.0, above=0)
    softmax: bool = True

    _owner = "average_drop"


@dataclasses.dataclass(frozen=True)
class SufficiencyConfig(Config):
    """Options of sufficiency.

    Attributes:
      threshold: maps nearer than this (a fraction of the set's largest distance) count as near.
      abs: take the map's absolute value first.
      normalise: divide each map by its largest absolute value first.
    """

    threshold: float = option(0.6, min=0, max=1)
    abs: bool = True
    normalise: bool = True

    _owner = "sufficiency"


METRICS = (
    MetricSpec("pixel_flipping", "faithfulness", LOWER, SCORED, PixelFlippingConfig, pixel_flipping,
               departure="steps count pixels, and the default takes 64 of them where Quantus's (one pixel per step) "
                         "would run 50,176 forward passes per 224x224 image"),
    MetricSpec("region_perturbation", "faithfulness", HIGHER, SCORED, RegionPerturbationConfig, region_perturbation),
    MetricSpec("selectivity", "faithfulness", LOWER, SCORED, SelectivityConfig, selectivity),
    MetricSpec("faithfulness_estimate", "faithfulness", HIGHER, SCORED, FaithfulnessEstimateConfig,
               faithfulness_estimate,
               departure="64 steps by default instead of one pixel per step (as pixel flipping)"),
    MetricSpec("faithfulness_correlation", "faithfulness", HIGHER, SCORED, FaithfulnessCorrelationConfig,
               faithfulness_correlation,
               departure="random subsets are of whole pixels (all their channels), not of single colour values"),
    MetricSpec("monotonicity", "faithfulness", HIGHER, SCORED, MonotonicityConfig, monotonicity,
               departure="Quantus puts the baseline back instead of the pixels, so every map passes; convlens puts the"
                         " pixels back, as the paper does"),
    MetricSpec("monotonicity_correlation", "faithfulness", HIGHER, SCORED, MonotonicityCorrelationConfig,
               monotonicity_correlation,
               departure="32 steps and 16 samples instead of one pixel per step and 100 samples (5 million passes per "
                         "image); the noise is drawn between the image's min and max, where Quantus draws U(0, 1)"),
    MetricSpec("sensitivity_n", "faithfulness", HIGHER, SCORED, SensitivityNConfig, sensitivity_n,
               departure="Quantus removes the top-n pixels cumulatively and correlates across the items of a batch (an"
                         " item's score depends on its batch); convlens follows the paper: random sets of n pixels per"
                         " item"),
    MetricSpec("irof", "faithfulness", HIGHER, SCORED + ("segments", "n_segments"), IrofConfig, irof,
               departure="Quantus fills with the mean of the whole batch's images (an item's score depends on the "
                         "others); convlens with the item's own mean, as the paper; Quantus 0.6's IROF crashes on RGB "
                         "input, so parity is checked on one channel"),
    MetricSpec("road_morf", "faithfulness", LOWER, SCORED, RoadConfig, road, {"order": "morf"},
               doc="ROAD, most relevant pixels removed first (Rong et al. 2022)",
               departure="scores the target's logit (a confident model's probability stays at 0.999 whatever is "
                         "removed); noise is a fraction of the image's value range; Quantus 0.6's ROAD crashes on RGB "
                         "input, so parity is checked on one channel"),
    MetricSpec("road_lerf", "faithfulness", HIGHER, SCORED, RoadConfig, road, {"order": "lerf"},
               doc="ROAD, least relevant pixels removed first (Rong et al. 2022)",
               departure="as road_morf"),
    MetricSpec("road_gain", "faithfulness", HIGHER, SCORED, RoadConfig, road_gain,
               doc="ROAD's gain, least- minus most-relevant-first (Blücher et al. 2024)"),
    MetricSpec("infidelity", "faithfulness", LOWER, SCORED, InfidelityConfig, infidelity,
               departure="Quantus's patches accumulate and its samples are identical with a fixed baseline; kept for "
                         "parity, and noise > 0 makes the samples differ (the paper's random perturbations)"),
    MetricSpec("deletion", "faithfulness", LOWER, SCORED, DeletionConfig, deletion,
               doc="Deletion (Petsiuk et al. 2018)"),
    MetricSpec("insertion", "faithfulness", HIGHER, SCORED, DeletionConfig, insertion),
    MetricSpec("average_drop", "faithfulness", LOWER, SCORED, KeepExplainedConfig, average_drop,
               doc="Average drop (Chattopadhay et al. 2018)"),
    MetricSpec("increase_in_confidence", "faithfulness", HIGHER, SCORED, KeepExplainedConfig,
               increase_in_confidence),
    MetricSpec("sufficiency", "faithfulness", HIGHER, ("a", "predicted"), SufficiencyConfig, sufficiency,
               per_item=False,
               doc="Sufficiency over the set of rated items (Dasgupta et al. 2022)",
               departure="pixels constant over the set are left out of the distance (scipy makes every distance NaN "
                         "there, so Quantus finds no neighbour at all)"),
)
