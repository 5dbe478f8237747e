"""LIME, RISE, Score-CAM, Ablation-CAM and Eigen-CAM against independent truths: exact
recovery of a linear model, a model that looks at one region, naive one-mask /
one-channel loops, numpy's SVD, and memory that follows the chunk, not the copies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convlens
from convlens.api import resolve
from convlens.engine.executor import Explain, function, item_keys
from convlens.errors import ConvlensError
from convlens.kernels import sampling
from tests.conftest import photo_batch
from tests.kernels.nets import functional, gap_net, layer, with_random_biases


def rand_images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype("float32")


_FWD = {}


def logits_one(model, params, x):
    """Logits of one image at a time (the naive references' forward pass)."""
    if model not in _FWD:
        _FWD[model] = jax.jit(lambda p, a: model.apply(p, model.preprocess(a), logits=True)[0])
    return np.asarray(_FWD[model](params, jnp.asarray(x[None], jnp.float32)))[0]


def set_params(model, seed, **fixed):
    params = with_random_biases(model, seed)
    for name, vars_ in fixed.items():
        params[name] = {k: jnp.asarray(v, jnp.float32) for k, v in vars_.items()}
    return params


# ---------------------------------------------------------------- LIME

def test_lime_recovers_a_linear_model_of_superpixel_means_exactly():
    """Output = W . (mean colour of each grid cell) + b: with baseline 0 an "off" cell's
    mean is 0, so the score is exactly linear in the on/off vector and LIME (every
    superpixel a feature, no ridge) must return W . means as its weights, b as intercept."""
    model = functional("cellmeans", [
        layer("AveragePooling2D", "pool", "img", pool_size=[4, 4], strides=[4, 4], padding="valid"),
        layer("Flatten", "flat", "pool"),
        layer("Dense", "out", "flat", units=3, activation="linear"),
    ], (16, 16, 3))
    params = with_random_biases(model, 1)
    x = rand_images(2, (16, 16), seed=2)
    e = convlens.explain(model, params, x, "lime", target=[0, 1, 2], samples=300, features=16,
                         segmentation="grid", baseline=0, ridge=0.0, key=7)
    means = x.reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(2, 16, 3) / 255.0  # rescale preprocessing
    w = np.asarray(params["out"]["kernel"]).reshape(16, 3, 3)  # Flatten order: cell, then channel
    want = np.einsum("bkc,kct->btk", means, w)
    np.testing.assert_allclose(e["weights"], want, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(e["intercept"], np.broadcast_to(np.asarray(params["out"]["bias"]), (2, 3)),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(e["r2"], 1.0, atol=1e-5)
    seg = e["segments"][0]
    assert seg.max() == 15 and (seg[:4, :4] == 0).all() and (seg[-4:, -4:] == 15).all()
    np.testing.assert_allclose(e["heatmap"][:, :, 5, 9], want[:, :, seg[5, 9]], rtol=1e-6)
    # Hiding a cell behind its own mean colour changes nothing this model sees: all weights 0.
    flat = convlens.explain(model, params, x, "lime", target=[0], samples=300, features=16,
                            segmentation="grid", baseline="segment_mean", ridge=0.0, key=7)
    np.testing.assert_allclose(flat["weights"], 0.0, atol=1e-4 * np.abs(want).max())


def test_lime_with_slic_on_a_photo_recovers_a_model_linear_in_pixels():
    """A Dense layer on the pixels is linear in every superpixel's on/off bit whatever
    the superpixels: weight k = sum over superpixel k of W . (pixel - baseline)."""
    model = functional("linpix", [layer("Flatten", "flat", "img"),
                                  layer("Dense", "out", "flat", units=2, activation="linear")], (40, 40, 3))
    params = with_random_biases(model, 3)
    x = photo_batch((40, 40), ("chelsea", "coffee")).astype(np.float32)
    e = convlens.explain(model, params, x, "lime", target=[0, 1], samples=200, features=24, baseline=60.0,
                         ridge=0.0, key=1)
    seg = e["segments"]
    n = seg.max(axis=(1, 2)) + 1
    assert (n >= 8).all() and (n <= 24).all(), n  # real SLIC superpixels, at most `features`
    w = np.asarray(params["out"]["kernel"]).reshape(40, 40, 3, 2)
    contrib = np.einsum("bhwc,hwct->bhwt", (x - 60.0) / 255.0, w)
    want = np.stack([np.stack([np.bincount(seg[b].ravel(), contrib[b, ..., t].ravel(), minlength=24)
                               for t in range(2)]) for b in range(2)])
    np.testing.assert_allclose(e["weights"], want, rtol=2e-3, atol=2e-4 * np.abs(want).max())
    assert (e["weights"][0, :, n[0]:] == 0).all()  # slots with no superpixel stay 0


@pytest.mark.slow
def test_lime_samples_follow_the_key_and_its_kernel_matches_lime():
    keys = item_keys(3, np.arange(2))
    used = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [6]]))
    z = np.asarray(sampling.lime_samples(keys, 50, 10, used))
    assert (z[:, 0] == used).all() and (z[1, :, 6:] == 0).all()
    assert 0.4 < z[:, 1:, :6].mean() < 0.6
    again = np.asarray(sampling.lime_samples(item_keys(3, np.arange(2)), 80, 10, used))[:, :50]
    np.testing.assert_array_equal(z, again)  # sample i does not depend on how many are drawn
    # lime_image: cosine distance to the all-on row, kernel sqrt(exp(-d^2 / 0.25^2)).
    k = np.asarray(sampling.lime_kernel(jnp.asarray(z), used, 0.25))
    zz = z[0, 5]
    d = 1 - zz.sum() / (np.sqrt(zz.sum()) * np.sqrt(10))
    np.testing.assert_allclose(k[0, 5], np.sqrt(np.exp(-d ** 2 / 0.0625)), rtol=1e-5)


