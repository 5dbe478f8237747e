"""The metric catalogue against independent truths: naive one-item loops, hand-computed
cases, analytic identities, scipy's direct solver, scikit-image's SSIM; and (CI, with
PyTorch and Quantus installed) against Quantus 0.6 on a PyTorch twin with identical
weights, fed the same images, maps and draws."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convlens.kernels import common
from convlens.kernels.metrics import axioms, complexity, faithful, localise, randomise, robust
from convlens.models.preprocess import Preprocess
from tests.kernels.nets import functional, layer, with_random_biases

B, H, W = 4, 16, 16


def grey_net(classes=5):
    m = functional("grey", [
        layer("Conv2D", "c1", "img", filters=6, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("MaxPooling2D", "p1", "c1", pool_size=[2, 2], strides=[2, 2], padding="valid"),
        layer("Conv2D", "c2", "p1", filters=8, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("GlobalAveragePooling2D", "gap", "c2"),
        layer("Dense", "pred", "gap", units=classes, activation="softmax")], (H, W, 1))
    return m.replace(preprocess=Preprocess("none"))


@pytest.fixture(scope="module")
def setup():
    model = grey_net()
    params = with_random_biases(model, 3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (B, H, W, 1)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(B, H, W)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3])
    s = np.zeros((B, H, W), bool)
    s[:, 4:10, 3:9] = True
    s[3, :, :] = False
    s[3, 0, 0] = True
    return model, params, x, a, y, jnp.asarray(s)


def probs_of(model, params):
    return jax.jit(lambda im: common.probabilities(model, common.forward_logits(model, params, im)))


def logits_of(model, params):
    return jax.jit(lambda im: common.forward_logits(model, params, im))


def prep(a, abs_=False):
    a = np.abs(a) if abs_ else np.asarray(a)
    return a / np.abs(a).reshape(len(a), -1).max(1)[:, None, None]


def naive_curve(score, x, order, k, fill, cumulative=True, reverse=False):
    """One item at a time, one step at a time: the target scores after replacing pixels."""
    x = np.asarray(x)
    out = np.zeros((len(x), -(-H * W // k)))
    for b in range(len(x)):
        cur = x[b].reshape(-1, x.shape[-1]).copy()
        if reverse:
            cur[:] = fill[b]
        for s in range(out.shape[1]):
            ix = order[b, s * k:(s + 1) * k]
            img = cur if cumulative else x[b].reshape(-1, x.shape[-1]).copy()
            img[ix] = x[b].reshape(-1, x.shape[-1])[ix] if reverse else fill[b]
            out[b, s] = score(img.reshape(1, H, W, -1))[b]
    return out


def test_pixel_flipping_monotonicity_and_estimate_match_naive_loops(setup):
    model, params, x, a, y, _ = setup
    p = probs_of(model, params)
    yn = np.asarray(y)

    def sc(im):
        return np.asarray(p(jnp.asarray(im, jnp.float32)))[0][yn]
    an = prep(a)
    order = np.argsort(-an.reshape(B, -1), axis=1, kind="stable")
    fill = np.asarray(x).reshape(B, -1).min(1)
    ref = naive_curve(sc, x, order, 8, fill)
    ours = faithful.pixel_flipping(p, x, a, y, features_in_step=8)
    np.testing.assert_allclose(ours["curve"], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["score"], np.trapezoid(ref, axis=1) / (ref.shape[1] - 1), rtol=1e-5)
    # Monotonicity: from the baseline image, put pixels back least relevant first.
    up = np.argsort(np.abs(np.asarray(a)).reshape(B, -1), axis=1, kind="stable")
    ref = naive_curve(sc, x, up, 8, fill, reverse=True)
    ours = faithful.monotonicity(p, x, a, y, features_in_step=8)
    np.testing.assert_allclose(ours["curve"], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours["score"], np.all(np.diff(ref, axis=1) >= 0, axis=1))
    # Estimate: each step alone, the correlation of relevance sums with the drops.
    ref = naive_curve(sc, x, order, 8, fill, cumulative=False)
    f0 = np.array([sc(np.asarray(x)[b:b + 1])[b] for b in range(B)])
    ours = faithful.faithfulness_estimate(p, x, a, y, features_in_step=8)
    sums = np.take_along_axis(an.reshape(B, -1), order, 1).reshape(B, -1, 8).sum(-1)
    want = [np.corrcoef(sums[b], f0[b] - ref[b])[0, 1] for b in range(B)]
    np.testing.assert_allclose(ours["score"], want, rtol=1e-4)


def test_region_perturbation_and_selectivity_match_a_patch_loop(setup):
    model, params, x, a, y, _ = setup
    p = probs_of(model, params)
    xn, an = np.asarray(x), prep(a)
    sums = an.reshape(B, 4, 4, 4, 4).sum(axis=(2, 4)).reshape(B, 16)
    order = np.argsort(-sums, axis=1, kind="stable")
    fill = xn.reshape(B, -1).min(1)
    curve = np.zeros((B, 16))
    for b in range(B):
        img = xn[b].copy()
        for s, q in enumerate(order[b]):
            r, c = divmod(q, 4)
            img[4 * r:4 * r + 4, 4 * c:4 * c + 4] = fill[b]
            curve[b, s] = np.asarray(p(jnp.asarray(img[None])))[0, int(y[b])]
    f0 = np.asarray(p(x))[np.arange(B), np.asarray(y)]
    np.testing.assert_allclose(faithful.selectivity(p, x, a, y, patch_size=4)["curve"], curve, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(faithful.region_perturbation(p, x, a, y, patch_size=4)["curve"], f0[:, None] - curve,
                               rtol=1e-4, atol=1e-6)


def test_irof_matches_a_segment_loop(setup):
    """Segments removed in the order of their mean relevance, filled with the image's
    mean, cumulatively; the area over ``f(x_s) / f(x)``."""
    model, params, x, a, y, _ = setup
    p = probs_of(model, params)
    rng = np.random.default_rng(4)
    seg = np.stack([(np.arange(H * W).reshape(H, W) // 32 + b) % 8 for b in range(B)])  # 8 bands, shifted
    seg[1][seg[1] == 7] = 6  # item 1 has 7 segments
    seg[1] = np.unique(seg[1], return_inverse=True)[1].reshape(H, W)
    a = jnp.asarray(rng.normal(size=(B, H, W)), jnp.float32)
    out = faithful.irof(p, x, a, y, jnp.asarray(seg), n_segments=8)
    xn, an = np.asarray(x), prep(a)
    for b in range(B):
        n = seg[b].max() + 1
        means = np.array([an[b][seg[b] == k].mean() for k in range(n)])
        img = xn[b].copy()
        f0 = float(np.asarray(p(jnp.asarray(xn[b:b + 1])))[0, int(y[b])])
        curve = []
        for k in np.argsort(-means, kind="stable"):
            img[seg[b] == k] = xn[b].mean(axis=(0, 1))
            curve.append(float(np.asarray(p(jnp.asarray(img[None])))[0, int(y[b])]) / f0)
        curve = np.asarray(curve + [0.0] * (8 - n))
        np.testing.assert_allclose(out["curve"][b], curve, rtol=1e-5, atol=1e-6)
        assert float(out["score"][b]) == pytest.approx(n - np.trapezoid(curve), rel=1e-5)


def test_imputation_solves_roads_linear_system_exactly():
    """Against scipy's direct sparse solver on the system ROAD writes down."""
    from scipy.sparse import lil_matrix
    from scipy.sparse.linalg import spsolve
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (1, 12, 10, 2)).astype(np.float32)
    rem = np.zeros((12, 10), bool)
    rem[2:8, 1:7] = True
    rem[0, :4] = True
    rem[11, 9] = True
    ids = {p: i for i, p in enumerate(zip(*np.nonzero(rem)))}
    A = lil_matrix((len(ids), len(ids)))
    rhs = np.zeros((len(ids), 2))
    for (i, j), r in ids.items():
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di, dj) == (0, 0) or not (0 <= i + di < 12 and 0 <= j + dj < 10):
                    continue
                wgt = 1 / 12 if di and dj else 1 / 6
                A[r, r] += wgt
                if rem[i + di, j + dj]:
                    A[r, ids[(i + di, j + dj)]] -= wgt
                else:
                    rhs[r] += wgt * img[0, i + di, j + dj]
    sol = spsolve(A.tocsc(), rhs)
    ours = np.asarray(faithful.impute(jnp.asarray(img), jnp.asarray(rem)[None], tol=1e-7))[0]
    np.testing.assert_allclose(ours[rem], sol, atol=2e-5)
    np.testing.assert_array_equal(ours[~rem], img[0][~rem])


