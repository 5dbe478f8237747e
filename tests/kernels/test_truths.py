"""Each kernel against an independent truth: analytic identities, hand-written
references, Keras, and batch/target invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convlens
from convlens.errors import ConvlensError
from tests.kernels.nets import gap_net, mlp, with_random_biases


def rand_images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype("float32")


@pytest.fixture(scope="module")
def gap():
    model = gap_net()
    return model, with_random_biases(model, 3)


@pytest.fixture(scope="module")
def tiny():
    return convlens.load_model("vgg_tiny", random_init=0)


def test_gradcam_equals_relu_cam_on_gap_model(gap):
    """On GAP + Dense, d logit_k / d A_ij = W[:, k] / (h w): Grad-CAM = ReLU(CAM) / (h w)."""
    model, params = gap
    x = rand_images(4, (16, 16))
    every = list(range(6))  # all classes: both signs of CAM occur, so ReLU matters
    g = convlens.explain(model, params, x, "gradcam", target=every)
    c = convlens.explain(model, params, x, "cam", target=every)
    assert g.layer == c.layer == "c2"
    np.testing.assert_array_equal(g.targets, c.targets)
    h, w = g["cam"].shape[-2:]
    np.testing.assert_allclose(g["cam"], np.maximum(c["cam"], 0) / (h * w), rtol=1e-4, atol=1e-7)
    assert (c["cam"] < 0).any() and (c["cam"] > 0).any()  # the identity is not vacuous


def test_cam_refuses_models_without_gap(tiny):
    model, params = tiny
    with pytest.raises(ConvlensError, match="CAM needs GlobalAveragePooling2D.*use gradcam"):
        convlens.explain(model, params, rand_images(1, (32, 32)), "cam")


def test_family_on_gap_model(gap):
    """Every family member is finite and non-negative; HiRes-CAM = Grad-CAM on GAP models."""
    model, params = gap
    x = rand_images(2, (16, 16))
    maps = {m: convlens.explain(model, params, x, m)["cam"] for m in ("gradcam", "gradcampp", "hirescam",
                                                                      "layercam", "xgradcam")}
    for m in maps.values():
        assert (m >= 0).all() and np.isfinite(m).all()
    # Gradients are constant over space on a GAP model, so HiRes-CAM's element-wise weights
    # equal Grad-CAM's spatial means.
    np.testing.assert_allclose(maps["hirescam"], maps["gradcam"], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_cam_family_against_numpy_formulas(tiny):
    """Family weights recomputed in numpy from the same activations and gradients."""
    model, params = tiny
    x = rand_images(2, (32, 32), seed=1)
    layer = "block4_conv2"
    xp = model.preprocess(jnp.asarray(x))
    acts = np.asarray(model.features(params, xp, layer))
    e = convlens.explain(model, params, x, "gradcam", layer=layer, target=[3])

    def score(a):
        return model.head(params, a, layer, logits=True)[:, 3].sum()
    g = np.asarray(jax.grad(score)(jnp.asarray(acts)))
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    ref = {
        "gradcam": relu((g.mean((1, 2), keepdims=True) * acts).sum(-1)),
        "hirescam": relu((g * acts).sum(-1)),
        "layercam": relu((relu(g) * acts).sum(-1)),
        "xgradcam": relu(((g * acts).sum((1, 2), keepdims=True) / (acts.sum((1, 2), keepdims=True) + 1e-7)
                          * acts).sum(-1)),
    }
    g2, g3 = g ** 2, g ** 3
    alpha = np.where(g != 0, g2 / (2 * g2 + acts.sum((1, 2), keepdims=True) * g3 + 1e-7), 0)
    ref["gradcampp"] = relu(((alpha * relu(g)).sum((1, 2), keepdims=True) * acts).sum(-1))
    for m, r in ref.items():
        ours = convlens.explain(model, params, x, m, layer=layer, target=[3])["cam"][:, 0]
        np.testing.assert_allclose(ours, r, rtol=1e-4, atol=1e-6 * max(1, np.abs(r).max()), err_msg=m)
    assert e["heatmap"].shape == (2, 1, 32, 32)


def test_guided_backprop_hand_written(tmp_path):
    """Guided backprop through flatten -> dense relu -> dense, by hand."""
    model = mlp()
    params = model.init(0)
    rng = np.random.default_rng(1)
    params["hidden"]["bias"] = jnp.asarray(rng.normal(0, 0.5, 16), jnp.float32)
    x = rand_images(3, (4, 4), seed=2)
    e = convlens.explain(model, params, x, "guided_backprop", target=[2])
    w1, b1 = np.asarray(params["hidden"]["kernel"]), np.asarray(params["hidden"]["bias"])
    w2 = np.asarray(params["out"]["kernel"])
    xf = (x / 255.0).reshape(3, -1)  # the model rescales by 1/255
    z = xf @ w1 + b1
    g_h = np.broadcast_to(w2[:, 2], z.shape)
    g_z = g_h * (z > 0) * (g_h > 0)
    g_x = (g_z @ w1.T) / 255.0
    np.testing.assert_allclose(e["attribution"][:, 0].reshape(3, -1), g_x, rtol=1e-5, atol=1e-9)
    # And it differs from the plain gradient exactly where the incoming gradient is negative.
    plain = convlens.explain(model, params, x, "gradient", target=[2])["attribution"]
    assert not np.allclose(plain, e["attribution"])


def test_guided_zero_where_relu_input_or_gradient_nonpositive(tiny):
    """At the first ReLU layer of VGG, the guided gradient w.r.t. its output is zero
    wherever the ReLU's input is <= 0 or the incoming gradient is <= 0."""
    model, params = tiny
    x = jnp.asarray(rand_images(2, (32, 32), seed=3))
    xp = model.preprocess(x)
    layer = "block3_conv1"
    pre = model.features(params, xp, "block2_pool")
    k, b = params[layer]["kernel"], params[layer]["bias"]
    z = jax.lax.conv_general_dilated(pre, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b

    def score(d, rule):
        return model.apply(params, xp, perturb={layer: d}, logits=True, relu_rule=rule)[0][:, 1].sum()
    zero = jnp.zeros_like(z)
    incoming_guided = jax.grad(score)(zero, "guided")  # gradient arriving at block3_conv1's output
    # Gradient w.r.t. the ReLU input, guided: through block3_conv1's own ReLU.
    def score_pre(zz):
        h = jax.nn.relu(zz)  # stand-in for the layer's ReLU output
        return jnp.sum(h * jax.lax.stop_gradient(incoming_guided))
    from convlens.models.layers import guided_relu
    g_in = jax.grad(lambda zz: jnp.sum(guided_relu(zz) * incoming_guided))(z)
    assert np.all(np.asarray(g_in)[np.asarray(z) <= 0] == 0)
    assert np.all(np.asarray(g_in)[np.asarray(incoming_guided) <= 0] == 0)
    assert np.asarray(g_in).any()
    del score_pre


@pytest.mark.slow
def test_integrated_gradients_completeness(tiny):
    model, params = tiny
    x = rand_images(3, (32, 32), seed=4)
    e = convlens.explain(model, params, x, "integrated_gradients", target="top1", steps=128)
    logits = e.logits
    f = np.take_along_axis(logits, e.targets, 1)
    f0 = np.take_along_axis(
        np.asarray(model.apply(params, model.preprocess(jnp.zeros_like(jnp.asarray(x))), logits=True)[0]),
        e.targets, 1)
    total = e["attribution"].sum(axis=(2, 3, 4))
    np.testing.assert_allclose(total, f - f0, rtol=0.01, atol=1e-3 * np.abs(f - f0).max())
    np.testing.assert_allclose(e["delta"], total - (f - f0), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_integrated_gradients_rules_agree(tiny):
    model, params = tiny
    x = rand_images(1, (32, 32), seed=5)
    a = convlens.explain(model, params, x, "integrated_gradients", steps=64)["attribution"]
    b = convlens.explain(model, params, x, "integrated_gradients", steps=256, rule="trapezoid")["attribution"]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_batch_and_per_image_targets(tiny):
    model, params = tiny
    x = rand_images(8, (32, 32), seed=6)
    targets = np.arange(8) * 97 % 1000
    batch = convlens.explain(model, params, x, "gradcam", target=targets, layer="block3_conv3")
    np.testing.assert_array_equal(batch.targets[:, 0], targets)
    maps = []
    for i in range(8):
        one = convlens.explain(model, params, x[i:i + 1], "gradcam", target=[int(targets[i])], layer="block3_conv3")
        np.testing.assert_allclose(batch["heatmap"][i], one["heatmap"][0], rtol=1e-4, atol=1e-6)
        maps.append(one["heatmap"][0, 0])
    # Different targets give different maps for the same image.
    same_img = convlens.explain(model, params, np.repeat(x[:1], 8, 0), "gradcam", target=targets,
                                layer="block3_conv3")
    flat = same_img["heatmap"][:, 0].reshape(8, -1)
    assert len({tuple(np.round(r, 6)) for r in flat}) == 8


def test_several_targets_per_image_match_single_target_calls(tiny):
    model, params = tiny
    x = rand_images(3, (32, 32), seed=7)
    multi = convlens.explain(model, params, x, "gradcampp", target="top3")
    for j in range(3):
        single = convlens.explain(model, params, x, "gradcampp", target=multi.targets[:, j])
        np.testing.assert_allclose(multi["cam"][:, j], single["cam"][:, 0], rtol=1e-4, atol=1e-7)


def test_bad_inputs(tiny, gap):
    model, params = tiny
    x = rand_images(2, (32, 32))
    with pytest.raises(ConvlensError, match="has no layer 'block9_conv1'; its layers are: .*block5_conv3"):
        convlens.explain(model, params, x, "gradcam", layer="block9_conv1")
    with pytest.raises(ConvlensError, match="gradcam needs a spatial layer.*'fc1' \\(Dense\\)"):
        convlens.explain(model, params, x, "gradcam", layer="fc1")
    with pytest.raises(ConvlensError, match="target class 1000 is out of range.*0..999"):
        convlens.explain(model, params, x, "gradcam", target=1000)
    with pytest.raises(ConvlensError, match=r"must be \[B, H, W, C\]"):
        convlens.explain(model, params, x[0, :, :, 0], "gradcam")
    with pytest.raises(ConvlensError, match="4 channels"):
        convlens.explain(model, params, np.zeros((1, 32, 32, 4)), "gradcam")
    with pytest.raises(ConvlensError, match="images are 30x30; model 'vgg_tiny' takes 32x32"):
        convlens.explain(model, params, np.zeros((1, 30, 30, 3)), "gradcam")
    with pytest.raises(ConvlensError, match="unknown method 'gradcam2'"):
        convlens.explain(model, params, x, "gradcam2")
    with pytest.raises(ConvlensError, match="has no option samples"):
        convlens.explain(model, params, x, "gradcam", samples=3)
    with pytest.raises(ConvlensError, match="not top1/top5"):
        convlens.explain(model, params, x, "gradcam", target="best")