def test_grid_segments_cover_the_image_with_at_most_features_cells():
    for size, f in [((224, 224), 49), ((30, 50), 12), ((8, 8), 100)]:
        s = sampling.grid_segments(size, f)
        n = s.max() + 1
        assert n <= f and set(np.unique(s)) == set(range(n))


# ---------------------------------------------------------------- RISE

def region_model():
    """Looks only at rows 4..11, columns 20..27 of a 32x32 image: class 0's logit is their mean brightness."""
    model = functional("region", [
        layer("Cropping2D", "crop", "img", cropping=[[4, 20], [20, 4]]),
        layer("GlobalAveragePooling2D", "gap", "crop"),
        layer("Dense", "out", "gap", units=2, activation="softmax"),
    ], (32, 32, 3))
    k = np.zeros((3, 2), np.float32)
    k[:, 0] = 4.0
    return model, set_params(model, 0, out={"kernel": k, "bias": np.array([-2.0, 0.0])})


def test_rise_peaks_where_the_model_looks():
    model, params = region_model()
    x = np.full((1, 32, 32, 3), 200.0, np.float32)
    e = convlens.explain(model, params, x, "rise", target=[0], samples=600, key=0)
    heat = e["heatmap"][0, 0]
    inside = np.zeros((32, 32), bool)
    inside[4:12, 20:28] = True
    y, xx = np.unravel_index(heat.argmax(), heat.shape)
    assert inside[y, xx], (y, xx)
    assert heat[inside].mean() > heat[~inside].mean() + 3 * heat[~inside].std()


def test_rise_equals_a_naive_one_mask_at_a_time_loop():
    model = gap_net()
    params = with_random_biases(model, 4)
    x = rand_images(2, (16, 16), seed=3)
    n = 20
    e = convlens.explain(model, params, x, "rise", target=[1, 4], samples=n, grid=3, keep=0.4, baseline=30,
                         key=5, chunk=6)
    keys = item_keys(5, np.arange(2))
    want = np.zeros((2, 2, 16, 16))
    for b in range(2):
        for i in range(n):
            m = np.asarray(sampling.rise_mask(jax.random.fold_in(keys[b], i), (16, 16), 3, 0.4))
            p = np.asarray(jax.nn.softmax(logits_one(model, params, 30 + m[..., None] * (x[b] - 30))))
            want[b] += p[[1, 4], None, None] * m
    np.testing.assert_allclose(e["heatmap"], want / (n * 0.4), rtol=1e-4, atol=1e-6)
    m = np.asarray(sampling.rise_mask(jax.random.key(0), (16, 16), 3, 0.4))
    assert m.min() >= 0 and m.max() <= 1 and 0 < m.mean() < 1


# ---------------------------------------------------------------- Score-CAM, Ablation-CAM, Eigen-CAM

@pytest.fixture(scope="module")
def gap():
    model = gap_net()
    return model, with_random_biases(model, 8)


