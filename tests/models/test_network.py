"""The graph runner: named activations, perturbation, split at a layer, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convlens.errors import ConvlensError
from convlens.models.preprocess import Preprocess
from convlens.models.registry import build_model, load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("vgg_tiny", random_init=0)


def _x(b=3, size=32, seed=0):
    return jax.random.uniform(jax.random.key(seed), (b, size, size, 3), minval=-100, maxval=100)


def test_features_then_head_equals_whole(tiny):
    model, params = tiny
    x = _x()
    y = model.apply(params, x, logits=True)[0]
    for layer in ["block3_conv2", "block5_pool", "fc1"]:
        a = model.features(params, x, layer)
        np.testing.assert_allclose(model.head(params, a, layer, logits=True), y, rtol=1e-5, atol=1e-5)


def test_perturb_gradient_is_gradient_at_layer(tiny):
    """d(score)/d(activation) through perturb equals the gradient of the head."""
    model, params = tiny
    x = _x(2)
    layer = "block4_conv3"
    a = model.features(params, x, layer)

    def via_perturb(d):
        return model.apply(params, x, perturb={layer: d}, logits=True)[0][:, 7].sum()

    def via_head(a):
        return model.head(params, a, layer, logits=True)[:, 7].sum()
    np.testing.assert_allclose(jax.grad(via_perturb)(jnp.zeros_like(a)), jax.grad(via_head)(a), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_batch_equals_one_at_a_time(tiny):
    model, params = tiny
    x = _x(4)
    y, acts = model.apply(params, x, layers="conv")
    for i in range(4):
        yi, ai = model.apply(params, x[i:i + 1], layers="conv")
        np.testing.assert_allclose(yi[0], y[i], rtol=1e-5, atol=1e-6)
        for k in ai:
            np.testing.assert_allclose(ai[k][0], acts[k][i], rtol=1e-5, atol=1e-5)


def test_logits_softmax_consistency(tiny):
    model, params = tiny
    x = _x(2)
    probs, acts = model.apply(params, x, layers=["predictions"])
    logits, acts2 = model.apply(params, x, logits=True, layers=["predictions"])
    np.testing.assert_allclose(jax.nn.softmax(logits), probs, rtol=1e-5, atol=1e-7)
    # The captured layer keeps its Keras meaning even when logits are asked for.
    np.testing.assert_allclose(acts2["predictions"], probs, rtol=1e-6)
    assert model.output_activation == "softmax"


def test_layer_selection_and_errors(tiny):
    model, _ = tiny
    assert model.resolve_layers("conv") == model.conv_layer_names
    assert len(model.conv_layer_names) == 13
    assert model.resolve_layers("block1_conv1,block2_pool") == ("block1_conv1", "block2_pool")
    with pytest.raises(ConvlensError, match="has no layer 'block9_conv1'; its layers are: input_layer, block1_conv1"):
        model.resolve_layers(["block9_conv1"])


def test_head_refuses_layers_bypassed_by_skips():
    pytest.importorskip("keras")
    from tests.models.test_keras_import import zoo_model
    import json
    from convlens.models.keras_graph import graph_from_config
    from convlens.models.network import Model
    m = zoo_model()
    model = Model(graph_from_config(json.loads(json.dumps({"class_name": "Functional", "config": m.get_config()}))))
    params = model.init(0)
    a = model.features(params, jnp.zeros((1, 24, 24, 3)), "c_same")
    with pytest.raises(ConvlensError, match="other paths from the input bypass them"):
        model.head(params, a, "c_same")


def test_param_shapes_without_compute():
    model = build_model("vgg16")
    shapes = model.param_shapes
    assert shapes["fc1"]["kernel"].shape == (25088, 4096)
    assert shapes["block5_conv3"]["bias"].shape == (512,)
    assert model.count_params() == (138357544, 0)


def test_headless_vgg_any_size():
    model = build_model("vgg16", include_top=False)
    shapes = model.output_shapes(batch=2, size=(96, 160))
    assert shapes["block5_pool"] == (2, 3, 5, 512)
    assert model.graph.input_shape == (None, None, 3)


def test_preprocess_modes_match_keras():
    pytest.importorskip("keras")
    from keras.applications import imagenet_utils
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    for mode in ("caffe", "tf", "torch"):
        ours = np.asarray(Preprocess(mode)(x))
        np.testing.assert_allclose(ours, imagenet_utils.preprocess_input(x.copy(), mode=mode), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(Preprocess(mode).invert(ours)), x, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(Preprocess("rescale")(x)), x / 255.0, rtol=1e-6)
    with pytest.raises(ConvlensError, match="unknown preprocessing"):
        Preprocess("bgr")


def test_decode_topk():
    from convlens.models.labels import decode_topk, imagenet_class_names
    names = imagenet_class_names()
    assert len(names) == 1000 and names[281] == "tabby cat"
    scores = np.zeros((1, 1000))
    scores[0, 281], scores[0, 7] = 0.7, 0.2
    top = decode_topk(scores, names, k=2)
    assert top == [[(281, "tabby cat", 0.7), (7, names[7], 0.2)]]
    assert decode_topk(np.array([[0.9]]), ("cat", "dog"), k=1) == [[(1, "dog", 0.9)]]