def test_road_with_no_noise_is_the_imputed_images_scores(setup):
    model, params, x, a, y, _ = setup
    p = probs_of(model, params)
    out = faithful.road(p, x, a, y, percentages=(10, 50), noise=0.0, tol=1e-7)
    an = prep(a)
    for j, pc in enumerate((10, 50)):
        k = int(H * W * pc / 100)
        rem = np.zeros((B, H * W), bool)
        np.put_along_axis(rem, np.argsort(-an.reshape(B, -1), 1, kind="stable")[:, :k], True, 1)
        rem = rem.reshape(B, H, W)
        img = np.where(rem[..., None], np.asarray(faithful.impute(x, jnp.asarray(rem), tol=1e-7)), np.asarray(x))
        pr = np.asarray(p(jnp.asarray(img)))
        np.testing.assert_allclose(out["curve"][:, j], pr[np.arange(B), np.asarray(y)], rtol=1e-5)
        np.testing.assert_array_equal(out["accuracy"][:, j], pr.argmax(1) == np.asarray(y))


def test_localisation_against_hand_counts_and_brute_force(setup):
    *_, a, y, s = setup
    an, sn = np.asarray(a), np.asarray(s)
    for b in range(B):
        flat, m = an[b].ravel(), sn[b].ravel()
        pos, neg = flat[m], flat[~m]
        auc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
        assert abs(float(localise.auc(a, s)["score"][b]) - auc) < 1e-6
        top = np.argsort(-flat, kind="stable")
        assert abs(float(localise.relevance_rank_accuracy(a, s)["score"][b]) - m[top[:m.sum()]].mean()) < 1e-6
        assert abs(float(localise.top_k_intersection(a, s, k=20)["score"][b]) - m[top[:20]].mean()) < 1e-6
        assert float(localise.pointing_game(a, s)["score"][b]) == float(m[flat.argmax()])
        al = np.abs(flat)
        assert abs(float(localise.attribution_localisation(a, s)["score"][b]) - al[m].sum() / al.sum()) < 1e-5
        assert abs(float(localise.relevance_mass_accuracy(a, s)["score"][b]) - flat[m].sum() / flat.sum()) < 1e-4
    assert np.isnan(localise.auc(a, jnp.zeros_like(s))["score"]).all()


def test_complexity_hand_cases():
    one = jnp.zeros((1, 4, 4)).at[0, 1, 2].set(3.0)
    flat = jnp.ones((1, 4, 4))
    assert float(complexity.sparseness(one)["score"][0]) == pytest.approx(15 / 16, abs=1e-5)
    assert float(complexity.sparseness(flat)["score"][0]) == pytest.approx(0.0, abs=1e-6)
    assert float(complexity.complexity(flat)["score"][0]) == pytest.approx(np.log(16), abs=1e-5)
    assert float(complexity.complexity(one)["score"][0]) == pytest.approx(0.0, abs=1e-5)
    assert float(complexity.effective_complexity(one)["score"][0]) == 1
    assert float(complexity.effective_complexity(flat)["score"][0]) == 16


def test_robustness_identities(setup):
    """With the map equal to the (single-channel) input, the Lipschitz ratio is exactly 1
    and the sensitivity is the noise's norm over the image's."""
    *_, x, _, y, _ = setup

    def score(im):
        return jnp.ones((im.shape[0], 5))

    def explain(im, t):
        return im[..., 0]
    a = x[..., 0]
    k = jax.random.PRNGKey(1)
    lle = robust.local_lipschitz_estimate(explain, score, x, a, y, nr_samples=4, normalise=False,
                                          keys=jax.random.split(k, len(x)))
    np.testing.assert_allclose(lle["score"], 1.0, rtol=1e-5)
    noises = jax.random.uniform(k, (3, *x.shape), minval=-0.1, maxval=0.1)
    sens = robust.sensitivity(explain, score, x, a, y, reduce="max", noises=noises)
    want = (np.sqrt((np.asarray(noises) ** 2).sum(axis=(2, 3, 4))) / np.sqrt((np.asarray(a) ** 2).sum(axis=(1, 2))))
    np.testing.assert_allclose(sens["score"], want.max(0), rtol=1e-5)


