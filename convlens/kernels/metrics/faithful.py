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

import math

import jax
import jax.numpy as jnp

from convlens.kernels.metrics.base import (baseline_value, pearson, pixel_order, prepare, ranks_of, scan_steps,
                                           spearman_rows, target_score, trapezoid)


def _step(h: int, w: int, features_in_step: int, steps: int) -> int:
    return int(features_in_step) if features_in_step else max(1, math.ceil(h * w / steps))


def pixel_flipping(score, x, a, y, *, features_in_step=0, steps=64, baseline="black", abs=False, normalise=True,
                   key=None):
    """Pixel flipping (Bach et al. 2015): the most relevant pixels are replaced by the
    baseline, ``features_in_step`` more at each step, cumulatively; ``curve [B, S]`` is
    the target's score after each step (Quantus's output) and ``score`` its area with
    unit spacing divided by ``S - 1`` (the mean height; lower is more faithful)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    k = _step(h, w, features_in_step, steps)
    n = math.ceil(h * w / k)
    ranks = ranks_of(pixel_order(a)).reshape(b, h, w)
    base = baseline_value(x, baseline, key)

    def make(s):
        return jnp.where((ranks < (s + 1) * k)[..., None], base, x)
    curve = scan_steps(score, make, n, y)
    return {"curve": curve, "score": trapezoid(curve) / max(n - 1, 1)}


def _patches(h, w, p):
    """Patch index of each pixel ``[H, W]`` on a grid of ``p x p`` patches placed as
    Quantus places them (the image padded by ``(pad // 2, pad - pad // 2)`` to a multiple
    of ``p``), and the patch count."""
    ph, pw = (-h) % p, (-w) % p
    gy = (jnp.arange(h) + ph // 2) // p
    gx = (jnp.arange(w) + pw // 2) // p
    nx = (w + pw) // p
    return gy[:, None] * nx + gx[None, :], ((h + ph) // p) * nx


def _patch_order(a, p, order, key):
    b, h, w = a.shape
    idx, n = _patches(h, w, p)
    sums = jax.vmap(lambda m: jax.ops.segment_sum(m.ravel(), idx.ravel(), num_segments=n))(a)
    if order == "random":
        ordering = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, b))
    else:
        ordering = jnp.argsort(-sums if order == "morf" else sums, axis=1, stable=True)
    rank = ranks_of(ordering)  # [B, n]: when each patch goes
    return rank[:, idx], n  # [B, H, W]


def region_perturbation(score, x, a, y, *, patch_size=8, order="morf", regions_evaluation=100, baseline="black",
                        abs=False, normalise=True, key=None):
    """Region perturbation (Samek et al. 2015): ``patch_size`` squares are replaced by the
    baseline in the order of their summed relevance (``morf``: most relevant first,
    ``lerf``, ``random``), cumulatively, ``regions_evaluation`` of them. ``curve`` is the
    drop ``f(x) - f(x_s)`` after each step, as Quantus; ``score`` its mean (higher is
    more faithful for ``morf``)."""
    a = prepare(a, abs, normalise)
    rank, n = _patch_order(a, patch_size, order, key)
    steps = min(regions_evaluation, n)
    base = baseline_value(x, baseline, key)
    f0 = target_score(score, x, y)
    curve = f0[:, None] - scan_steps(score, lambda s: jnp.where((rank <= s)[..., None], base, x), steps, y)
    return {"curve": curve, "score": curve.mean(axis=1)}


def selectivity(score, x, a, y, *, patch_size=8, baseline="black", abs=False, normalise=True, key=None):
    """Selectivity (Montavon et al. 2018): patches removed most relevant first, all of
    them; ``curve`` the target's score after each removal (as Quantus) and ``score`` its
    area with unit spacing over ``S - 1`` (lower is more faithful)."""
    a = prepare(a, abs, normalise)
    rank, n = _patch_order(a, patch_size, "morf", key)
    base = baseline_value(x, baseline, key)
    curve = scan_steps(score, lambda s: jnp.where((rank <= s)[..., None], base, x), n, y)
    return {"curve": curve, "score": trapezoid(curve) / max(n - 1, 1)}


def faithfulness_estimate(score, x, a, y, *, features_in_step=0, steps=64, baseline="black", abs=False,
                          normalise=True, key=None):
    """Faithfulness estimate (Alvarez-Melis & Jaakkola 2018): each step's pixels alone
    (not cumulatively) are replaced; ``score`` is the Pearson correlation between their
    summed relevance and the target's drop (higher is more faithful)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    k = _step(h, w, features_in_step, steps)
    n = math.ceil(h * w / k)
    ranks = ranks_of(pixel_order(a)).reshape(b, h, w)
    group = ranks // k  # [B, H, W]: the step that replaces the pixel
    base = baseline_value(x, baseline, key)
    f0 = target_score(score, x, y)
    drops = f0[:, None] - scan_steps(score, lambda s: jnp.where((group == s)[..., None], base, x), n, y)
    sums = jax.vmap(lambda g, m: jax.ops.segment_sum(m.ravel(), g.ravel(), num_segments=n))(group, a)
    return {"score": pearson(sums, drops), "curve": drops}


def random_subsets(key, b, pixels, runs, size):
    """``[B, runs, size]`` pixel indices, each row drawn without replacement."""
    keys = jax.random.split(key, b * runs)
    draw = jax.vmap(lambda k: jax.random.choice(k, pixels, (size,), replace=False))(keys)
    return draw.reshape(b, runs, size)


def faithfulness_correlation(score, x, a, y, *, nr_runs=100, subset_size=224, baseline="black", abs=False,
                             normalise=True, key=None, subsets=None):
    """Faithfulness correlation (Bhatt et al. 2020): ``nr_runs`` random sets of
    ``subset_size`` pixels are replaced; ``score`` is the Pearson correlation between
    each set's summed relevance and the target's drop (higher is more faithful).
    ``subsets [B, R, k]`` gives the draws (for parity with another implementation)."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    if subsets is None:
        subsets = random_subsets(key, b, h * w, nr_runs, subset_size)
    runs = subsets.shape[1]
    base = baseline_value(x, baseline, key)
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
                 key=None):
    """Monotonicity (Arya et al. 2019): starting from the baseline image, pixels are put
    back least relevant first; ``score`` is 1 where the target's score never falls
    (Quantus's boolean), ``curve`` the scores."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    k = _step(h, w, features_in_step, steps)
    n = math.ceil(h * w / k)
    ranks = ranks_of(pixel_order(a, descending=False)).reshape(b, h, w)
    base = baseline_value(x, baseline, key)
    curve = scan_steps(score, lambda s: jnp.where((ranks < (s + 1) * k)[..., None], x, base), n, y)
    return {"curve": curve, "score": jnp.all(jnp.diff(curve, axis=1) >= 0, axis=1).astype(jnp.float32)}


def monotonicity_correlation(score, x, a, y, *, features_in_step=0, steps=32, nr_samples=16, eps=1e-5,
                             abs=True, normalise=True, key=None, fills=None):
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
        fills = lo + (hi - lo) * jax.random.uniform(key, (n, nr_samples, b))
    r = fills.shape[1]

    def make(i):
        s, j = i // r, i % r
        return jnp.where((group == s)[..., None], fills[s, j][:, None, None, None], x)
    p = scan_steps(score, make, n * r, y).reshape(b, n, r)
    var = jnp.mean((p - f0[:, None, None]) ** 2, axis=2) * inv[:, None]
    sums = jax.vmap(lambda g, m: jax.ops.segment_sum(m.ravel(), g.ravel(), num_segments=n))(group, a)
    return {"score": spearman_rows(sums, var), "curve": var}


def sensitivity_n(score, x, a, y, *, fractions=(0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8), nr_samples=32,
                  baseline="black", abs=False, normalise=True, key=None):
    """Sensitivity-n (Ancona et al. 2018), as the paper defines it: for each ``n`` (a
    fraction of the pixels), ``nr_samples`` random sets of ``n`` pixels are removed and
    the Pearson correlation between their summed relevance and the target's drop is
    taken; ``curve [B, len(fractions)]``, ``score`` its mean (higher is better).
    Quantus 0.6 instead removes the top-``n`` pixels cumulatively and correlates across
    the items of a batch, which makes an item's score depend on its batch."""
    a = prepare(a, abs, normalise)
    b, h, w = a.shape
    keys = jax.random.split(key, len(fractions))
    out = []
    for f, k in zip(fractions, keys):
        size = max(1, int(round(f * h * w)))
        out.append(faithfulness_correlation(score, x, a, y, nr_runs=nr_samples, subset_size=size, baseline=baseline,
                                            abs=False, normalise=False, key=k)["score"])
    curve = jnp.stack(out, axis=1)
    return {"curve": curve, "score": jnp.nanmean(curve, axis=1)}


def irof(score, x, a, y, segments, *, n_segments, baseline="mean", abs=False, normalise=True, key=None):
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
    base = jnp.mean(x, axis=(1, 2), keepdims=True) if baseline == "mean" else baseline_value(x, baseline, key)
    f0 = target_score(score, x, y)
    curve = scan_steps(score, lambda s: jnp.where((pix <= s)[..., None], base, x), nmax, y) / f0[:, None]
    n = present.sum(axis=1)
    valid = jnp.arange(nmax)[None] < n[:, None]
    curve = jnp.where(valid, curve, 0.0)
    return {"curve": curve, "score": n - trapezoid(curve)}


def infidelity(score, x, a, y, *, patch_sizes=(4,), n_perturb_samples=10, noise=0.0, abs=False, normalise=False,
               key=None):
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
    keys = jax.random.split(key if key is not None else jax.random.PRNGKey(0), n_perturb_samples)
    errs = []
    for ks in keys:
        for p in patch_sizes:
            idx, n = _patches(h, w, p)
            fill = baseline_value(x, "black") + noise * jax.random.normal(ks, x.shape)

            def make(s, idx=idx, fill=fill):
                return jnp.where((idx <= s)[None, ..., None], fill, x)

            fs = scan_steps(score, make, n, y)  # [B, n]

            def attr_sum(s, idx=idx, fill=fill):
                xs = jnp.where((idx <= s)[None, ..., None], fill, x)
                return jnp.sum(a * jnp.sum(x - xs, axis=-1), axis=(1, 2))
            sums = jax.lax.map(attr_sum, jnp.arange(n)).T
            errs.append(jnp.mean(((f0[:, None] - fs) - sums) ** 2, axis=1))
    return {"score": jnp.mean(jnp.stack(errs, 1), axis=1)}


def road(score, x, a, y, *, percentages=tuple(range(1, 100, 2)), noise=0.01, order="morf", abs=False,
         normalise=True, key=None, tol=1e-5, max_iter=2000):
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
    keys = jax.random.split(key if key is not None else jax.random.PRNGKey(0), len(percentages))

    spread = x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True)

    def make(s):
        removed = ranks < counts[s]
        filled = impute(x, removed, tol=tol, max_iter=max_iter)
        return jnp.where(removed[..., None], filled + noise * spread * jax.random.normal(keys[s], x.shape), x)
    curve, cls = scan_steps(score, make, len(percentages), y, with_class=True)
    return {"curve": curve, "accuracy": (cls == y[:, None]).astype(jnp.float32), "score": curve.mean(axis=1)}


def road_gain(score, x, a, y, *, percentages=tuple(range(1, 100, 2)), noise=0.01, abs=False, normalise=True,
              key=None, tol=1e-5, max_iter=2000):
    """ROAD's two orders on the same item: ``curve`` is LeRF's score minus MoRF's per
    percentage and ``score`` its mean (the area between the curves, higher is more
    faithful). Both curves share the item's own level, so the difference drops it: the
    "symmetric relevance gain" of Blücher et al. (2024), which compares methods item by
    item where one order alone varies more across items than between methods."""
    k1, k2 = jax.random.split(key if key is not None else jax.random.PRNGKey(0))
    opts = dict(percentages=percentages, noise=noise, abs=abs, normalise=normalise, tol=tol, max_iter=max_iter)
    morf = road(score, x, a, y, order="morf", key=k1, **opts)
    lerf = road(score, x, a, y, order="lerf", key=k2, **opts)
    return {"curve": lerf["curve"] - morf["curve"], "score": lerf["score"] - morf["score"]}


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


_NEIGHBOURS = jnp.asarray([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], jnp.float32)


def _spread(v):
    """``sum_n w_n v[p + n]`` over the 8 neighbours inside the image: ``v [B, H, W, C]``."""
    c = v.shape[-1]
    k = jnp.tile(_NEIGHBOURS[:, :, None, None], (1, 1, 1, c))
    return jax.lax.conv_general_dilated(v, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c, precision=jax.lax.Precision.HIGHEST)


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