def _acts(model, params, x, layer_name):
    return np.asarray(model.features(params, model.preprocess(jnp.asarray(x)), layer_name))


def _relu_cam(acts, w):  # acts [h, w, c], w [T, c] -> [T, h, w]
    return np.maximum(np.einsum("hwc,tc->thw", acts, w), 0)


@pytest.mark.parametrize("channels", [0, 5])
def test_scorecam_equals_a_naive_one_channel_at_a_time_loop(gap, channels):
    model, params = gap
    x = rand_images(2, (16, 16), seed=4)
    e = convlens.explain(model, params, x, "scorecam", target=[0, 3], channels=channels, chunk=5)
    acts = _acts(model, params, x, "c2")
    for b in range(2):
        a = acts[b]
        chans = range(12) if channels == 0 else np.argsort(-a.var(axis=(0, 1)), kind="stable")[:channels]
        scores = {}
        for k in chans:
            m = np.asarray(jax.image.resize(jnp.asarray(a[..., k]), (16, 16), "bilinear"))
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            scores[k] = logits_one(model, params, x[b] * m[..., None])[[0, 3]]
        s = np.stack([scores[k] for k in chans])  # [n, T]
        soft = np.exp(s - s.max(0)) / np.exp(s - s.max(0)).sum(0)
        w = np.zeros((2, 12))
        w[:, list(chans)] = soft.T
        np.testing.assert_allclose(e["cam"][b], _relu_cam(a, w), rtol=2e-4, atol=1e-6)


def test_scorecam_prob_weights_are_the_masked_images_probabilities(gap):
    model, params = gap
    x = rand_images(1, (16, 16), seed=5)
    e = convlens.explain(model, params, x, "scorecam", target=[2], score="prob", baseline="mean")
    a = _acts(model, params, x, "c2")[0]
    mean = x[0].mean(axis=(0, 1))
    w = np.zeros((1, 12))
    for k in range(12):
        m = np.asarray(jax.image.resize(jnp.asarray(a[..., k]), (16, 16), "bilinear"))
        m = ((m - m.min()) / (m.max() - m.min() + 1e-8))[..., None]
        w[0, k] = np.asarray(jax.nn.softmax(logits_one(model, params, mean + m * (x[0] - mean))))[2]
    np.testing.assert_allclose(e["cam"][0], _relu_cam(a, w), rtol=2e-4, atol=1e-6)