def test_continuity_matches_a_translation_loop(setup):
    """Continuity against one item, one shift at a time, columns moved by hand; a method
    that ignores the input scores 0 (its map never changes), and so does a stored map
    that is not the method's (the reference is the method re-run)."""
    *_, x, _, y, _ = setup

    def score(im):
        return jnp.ones((im.shape[0], 5))

    def explain(im, t):  # a non-linear, item-dependent map
        return jnp.tanh(3 * im[..., 0] - t[:, None, None]) * im[..., 0].mean(axis=(1, 2))[:, None, None]
    a = explain(x, y)
    xn = np.asarray(x)
    for steps in (8, 28, 40):
        got = np.asarray(robust.continuity(explain, score, x, a, y, nr_steps=steps)["score"])
        dx = (2 * W + 1) // steps
        for b in range(B):
            ref = prep(np.abs(np.asarray(explain(x[b:b + 1], y[b:b + 1]))))[0]
            best = -np.inf
            for k in range(1, steps + 1):
                t = min(-W + k * dx, W)
                shifted = np.full_like(xn[b], xn[b].min())
                for col in range(W):
                    if 0 <= col - t < W:
                        shifted[:, col] = xn[b][:, col - t]
                m = prep(np.abs(np.asarray(explain(jnp.asarray(shifted[None]), y[b:b + 1]))))[0]
                den = np.sqrt(((xn[b] - shifted) ** 2).sum())
                best = max(best, np.abs(ref - m).sum() / (den + 1e-9) if den > 0 else 0.0)
            np.testing.assert_allclose(got[b], best, rtol=1e-5)
    blind = robust.continuity(lambda im, t: jnp.ones(im.shape[:3]), score, x, a, y)
    np.testing.assert_allclose(blind["score"], 0.0, atol=1e-6)


def test_ssim_matches_scikit_image_and_random_logit_of_a_class_blind_map():
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 3, 20, 24)).astype(np.float32)
    b = a + 0.5 * b
    for i in range(3):
        rngv = max(a[i].max(), b[i].max()) - min(a[i].min(), b[i].min())
        want2 = structural_similarity(a[i], b[i], win_size=7, data_range=rngv)
        want1 = structural_similarity(a[i].ravel(), b[i].ravel(), win_size=7, data_range=rngv)
        assert float(randomise.ssim(jnp.asarray(a), jnp.asarray(b))[i]) == pytest.approx(want2, abs=1e-5)
        assert float(randomise.ssim(jnp.asarray(a.reshape(3, -1)), jnp.asarray(b.reshape(3, -1)))[i]) == \
            pytest.approx(want1, abs=1e-5)
    x = jnp.asarray(rng.uniform(size=(3, 20, 24, 1)), jnp.float32)
    out = randomise.random_logit(lambda im, t: im[..., 0], x, x[..., 0], jnp.asarray([0, 1, 2]), num_classes=10,
                                 keys=jax.random.split(jax.random.PRNGKey(0), 3))
    np.testing.assert_allclose(out["score"], 1.0, atol=1e-6)


