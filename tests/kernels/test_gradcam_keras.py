"""Grad-CAM against a reference computed from the Keras model itself (Keras 3, JAX
backend): jax.grad through Keras's own layers, on VGG16 at block5_conv3, real photos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convlens
from convlens.models import keras_io
from convlens.models.registry import build_model
from tests.keras_helpers import randomize

keras = pytest.importorskip("keras")


@pytest.mark.slow
def test_gradcam_matches_keras_reference(tmp_path, photos224):
    keras.utils.set_random_seed(11)
    km = keras.applications.VGG16(weights=None)
    randomize(km, 11)
    path = tmp_path / "vgg16.weights.h5"
    km.save_weights(path)
    model = build_model("vgg16")
    params = keras_io.load_weights(model, path)

    x = keras.applications.vgg16.preprocess_input(photos224.astype("float32"))
    names = [l.name for l in km.layers]
    cut = names.index("block5_conv3")
    features = keras.Model(km.inputs, km.get_layer("block5_conv3").output)
    acts = jnp.asarray(features.predict(x, verbose=0))
    pred = km.get_layer("predictions")
    w, b = (jnp.asarray(v) for v in pred.get_weights())

    def logits(a):
        h = a
        for layer in km.layers[cut + 1:-1]:
            h = layer(h)
        return h @ w + b  # the class score before softmax

    top = np.asarray(jnp.argmax(logits(acts), axis=-1))
    grads = jax.grad(lambda a: jnp.sum(logits(a)[jnp.arange(len(top)), top]))(acts)
    ref = np.asarray(jax.nn.relu(jnp.sum(jnp.mean(grads, axis=(1, 2), keepdims=True) * acts, axis=-1)))

    e = convlens.explain(model, params, photos224, "gradcam", layer="block5_conv3", target="top1")
    np.testing.assert_array_equal(e.targets[:, 0], top)
    ours = e["cam"][:, 0]
    assert ours.shape == ref.shape == (4, 14, 14)
    live = ref.reshape(4, -1).max(1) > 0
    assert live.sum() >= 3, "reference maps are empty: the test would prove nothing"
    for i in np.flatnonzero(live):
        np.testing.assert_allclose(ours[i] / ours[i].max(), ref[i] / ref[i].max(), atol=1e-4)
    # The default layer for VGG16 is the same one Keras's Grad-CAM example uses.
    assert convlens.explain(model, params, photos224[:1], "gradcam").layer == "block5_conv3"
