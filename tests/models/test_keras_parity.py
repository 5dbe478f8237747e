"""Parity with Keras 3 (JAX backend): every format, every named layer, real photos.

The reference is Keras computing the same model on the same photos; convlens reads the
model back from each file format and must agree on the logits and every layer's
output to max|diff| <= 1e-4 * max(1, max|keras|).
"""

import jax
import numpy as np
import pytest

from convlens.models import keras_io
from convlens.models.preprocess import Preprocess
from convlens.models.registry import build_model
from tests.conftest import photo_batch
from tests.keras_helpers import FORMATS, assert_close, keras_outputs, randomize, save_all

keras = pytest.importorskip("keras")


def load_any(fmt, path, graph_source, builtin=None):
    """A convlens (model, params) from one file; weights-only formats need a graph."""
    if fmt in ("keras", "legacy_h5"):
        return keras_io.load_model_file(path)
    if builtin is not None:
        model = build_model(builtin)
    else:
        model, _ = keras_io.load_model_file(graph_source)
    return model, keras_io.load_weights(model, path)


def check_model(kmodel, x, files, builtin=None, pre_logits=True):
    ref = keras_outputs(kmodel, x)
    for fmt in FORMATS:
        model, params = load_any(fmt, files[fmt], files["keras"], builtin)
        names = [n for n in ref]
        y, acts = jax.jit(lambda p, x: model.apply(p, x, layers=names))(params, x)
        for name in names:
            assert_close(acts[name], ref[name], f"[{fmt}] {name}")
        assert_close(y, ref[names[-1]], f"[{fmt}] output")
        if pre_logits and model.output_activation == "softmax":
            logits, _ = model.apply(params, x, logits=True)
            # Keras's own pre-softmax scores: the last Dense without its activation.
            last = kmodel.layers[-1]
            w, b = (np.asarray(v) for v in last.get_weights())
            ref_logits = ref[kmodel.layers[-2].name] @ w + b
            assert_close(logits, ref_logits, f"[{fmt}] logits")
    return ref


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("keras_files")


@pytest.mark.slow
# MobileNetV2's save formats and its VGG19 sibling below run in the huge tier: the zoo test
# checks their layers against Keras, and ResNet50 / VGG16 here cover every format (the CI
# time they took went to the propagation methods' parity tests).
@pytest.mark.parametrize("name", ["resnet50", pytest.param("mobilenetv2", marks=pytest.mark.huge)])
def test_keras_applications(name, folder, photos224):
    keras.utils.set_random_seed(1)
    ctor = {"resnet50": keras.applications.ResNet50, "mobilenetv2": keras.applications.MobileNetV2}[name]
    pre = {"resnet50": "caffe", "mobilenetv2": "tf"}[name]
    kmodel = ctor(weights=None)
    randomize(kmodel, 1)
    x = np.asarray(Preprocess(pre)(photos224[:2]))
    ref_pre = keras.applications.imagenet_utils.preprocess_input(photos224[:2].astype("float32"), mode=pre)
    np.testing.assert_allclose(x, ref_pre, atol=1e-4)
    files = save_all(kmodel, folder, name)
    check_model(kmodel, x, files)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", pytest.param("vgg19", marks=pytest.mark.huge)])
def test_vgg_builtin(name, folder, photos224):
    keras.utils.set_random_seed(2)
    ctor = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[name]
    kmodel = ctor(weights=None)
    randomize(kmodel, 2)
    files = save_all(kmodel, folder, name)
    model = build_model(name)
    x = np.asarray(model.preprocess(photos224[:2]))
    np.testing.assert_allclose(
        x, keras.applications.imagenet_utils.preprocess_input(photos224[:2].astype("float32"), mode="caffe"),
        atol=1e-4)
    check_model(kmodel, x, files, builtin=name)
    for f in files.values():
        f.unlink()


@pytest.mark.slow
def test_vgg16_headless_any_size(folder):
    keras.utils.set_random_seed(3)
    kmodel = keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3))
    randomize(kmodel, 3)
    path = folder / "vgg16_notop.weights.h5"
    kmodel.save_weights(path)
    model = build_model("vgg16", include_top=False)
    params = keras_io.load_weights(model, path)
    for size in [(64, 96), (150, 150)]:
        x = np.asarray(model.preprocess(photo_batch(size, ("chelsea", "coffee"))))
        ref = keras_outputs(kmodel, x)
        _, acts = model.apply(params, x, layers=list(ref))
        for n in ref:
            assert_close(acts[n], ref[n], f"{size} {n}")


@pytest.mark.slow
def test_smallcnn_builtin(folder):
    keras.backend.clear_session()  # fresh auto-names, as in a new Keras session
    keras.utils.set_random_seed(4)
    kmodel = keras.Sequential([
        keras.Input((150, 150, 3)),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(128, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(128, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(), keras.layers.Dropout(0.5),
        keras.layers.Dense(512, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
    randomize(kmodel, 4)
    files = save_all(kmodel, folder, "smallcnn")
    model = build_model("smallcnn")
    # The built-in carries Keras's auto names for a fresh Sequential.
    assert [l.name for l in kmodel.layers] == list(model.layer_names)
    x = np.asarray(model.preprocess(photo_batch((150, 150))))
    check_model(kmodel, x, files, builtin="smallcnn")


def test_full_model_file_from_another_session_fits_the_builtin(tmp_path):
    """The same architecture saved in another Keras session carries other automatic
    names, and they can coincide with other layers' names here (the file's ``conv2d_2``
    is this model's ``conv2d_1``, with the same shape): the weights still reach the right
    layers (by position, as Keras loads a model object) and give Keras's outputs."""
    def build():
        return keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Normalization(mean=[1., 2., 3.], variance=[4., 5., 6.]),
                                 keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                                 keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                                 keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                                 keras.layers.Conv2D(4, 3, padding="same"),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    keras.backend.clear_session()
    first = build()
    first.save(tmp_path / "first.keras")
    keras.backend.clear_session()
    keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 1)])  # takes conv2d
    second = build()  # conv2d_1 ... conv2d_4: three of them names of other layers of `first`
    randomize(second, 2)
    assert {l.name for l in second.layers} & {l.name for l in first.layers} - {"normalization"}
    model, _ = keras_io.load_model_file(tmp_path / "first.keras")
    x = photo_batch((16, 16)).astype(np.float32)
    for fmt, path in (("keras", tmp_path / "second.keras"), ("h5", tmp_path / "second.h5"),
                      ("weights", tmp_path / "second.weights.h5")):
        second.save_weights(path) if fmt == "weights" else second.save(path)
        params = keras_io.load_weights(model, path)
        y, _ = model.apply(params, x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(second(x)), rtol=1e-5, atol=1e-5, err_msg=fmt)