def test_completeness_holds_for_gradient_times_input_on_a_linear_model():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(H * W, 3)), jnp.float32)
    x = jnp.asarray(rng.uniform(size=(2, H, W, 1)), jnp.float32)
    y = jnp.asarray([0, 2])

    def score(im):
        return im.reshape(im.shape[0], -1) @ w
    x0 = x.min(axis=(1, 2, 3), keepdims=True)
    a = (w[:, y].T.reshape(2, H, W) * (x - x0)[..., 0])
    assert np.asarray(axioms.completeness(score, x, a, y)["score"]).tolist() == [1.0, 1.0]
    assert np.asarray(axioms.completeness(score, x, 2 * a, y)["score"]).tolist() == [0.0, 0.0]
    # Non-sensitivity: the model ignores the right half; a map zero there and non-zero on
    # the left makes no mistake, a map the other way round errs on every pixel.
    wl = w.reshape(H, W, 3).at[:, W // 2:].set(0.0).reshape(-1, 3)

    def left(im):
        return im.reshape(im.shape[0], -1) @ wl
    good = jnp.zeros((2, H, W)).at[:, :, :W // 2].set(1.0)
    assert np.asarray(axioms.non_sensitivity(left, x, good, y, features_in_step=1, baseline=-1.0)["score"]).tolist() == [0, 0]
    assert np.asarray(axioms.non_sensitivity(left, x, 1 - good, y, features_in_step=1, baseline=-1.0)["score"]).tolist() == \
        [H * W, H * W]


def test_names_expand_and_stages_cascade():
    from convlens.errors import OptionError
    from convlens.kernels.metrics.registry import expand
    assert expand("complexity,auc") == ["sparseness", "complexity", "effective_complexity", "auc"]
    assert expand("basic") == ["deletion", "insertion", "average_drop", "increase_in_confidence", "mprt"]
    assert expand("none") == [] and expand("") == []
    assert randomise.cascade(["a", "b", "c", "d", "e"], 4) == [("a",), ("b",), ("c", "d"), ("e",)]
    assert randomise.cascade(["a", "b"], 4) == [("a",), ("b",)]
    with pytest.raises(OptionError, match="unknown metric 'nope'"):
        expand("nope")


@pytest.mark.slow
def test_parity_with_quantus(setup, monkeypatch):
    """Quantus 0.6 on the PyTorch twin, same images, maps and targets: deterministic
    metrics agree within 1e-4 relative (1e-5 absolute: float32 differences of logits)
    . Quantus normalises maps by the batch's largest
    value (not each map's), which leaves these metrics unchanged."""
    pytest.importorskip("torch", reason="PyTorch not installed (CI installs it for this check)")
    quantus = pytest.importorskip("quantus", reason="Quantus not installed (CI installs it for this check)")
    from tests.torch_twin import twin
    model, params, x, a, y, s = setup
    net = twin(model, {k: {n: np.asarray(v) for n, v in vs.items()} for k, vs in params.items()}, logits=True)
    p, lg = probs_of(model, params), logits_of(model, params)
    xn = np.asarray(x).transpose(0, 3, 1, 2).copy()
    an, yn, sn = np.asarray(a)[:, None].copy(), np.asarray(y), np.asarray(s)[:, None].astype(float)

    def theirs(metric, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(metric(model=net, x_batch=xn.copy(), y_batch=yn, a_batch=an.copy(), device="cpu", **kw),
                              dtype=np.float64)

    def same(ours, ref):
        ours = np.asarray(ours, np.float64)
        assert ours.shape == ref.shape
        assert np.allclose(ours, ref, rtol=1e-4, atol=1e-5, equal_nan=True), (ours, ref)
    q = {"disable_warnings": True}
    same(faithful.pixel_flipping(p, x, a, y, features_in_step=8)["curve"],
         theirs(quantus.PixelFlipping(features_in_step=8, **q)))
    same(faithful.region_perturbation(p, x, a, y, patch_size=4)["curve"],
         theirs(quantus.RegionPerturbation(patch_size=4, **q)))
    same(faithful.selectivity(p, x, a, y, patch_size=4)["curve"], theirs(quantus.Selectivity(patch_size=4, **q)))
    same(faithful.faithfulness_estimate(lg, x, a, y, features_in_step=8)["score"],
         theirs(quantus.FaithfulnessEstimate(features_in_step=8, **q)))
    for name, ref in [("pointing_game", quantus.PointingGame), ("attribution_localisation",
                      quantus.AttributionLocalisation), ("relevance_rank_accuracy", quantus.RelevanceRankAccuracy),
                      ("relevance_mass_accuracy", quantus.RelevanceMassAccuracy), ("auc", quantus.AUC)]:
        same(getattr(localise, name)(a, s)["score"], theirs(ref(**q), s_batch=sn))
    same(localise.top_k_intersection(a, s, k=20)["score"], theirs(quantus.TopKIntersection(k=20, **q), s_batch=sn))
    for name, ref in [("sparseness", quantus.Sparseness), ("complexity", quantus.Complexity),
                      ("effective_complexity", quantus.EffectiveComplexity)]:
        same(getattr(complexity, name)(a)["score"], theirs(ref(**q)))
    # ROAD's imputation against Quantus's own (noise off on both sides).
    from quantus.functions.perturb_func import noisy_linear_imputation
    rem = np.zeros((H, W), bool)
    rem[3:9, 2:12] = True
    ref = noisy_linear_imputation(xn[0], np.flatnonzero(rem.ravel()), noise=0.0)
    ours = np.asarray(faithful.impute(x[:1], jnp.asarray(rem)[None], tol=1e-7))[0].transpose(2, 0, 1)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    # Quantus 0.6's Monotonicity "restores" pixels of the all-baseline image with the
    # baseline, so its curve is flat and every map passes; we follow Arya et al.
    assert theirs(quantus.Monotonicity(features_in_step=8, **q)).tolist() == [1.0] * B
    # IROF on Quantus's own SLIC superpixels, with a constant fill: its "mean" fill is the
    # mean of the whole batch's current images (see `faithful.irof`), a constant is not.
    from quantus.helpers.utils import get_superpixel_segments
    seg = np.stack([get_superpixel_segments(np.moveaxis(xn[i], 0, -1).astype("double"), "slic") for i in range(B)])
    ours = faithful.irof(p, x, a, y, jnp.asarray(seg), n_segments=int(seg.max()) + 1, baseline=0.0)["score"]
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)  # Quantus 0.6 calls NumPy 1's name
    same(ours, theirs(quantus.IROF(perturb_baseline=0.0, return_aggregate=False, **q)))
    # Sufficiency over the batch: two items' maps made near each other, a threshold
    # between the near pair's distance and the others' (maps unnormalised on both sides:
    # Quantus scales the batch by one number, we each map by its own).
    from scipy.spatial.distance import cdist
    a2 = np.asarray(a).copy()
    a2[1] = a2[0] + 0.05 * a2[1]
    d = cdist(np.abs(a2).reshape(B, -1), np.abs(a2).reshape(B, -1), "seuclidean")  # abs: both sides' default
    d /= d.max()
    th = float(np.sort(d[np.triu_indices(B, 1)])[:2].mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(quantus.Sufficiency(threshold=th, normalise=False, **q)(
            model=net, x_batch=xn.copy(), y_batch=yn, a_batch=a2[:, None].copy(), device="cpu"), dtype=np.float64)
    predicted = jnp.argmax(p(x), axis=1)
    same(faithful.sufficiency(jnp.asarray(a2), predicted, threshold=th, normalise=False)["score"], ref)
    assert (ref[:2] > 0).any() or (predicted[0] != predicted[1])  # the near pair counts


@pytest.mark.slow
def test_parity_with_quantus_for_metrics_that_draw_or_rerun(setup):
    """ROAD (noise off: the accuracy curve, averaged over items as Quantus reports it),
    random logit (Quantus's seeded choice of the other class), and avg-sensitivity with
    Quantus's own noise draws replayed: the method re-run is the same JAX function on
    both sides, so only the metrics' arithmetic is compared."""
    pytest.importorskip("torch", reason="PyTorch not installed (CI installs it for this check)")
    quantus = pytest.importorskip("quantus", reason="Quantus not installed (CI installs it for this check)")
    from tests.torch_twin import twin
    model, params, x, a, y, _ = setup
    net = twin(model, {k: {n: np.asarray(v) for n, v in vs.items()} for k, vs in params.items()}, logits=True)
    p = probs_of(model, params)
    xn = np.asarray(x).transpose(0, 3, 1, 2).copy()
    an, yn = np.asarray(a)[:, None].copy(), np.asarray(y)

    @jax.jit
    def explain(im, t):
        return jax.grad(lambda z: jnp.sum(jnp.take_along_axis(p(z), t[:, None], 1)))(im)[..., 0]

    def quantus_explain(model, inputs, targets, **kw):
        return np.asarray(explain(jnp.asarray(np.asarray(inputs).transpose(0, 2, 3, 1)), jnp.asarray(targets)))[:, None]

    def raw(metric, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return metric(model=net, x_batch=xn.copy(), y_batch=yn, a_batch=an.copy(), device="cpu",
                          explain_func=quantus_explain, **kw)

    def theirs(metric, **kw):
        return np.asarray(raw(metric, **kw), dtype=np.float64)
    q = {"disable_warnings": True}
    pct = [10, 30, 50, 70, 90]
    road = raw(quantus.ROAD(noise=0.0, percentages=pct, **q))  # {percentage: accuracy over the items}
    ours = faithful.road(p, x, a, y, percentages=tuple(pct), noise=0.0, tol=1e-7)["accuracy"].mean(axis=0)
    np.testing.assert_allclose(ours, [road[k] for k in pct], atol=1e-9)
    # Random logit: Quantus seeds NumPy with 42 and draws an index among the other classes.
    np.random.seed(42)
    idx = np.random.randint(0, 5 - 1, B)
    y_off = np.asarray([[c for c in range(5) if c != yn[b]][idx[b]] for b in range(B)])
    # Maps unnormalised on both sides: Quantus divides each batch by its largest value,
    # the original maps and the other class's by different numbers, which SSIM sees.
    ref = theirs(quantus.RandomLogit(num_classes=5, normalise=False, **q))
    ours = randomise.random_logit(explain, x, a, y, num_classes=5, y_off=jnp.asarray(y_off), normalise=False)["score"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # Avg-sensitivity: replay Quantus's uniform draws (one [B, H*W] array per sample).
    np.random.seed(7)
    noises = np.stack([np.random.uniform(-0.2, 0.2, (B, H * W)) for _ in range(3)]).reshape(3, B, H, W, 1)
    np.random.seed(7)
    ref = theirs(quantus.AvgSensitivity(nr_samples=3, lower_bound=0.2, **q))
    ours = robust.sensitivity(explain, p, x, a, y, reduce="mean", noises=jnp.asarray(noises, jnp.float32))["score"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_model_randomisation_variants_against_a_layer_loop():
    """Cascading MPRT's curve is the rank correlation of the maps recomputed layer by
    layer (a loop); a method blind to the weights keeps correlation 1 and eMPRT's ratio
    1; smooth MPRT with no noise is MPRT."""
    from tests.kernels.nets import gap_net
    model = gap_net()
    params = with_random_biases(model, 1)
    fresh = model.init(9)
    x = jnp.asarray(np.random.default_rng(2).uniform(0, 255, (3, 16, 16, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2])

    def grad_map(p, im, t):
        f = lambda z: jnp.sum(jnp.take_along_axis(common.forward_logits(model, p, z), t[:, None], 1))  # noqa: E731
        return jnp.abs(jax.grad(f)(im)).max(-1)
    layers = ["pred", "c2", "c1"]
    a = grad_map(params, x, y)
    out = randomise.model_parameter_randomisation(grad_map, params, fresh, layers, x, a, y)
    p = dict(params)
    for k, name in enumerate(layers):
        p[name] = fresh[name]
        m = np.asarray(grad_map(p, x, y))
        from scipy.stats import spearmanr
        want = [spearmanr(np.abs(np.asarray(a[b])).ravel(), np.abs(m[b]).ravel())[0] for b in range(3)]
        np.testing.assert_allclose(out["curve"][:, k], want, rtol=1e-4, atol=1e-5)
    smooth = randomise.model_parameter_randomisation(grad_map, params, fresh, layers, x, a, y, smooth_samples=2,
                                                     smooth_noise=0.0, keys=jax.random.split(jax.random.key(0), 3))
    np.testing.assert_allclose(smooth["curve"], out["curve"], rtol=1e-5, atol=1e-6)
    blind = lambda p, im, t: im.mean(-1)  # noqa: E731
    out = randomise.model_parameter_randomisation(blind, params, fresh, layers, x, x.mean(-1), y)
    np.testing.assert_allclose(out["score"], 1.0, atol=1e-6)
    np.testing.assert_allclose(randomise.efficient_mprt(blind, params, fresh, x, y)["score"], 1.0,
                               rtol=1e-6)
    counts = np.histogram(np.asarray(a[0]).ravel(), bins=100)[0] / a[0].size
    want = -np.sum(counts[counts > 0] * np.log(counts[counts > 0]))
    assert float(randomise.histogram_entropy(a[:1] / a[:1].max())[0]) == pytest.approx(want, rel=1e-4)


def test_sufficiency_against_scipy_distances():
    from scipy.spatial.distance import cdist
    rng = np.random.default_rng(6)
    a = rng.normal(size=(6, 3, 4)).astype(np.float32)
    a[1] = a[0] + 0.01
    a[2] = a[0] - 0.02
    pred = np.asarray([0, 0, 1, 2, 2, 1])
    out = faithful.sufficiency(jnp.asarray(a), jnp.asarray(pred), threshold=0.3, abs=False, normalise=False)
    d = cdist(a.reshape(6, -1), a.reshape(6, -1), "seuclidean")
    near = (d / d.max() <= 0.3) & ~np.eye(6, dtype=bool)
    want = [(near[i] & (pred == pred[i])).sum() / near[i].sum() if near[i].any() else 0.0 for i in range(6)]
    np.testing.assert_allclose(out["score"], want, atol=1e-6)
    assert want[0] == 0.5 and want[3] == 0.0


def test_monotonicity_correlation_and_infidelity_match_naive_loops(setup):
    model, params, x, a, y, _ = setup
    p = probs_of(model, params)
    xn, an = np.asarray(x), prep(a, abs_=True)
    yn = np.asarray(y)
    fills = np.random.default_rng(7).uniform(0, 1, (4, 3, B)).astype(np.float32)  # [steps, samples, B]
    out = faithful.monotonicity_correlation(p, x, a, y, features_in_step=64, fills=jnp.asarray(fills))
    up = np.argsort(an.reshape(B, -1), axis=1, kind="stable")
    f0 = np.asarray(p(x))[np.arange(B), yn]
    from scipy.stats import spearmanr
    for b in range(B):
        var, sums = [], []
        for s in range(4):
            ix = up[b, s * 64:(s + 1) * 64]
            preds = []
            for r in range(3):
                img = xn[b].reshape(-1, 1).copy()
                img[ix] = fills[s, r, b]
                preds.append(float(np.asarray(p(jnp.asarray(img.reshape(1, H, W, 1))))[0, yn[b]]))
            var.append(np.mean((np.asarray(preds) - f0[b]) ** 2) / f0[b] ** 2)
            sums.append(an[b].ravel()[ix].sum())
        np.testing.assert_allclose(out["curve"][b], var, rtol=1e-4, atol=1e-7)
        assert float(out["score"][b]) == pytest.approx(spearmanr(sums, var)[0], abs=1e-5)
    # Infidelity: 4x4 patches removed cumulatively (image minimum), squared error between
    # the output's drop and the map's sum over the removed difference.
    out = faithful.infidelity(p, x, a, y, patch_sizes=(4,), n_perturb_samples=1)
    for b in range(B):
        img, errs = xn[b].copy(), []
        for q in range(16):
            r, c = divmod(q, 4)
            img[4 * r:4 * r + 4, 4 * c:4 * c + 4] = xn[b].min()
            drop = f0[b] - float(np.asarray(p(jnp.asarray(img[None])))[0, yn[b]])
            errs.append((drop - np.sum(np.asarray(a[b]) * (xn[b] - img)[..., 0])) ** 2)
        assert float(out["score"][b]) == pytest.approx(np.mean(errs), rel=1e-4)


def test_relative_stability_and_input_invariance_by_hand():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.uniform(0.1, 1, (2, 4, 4, 1)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    y = jnp.asarray([0, 2])

    def score(im):
        return im.reshape(im.shape[0], -1) @ w

    def explain(im, t):  # gradient x input of a linear model
        return (w[:, t].T.reshape(-1, 4, 4) * im[..., 0])
    a = explain(x, y)
    noises = jnp.asarray(rng.uniform(-0.1, 0.1, (3, 2, 4, 4, 1)), jnp.float32)
    ris = robust.relative_stability(explain, score, x, a, y, noises=noises, return_nan_when_prediction_changes=False)
    ros = robust.relative_stability(explain, score, x, a, y, of="output", noises=noises,
                                    return_nan_when_prediction_changes=False)
    an, xn = np.asarray(a), np.asarray(x)
    want_i, want_o = [], []
    for r in range(3):
        xs = xn + np.asarray(noises[r])
        e = np.asarray(explain(jnp.asarray(xs), y))
        num = np.sqrt((((an - e) / an) ** 2).sum(axis=(1, 2)))
        want_i.append(num / np.sqrt((((xn - xs) / xn) ** 2).sum(axis=(1, 2, 3))))
        want_o.append(num / np.linalg.norm(np.asarray(score(x)) - np.asarray(score(jnp.asarray(xs))), axis=1))
    np.testing.assert_allclose(ris["score"], np.max(want_i, axis=0), rtol=1e-4)
    np.testing.assert_allclose(ros["score"], np.max(want_o, axis=0), rtol=1e-4)
    # Input invariance: the model with the shift compensated has the same gradients, so
    # plain gradients are invariant and gradient x input is not.
    shift = -0.5

    def grad_of(f):
        return lambda im, t: jax.grad(lambda z: jnp.sum(jnp.take_along_axis(f(z), t[:, None], 1)))(im)[..., 0]

    def shifted(im):
        return score(im - shift)
    assert np.asarray(axioms.input_invariance(lambda s, im, t: grad_of(shifted)(im, t), grad_of(score), x, y,
                                              shift=shift)["score"]).tolist() == [1.0, 1.0]

    def gxi(f):
        return lambda im, t: grad_of(f)(im, t) * im[..., 0]
    assert np.asarray(axioms.input_invariance(lambda s, im, t: gxi(shifted)(im, t), gxi(score), x, y,
                                              shift=shift)["score"]).tolist() == [0.0, 0.0]


@pytest.mark.slow
def test_parity_with_quantus_robustness_and_axioms(setup):
    """Max-sensitivity, local Lipschitz estimate, relative input / output stability with
    Quantus's own draws replayed (maps unnormalised on both sides: Quantus normalises by
    the batch's largest value), non-sensitivity and infidelity (deterministic)."""
    pytest.importorskip("torch", reason="PyTorch not installed (CI installs it for this check)")
    quantus = pytest.importorskip("quantus", reason="Quantus not installed (CI installs it for this check)")
    from tests.torch_twin import twin
    model, params, x, a, y, _ = setup
    net = twin(model, {k: {n: np.asarray(v) for n, v in vs.items()} for k, vs in params.items()}, logits=True)
    p, lg = probs_of(model, params), logits_of(model, params)
    xn = np.asarray(x).transpose(0, 3, 1, 2).copy()
    an, yn = np.asarray(a)[:, None].copy(), np.asarray(y)

    @jax.jit
    def explain(im, t):
        return jax.grad(lambda z: jnp.sum(jnp.take_along_axis(p(z), t[:, None], 1)))(im)[..., 0]

    def quantus_explain(model, inputs, targets, **kw):
        return np.asarray(explain(jnp.asarray(np.asarray(inputs).transpose(0, 2, 3, 1)), jnp.asarray(targets)))[:, None]

    def theirs(metric, seed=None):
        if seed is not None:
            np.random.seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(metric(model=net, x_batch=xn.copy(), y_batch=yn, a_batch=an.copy(), device="cpu",
                                     explain_func=quantus_explain), dtype=np.float64)

    def replay(seed, draw):
        np.random.seed(seed)
        return jnp.asarray(np.stack([draw() for _ in range(3)]).reshape(3, B, H, W, 1), jnp.float32)
    q = {"disable_warnings": True, "nr_samples": 3}
    ref = theirs(quantus.MaxSensitivity(lower_bound=0.2, **q), 11)
    ours = robust.sensitivity(explain, p, x, a, y, reduce="max",
                              noises=replay(11, lambda: np.random.uniform(-0.2, 0.2, (B, H * W))))["score"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # Continuity: deterministic translations (a shift of 0 scores 0 on both sides).
    ref = theirs(quantus.Continuity(nr_steps=8, normalise=False, disable_warnings=True))
    ours = robust.continuity(explain, p, x, a, y, nr_steps=8, normalise=False)["score"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    ref = theirs(quantus.LocalLipschitzEstimate(normalise=False, **q), 12)
    ours = robust.local_lipschitz_estimate(explain, p, x, a, y, normalise=False,
                                           noises=replay(12, lambda: np.random.normal(0.0, 0.1, (B, H * W))))["score"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    for of, cls, score in (("input", quantus.RelativeInputStability, p), ("output", quantus.RelativeOutputStability, lg)):
        ref = theirs(cls(return_nan_when_prediction_changes=False, **q), 13)
        ours = robust.relative_stability(explain, score, x, a, y, of=of, return_nan_when_prediction_changes=False,
                                         noises=replay(13, lambda: np.random.uniform(0.02, 0.2, (B, H * W))))["score"]
        np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-5)
    qd = {"disable_warnings": True}
    ref = theirs(quantus.NonSensitivity(features_in_step=1, normalise=False, **qd))
    ours = axioms.non_sensitivity(p, x, a, y, features_in_step=1, normalise=False)["score"]
    # A pixel whose output change lies within float32 noise of eps (1e-5) may fall either
    # side in two frameworks: allow as many disagreements as there are such pixels.
    xf = np.asarray(x).reshape(B, -1)
    imgs = np.repeat(xf[:, None], H * W, axis=1)
    imgs[:, np.arange(H * W), np.arange(H * W)] = xf.min(axis=1, keepdims=True)
    f0 = np.asarray(p(x))[np.arange(B), yn]
    fs = np.stack([np.asarray(p(jnp.asarray(imgs[b].reshape(-1, H, W, 1))))[:, yn[b]] for b in range(B)])
    edge = (np.abs(np.abs(fs - f0[:, None]) - 1e-5) < 2e-7).sum(axis=1)
    assert (np.abs(np.asarray(ours) - ref) <= edge).all(), (ours, ref, edge)
    # Faithfulness correlation: Quantus draws each run's subsets item by item, then its
    # baseline function draws a "uniform" fill per item whatever baseline is asked.
    np.random.seed(14)
    runs = []
    for _ in range(10):
        runs.append(np.stack([np.random.choice(H * W, 20, replace=False) for _ in range(B)]))
        np.random.uniform(0.0, 1.0, size=B)
    subsets = np.stack(runs, axis=1)
    np.random.seed(14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(quantus.FaithfulnessCorrelation(nr_runs=10, subset_size=20, return_aggregate=False, **qd)(
            model=net, x_batch=xn.copy(), y_batch=yn, a_batch=an.copy(), device="cpu"), dtype=np.float64)
    ours = faithful.faithfulness_correlation(lg, x, a, y, subsets=jnp.asarray(subsets))["score"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # Monotonicity correlation: its "uniform" fills are one draw per item and sample.
    np.random.seed(15)
    fills = np.random.uniform(0.0, 1.0, size=(4 * 3, B)).reshape(4, 3, B)
    np.random.seed(15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(quantus.MonotonicityCorrelation(nr_samples=3, features_in_step=64, **qd)(
            model=net, x_batch=xn.copy(), y_batch=yn, a_batch=an.copy(), device="cpu"), dtype=np.float64)
    ours = faithful.monotonicity_correlation(p, x, a, y, features_in_step=64, fills=jnp.asarray(fills))["score"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    ref = theirs(quantus.Infidelity(perturb_patch_sizes=[4], n_perturb_samples=1, **qd))
    ours = faithful.infidelity(lg, x, a, y, patch_sizes=(4,), n_perturb_samples=1)["score"]
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_parity_with_quantus_model_randomisation(setup):
    """MPRT (cascading and independent), smooth MPRT and efficient MPRT against Quantus on
    a native PyTorch net with the same weights. Quantus randomises the torch layers
    (``reset_parameters`` after seeding, per layer) and explains them with Captum's
    gradient; convlens gets the same random weights as ``fresh`` and explains with JAX's
    gradient; smooth MPRT's NumPy draws are replayed."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed (CI installs it for this check)")
    pytest.importorskip("captum", reason="Captum not installed (CI installs it for this check)")
    quantus = pytest.importorskip("quantus", reason="Quantus not installed (CI installs it for this check)")
    import copy

    import torch.nn.functional as F
    model, params, x, _, y, _ = setup

    class Native(torch.nn.Module):  # grey_net, module by module (Quantus resets modules)
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Conv2d(6, 8, 3, padding=1)
            self.pred = torch.nn.Linear(8, 5)

        def forward(self, im):
            h = F.max_pool2d(F.relu(self.c1(im)), 2)
            return self.pred(F.relu(self.c2(h)).mean(dim=(2, 3)))

    def load(net, ps):
        with torch.no_grad():
            for n in ("c1", "c2"):
                getattr(net, n).weight.copy_(torch.from_numpy(np.asarray(ps[n]["kernel"]).transpose(3, 2, 0, 1).copy()))
                getattr(net, n).bias.copy_(torch.from_numpy(np.array(ps[n]["bias"])))
            net.pred.weight.copy_(torch.from_numpy(np.asarray(ps["pred"]["kernel"]).T.copy()))
            net.pred.bias.copy_(torch.from_numpy(np.array(ps["pred"]["bias"])))
        return net

    def weights(net, n):
        m = getattr(net, n)
        k = m.weight.detach().numpy()
        k = k.transpose(2, 3, 1, 0) if k.ndim == 4 else k.T
        return {"kernel": jnp.asarray(k), "bias": jnp.asarray(m.bias.detach().numpy())}

    net = load(Native(), params).eval()
    xn, yn = np.asarray(x).transpose(0, 3, 1, 2).copy(), np.asarray(y)
    np.testing.assert_allclose(net(torch.from_numpy(xn)).detach().numpy(), logits_of(model, params)(x),
                               rtol=1e-4, atol=1e-5)
    fresh = {}  # what Quantus's layer generator puts in each layer (seed 42 + 1 before each reset)
    for n in ("c1", "c2", "pred"):
        scratch = copy.deepcopy(net)
        torch.manual_seed(43)
        getattr(scratch, n).reset_parameters()
        fresh[n] = weights(scratch, n)

    @jax.jit
    def explain_with(ps, im, t):
        f = lambda z: jnp.sum(jnp.take_along_axis(common.forward_logits(model, ps, z), t[:, None], 1))  # noqa: E731
        return jax.grad(f)(im)[..., 0]

    def theirs(metric, seed=None):
        if seed is not None:
            np.random.seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return metric(model=net, x_batch=xn.copy(), y_batch=yn, a_batch=None, device="cpu",
                          explain_func=quantus.explain, explain_func_kwargs={"method": "Gradient"})
    a = explain_with(params, x, y)
    q = {"disable_warnings": True}
    for order, layers, independent in (("top_down", ["pred", "c2", "c1"], False),
                                       ("independent", ["c1", "c2", "pred"], True)):
        ref = theirs(quantus.MPRT(layer_order=order, **q))  # {"original": .., layer: [B]}
        ours = randomise.model_parameter_randomisation(explain_with, params, fresh, layers, x, a, y,
                                                       independent=independent)
        np.testing.assert_allclose(ours["curve"], np.stack([ref[n] for n in layers], axis=1), rtol=1e-4, atol=1e-5)
    # Quantus's average correlation skips a key "orig" that does not exist, so it averages
    # in the original-versus-original correlation (1 for a deterministic method); ours is
    # the mean over the randomised layers.
    avg = np.asarray(theirs(quantus.MPRT(layer_order="independent", return_average_correlation=True, **q)))
    np.testing.assert_allclose(avg, np.mean(np.stack([ref[k] for k in ref]), axis=0), rtol=1e-6)
    np.testing.assert_allclose(ours["score"], np.mean(np.stack([ref[n] for n in layers]), axis=0), rtol=1e-4,
                               atol=1e-5)
    # Smooth MPRT: each map is the mean over nr_samples inputs, the last noise-free; Quantus
    # draws one [B, 1, H, W] normal per noisy sample and map (std 0.1 of each image's value
    # range): the reference map, the "original" map (not compared here), then each layer's.
    s = 3
    spread = (xn.max(axis=(1, 2, 3)) - xn.min(axis=(1, 2, 3)))[:, None, None, None]
    np.random.seed(21)
    draws = np.stack([np.concatenate([np.random.randn(s - 1, B, 1, H, W) * 0.1 * spread, np.zeros((1, B, 1, H, W))])
                      for _ in range(5)]).transpose(0, 1, 2, 4, 5, 3)  # [maps, S, B, H, W, 1]
    noises = jnp.asarray(draws[[0, 2, 3, 4]], jnp.float32)
    ref = theirs(quantus.SmoothMPRT(layer_order="top_down", nr_samples=s, noise_magnitude=0.1, **q), 21)
    ours = randomise.model_parameter_randomisation(explain_with, params, fresh, ["pred", "c2", "c1"], x, a, y,
                                                   noises=noises)
    np.testing.assert_allclose(ours["curve"], np.stack([ref[n] for n in ("pred", "c2", "c1")], axis=1),
                               rtol=1e-4, atol=1e-5)
    # Efficient MPRT: the entropy of a 100-bin histogram, every layer randomised; Quantus
    # reports the relative rise (ratio - 1).
    ref = np.asarray(theirs(quantus.EfficientMPRT(**q)), dtype=np.float64)
    ours = randomise.efficient_mprt(explain_with, params, fresh, x, y, abs=False, normalise=False)["score"]
    np.testing.assert_allclose(np.asarray(ours) - 1, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_parity_with_quantus_input_invariance(setup):
    """Input invariance against Quantus on a net whose first convolution has no padding
    (Quantus compensates the shift with one value of that layer's response to a constant
    image, exact only without padding). Quantus leaves the first pixel unshifted (its
    ``perturb_batch`` drops each item's first index, meant for a batch axis these indices
    do not have), so its verdicts are those of our kernel given that input; with every
    pixel shifted, as the definition says, plain gradients are invariant on every item
    and gradient x input on none."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed (CI installs it for this check)")
    pytest.importorskip("captum", reason="Captum not installed (CI installs it for this check)")
    quantus = pytest.importorskip("quantus", reason="Quantus not installed (CI installs it for this check)")
    import torch.nn.functional as F
    *_, x, _, y, _ = setup
    model = functional("valid", [
        layer("Conv2D", "c1", "img", filters=4, kernel_size=[3, 3], padding="valid", activation="relu"),
        layer("GlobalAveragePooling2D", "gap", "c1"),
        layer("Dense", "pred", "gap", units=5, activation="softmax")], (H, W, 1)).replace(preprocess=Preprocess("none"))
    params = with_random_biases(model, 4)

    class Native(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.pred = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 5)

        def forward(self, im):
            return self.pred(F.relu(self.c1(im)).mean(dim=(2, 3)))
    net = Native().eval()
    with torch.no_grad():
        net.c1.weight.copy_(torch.from_numpy(np.array(params["c1"]["kernel"]).transpose(3, 2, 0, 1).copy()))
        net.c1.bias.copy_(torch.from_numpy(np.array(params["c1"]["bias"])))
        net.pred.weight.copy_(torch.from_numpy(np.array(params["pred"]["kernel"]).T.copy()))
        net.pred.bias.copy_(torch.from_numpy(np.array(params["pred"]["bias"])))
    shift = -1.0
    moved = {**params, "c1": {**params["c1"], "bias": params["c1"]["bias"] - shift * params["c1"]["kernel"].sum((0, 1, 2))}}

    def grad(ps, times_input):
        def f(im, t):
            g = jax.grad(lambda z: jnp.sum(jnp.take_along_axis(common.forward_logits(model, ps, z), t[:, None], 1)))(im)
            return (g * im if times_input else g)[..., 0]
        return f
    xn, yn = np.asarray(x).transpose(0, 3, 1, 2).copy(), np.asarray(y)
    def quantus_input(f):  # the first pixel back where it was
        return lambda im, t: f(im.at[:, 0, 0, 0].add(-shift), t)
    for method, times_input, want in (("Gradient", False, 1.0), ("InputXGradient", True, 0.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = quantus.InputInvariance(input_shift=shift, disable_warnings=True)(
                model=net, x_batch=xn.copy(), y_batch=yn, a_batch=None, device="cpu", explain_func=quantus.explain,
                explain_func_kwargs={"method": method})
        as_quantus = axioms.input_invariance(lambda s, im, t: quantus_input(grad(moved, times_input))(im, t),
                                             grad(params, times_input), x, y, shift=shift, atol=1e-4)["score"]
        assert np.asarray(as_quantus).tolist() == [float(r) for r in ref], (method, as_quantus, ref)
        ours = axioms.input_invariance(lambda s, im, t: grad(moved, times_input)(im, t), grad(params, times_input),
                                       x, y, shift=shift, atol=1e-4)["score"]
        assert np.asarray(ours).tolist() == [want] * B, (method, ours)
        if method == "Gradient":
            assert not all(ref), ref  # on this net, Quantus's unshifted pixel shows