def residual_net():
    """A skip connection bypasses r1: the rest of the network cannot run from r1 alone."""
    return functional("resnet_mini", [
        layer("Conv2D", "stem", "img", filters=6, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("Conv2D", "r1", "stem", filters=6, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("Conv2D", "r2", "r1", filters=6, kernel_size=[3, 3], padding="same", activation="linear"),
        layer("Add", "sum", None) | {"inbound_nodes": [[["stem", 0, 0, {}], ["r2", 0, 0, {}]]]},
        layer("Activation", "act", "sum", activation="relu"),
        layer("GlobalAveragePooling2D", "gap", "act"),
        layer("Dense", "out", "gap", units=4, activation="softmax"),
    ], (12, 12, 3))


@pytest.mark.parametrize("which", ["gap_c2", "gap_c1", "residual_r1"])
def test_ablationcam_equals_a_naive_one_channel_at_a_time_loop(gap, which):
    """Each channel zeroed in the full network, one at a time, through ``perturb``: the
    head-only route (c2, c1) and the full-network route (r1, bypassed by a skip) agree."""
    from convlens.kernels.cam_gradfree import head_only
    if which == "residual_r1":
        model = residual_net()
        params, lay, size = with_random_biases(model, 2), "r1", (12, 12)
    else:
        (model, params), lay, size = gap, which.split("_")[1], (16, 16)
    assert head_only(model, lay) == (which != "residual_r1")
    x = rand_images(2, size, seed=6)
    e = convlens.explain(model, params, x, "ablationcam", layer=lay, target=[0, 2], chunk=3)
    acts = _acts(model, params, x, lay)
    xp = model.preprocess(jnp.asarray(x))
    full = jax.jit(lambda d: model.apply(params, xp, perturb={lay: d}, logits=True)[0])
    y = np.asarray(full(jnp.zeros_like(jnp.asarray(acts))))[:, [0, 2]]
    c = acts.shape[-1]
    yk = np.zeros((2, c, 2))
    for k in range(c):
        d = np.zeros_like(acts)
        d[..., k] = -acts[..., k]
        yk[:, k] = np.asarray(full(jnp.asarray(d)))[:, [0, 2]]
    for b in range(2):
        w = ((y[b][None, :] - yk[b]) / y[b][None, :]).T  # [T, c]
        np.testing.assert_allclose(e["cam"][b], _relu_cam(acts[b], w), rtol=5e-4, atol=1e-5)


def test_eigencam_is_the_first_principal_component_of_the_activations():
    model = convlens.load_model("vgg_tiny", random_init=0)
    m, params = model
    x = photo_batch((32, 32)).astype(np.float32)
    e = convlens.explain(m, params, x, "eigencam", layer="block3_conv3", target="top2")
    acts = _acts(m, params, x, "block3_conv3")
    for b in range(len(x)):
        a = acts[b].reshape(-1, acts.shape[-1])
        a = a - a.mean(axis=0)
        vt = np.linalg.svd(a.astype(np.float64), full_matrices=True)[2]
        v = vt[0] if vt[0].sum() >= 0 else -vt[0]
        want = np.maximum(a @ v, 0).reshape(acts.shape[1:3])
        for t in range(2):  # class-agnostic: the same map for every target
            np.testing.assert_allclose(e["cam"][b, t], want, rtol=1e-3, atol=1e-4 * want.max())


@pytest.mark.slow
def test_peak_memory_follows_the_chunk_not_the_copies():
    """The compiled kernel's scratch memory grows with the chunk, stays flat as samples
    grow, and is far below one forward pass of all copies at once (B x copies images)."""
    from convlens.kernels.common import image_bytes

    def net(c):
        return functional(f"wide{c}", [
            layer("Conv2D", "c1", "img", filters=c, kernel_size=[3, 3], padding="same", activation="relu"),
            layer("GlobalAveragePooling2D", "gap", "c1"),
            layer("Dense", "out", "gap", units=3, activation="softmax")], (32, 32, 3))

    def temp(model, method, **opts):
        params = with_random_biases(model, 0)
        cfg = resolve(model, method, opts)
        x = jnp.zeros((2, 32, 32, 3), jnp.float32)
        fn = function(Explain(model, method, cfg, 1))
        return fn.lowered(params, {"images": x}, item_keys(0, np.arange(2))).compile().memory_analysis() \
            .temp_size_in_bytes

    wide = net(256)
    all_at_once = 2 * 256 * image_bytes(wide, (32, 32))  # every channel's copy of both images
    for method in ("scorecam", "ablationcam"):
        small, big = temp(wide, method, chunk=4), temp(wide, method, chunk=64)
        assert small < big and small < all_at_once / 50, (method, small, big, all_at_once)
    m = net(8)
    for method, opts in (("rise", {}), ("lime", {"segmentation": "grid", "features": 16})):
        small, big = temp(m, method, samples=100, chunk=4, **opts), temp(m, method, samples=2000, chunk=4, **opts)
        assert big < 2 * 2000 * image_bytes(m, (32, 32)) / 50, (method, big)
        if method == "rise":
            assert big == small  # masks are summed as they come: nothing grows with the samples


def test_bad_options_are_one_line_errors(gap):
    model, params = gap
    x = rand_images(1, (16, 16))
    for method, opts, match in [("lime", {"segmentation": "quickshift"}, "segmentation='quickshift'.*slic, grid"),
                                ("lime", {"ridge": 0.0, "samples": 10, "features": 49}, "more samples"),
                                ("lime", {"kernel_width": float("nan")}, "kernel_width=nan is not a finite"),
                                ("rise", {"keep": 0.0}, "keep=0.0 is out of range"),
                                ("rise", {"baseline": "zebra"}, "baseline"),
                                ("rise", {"baseline": float("inf")}, "baseline"),
                                ("scorecam", {"score": "bogus"}, "channel_softmax, prob"),
                                ("scorecam", {"layer": "gap"}, "spatial layer"),
                                ("smoothgrad", {"noise": float("nan")}, "noise=nan is not a finite"),
                                ("integrated_gradients", {"baseline": float("nan")}, "baseline"),
                                ("ablationcam", {"chunk": -1}, "chunk=-1 is out of range")]:
        with pytest.raises(ConvlensError, match=match):
            convlens.explain(model, params, x, method, **opts)
