"""Keras import beyond the applications: every supported layer type against Keras,
nested models, the Keras 3 auto-named weight groups, and every bad-file error."""

import json
import zipfile

import h5py
import jax
import numpy as np
import pytest

from convlens.errors import ConvlensError, ModelFileError, UnsupportedLayerError
from convlens.models import keras_io
from convlens.models.keras_graph import graph_from_config, supported_layers
from convlens.models.registry import build_model, load_model
from tests.keras_helpers import FORMATS, keras_outputs, randomize, save_all
from tests.models.test_keras_parity import assert_close, load_any

keras = pytest.importorskip("keras")
L = keras.layers


def zoo_model():
    """A functional model touching every supported layer type and option."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((24, 24, 3), name="pixels")
    x = L.Rescaling(1 / 127.5, offset=-1, name="rescale")(inp)
    x = L.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 0.5], name="norm_cfg")(x)
    adapted = L.Normalization(name="norm_adapted")
    adapted.adapt(np.random.default_rng(0).normal(size=(16, 24, 24, 3)).astype("float32"))
    x = adapted(x)
    a = L.Conv2D(8, 3, padding="same", activation="swish", name="c_same")(x)
    b = L.Conv2D(8, 3, strides=2, padding="same", activation="tanh", name="c_stride")(x)
    c = L.Conv2D(8, 3, dilation_rate=2, padding="same", activation="relu6", name="c_dilated")(x)
    cat = L.Concatenate(name="cat")([a, c])
    g = L.Conv2D(16, 3, groups=4, activation="elu", name="c_grouped")(cat)
    dw = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="gelu", name="dw")(g)
    dw = L.BatchNormalization(name="bn")(dw)
    # The layer classes Keras ships inside keras.applications (ConvNeXt, InceptionResNetV2).
    from keras.src.applications.convnext import LayerScale, StochasticDepth
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
    ln = L.LayerNormalization(epsilon=1e-6, name="ln")(dw)
    ls = LayerScale(0.5, 32, name="layer_scale")(ln)
    ls = StochasticDepth(0.1, name="stoch_depth")(ls)
    dw = CustomScaleLayer(0.3, name="custom_scale")([dw, ls])
    sep = L.SeparableConv2D(16, 3, strides=2, padding="same", activation="selu", name="sep")(dw)
    zp = L.ZeroPadding2D(((1, 0), (0, 1)), name="zpad")(sep)
    mp = L.MaxPooling2D(3, strides=2, padding="same", name="maxp_same")(zp)
    ap = L.AveragePooling2D(3, strides=2, padding="same", name="avgp_same")(zp)
    ap2 = L.AveragePooling2D(2, name="avgp_valid")(zp)
    s = L.Multiply(name="mul")([mp, ap])
    s = L.Add(name="add")([s, ap2, mp])
    s = L.ReLU(max_value=2.0, negative_slope=0.1, threshold=0.05, name="relu_opts")(s)
    s = L.LeakyReLU(negative_slope=0.2, name="leaky")(s)
    s = L.Activation("softplus", name="act_softplus")(s)
    s = L.Subtract(name="sub")([s, ap2])
    s = L.Maximum(name="max")([s, ap])
    s = L.Minimum(name="min")([s, mp])
    s = L.Average(name="avg")([s, ap2])
    s = L.SpatialDropout2D(0.3, name="sdrop")(s)
    s = L.GaussianNoise(0.5, name="noise")(s)
    s = L.GaussianDropout(0.2, name="gdrop")(s)
    s = L.AlphaDropout(0.2, name="adrop")(s)
    crop = L.Cropping2D(((1, 1), (0, 2)), name="crop")(s)
    inner_seq = keras.Sequential([
        L.Conv2D(4, 1, activation="hard_sigmoid", name="in_conv"),
        L.BatchNormalization(center=False, name="in_bn"),
        L.Activation("softsign", name="in_softsign")], name="inner_seq")
    y = inner_seq(crop)
    i_in = keras.Input((None, None, 4))
    i_out = L.Conv2D(6, 2, activation="hard_silu", name="fn_conv")(i_in)
    i_out = L.MaxPooling2D(2, padding="same", name="fn_pool")(i_out)
    inner_fn = keras.Model(i_in, i_out, name="inner_fn")
    y = inner_fn(y)
    gmp = L.GlobalMaxPooling2D(name="gmp")(y)
    gap = L.GlobalAveragePooling2D(name="gap")(y)
    gapk = L.GlobalAveragePooling2D(keepdims=True, name="gap_keep")(b)
    gapk = L.Flatten(name="flat_keep")(gapk)
    cat2 = L.Concatenate(name="cat2")([gmp, gap, gapk])
    r = L.Reshape((4, -1), name="reshape")(cat2)
    r = L.Activation("sigmoid", name="act_sigmoid")(r)
    r = L.Flatten(name="flat")(r)
    r = L.Dropout(0.5, name="drop")(r)
    r = L.Dense(10, activation="mish", name="d_mish")(r)
    r = L.Dense(12, activation="leaky_relu", name="d_leaky")(r)
    r = L.ActivityRegularization(name="actreg")(r)
    r = L.Dense(5, use_bias=False, name="d_nobias")(r)
    out = L.Softmax(name="softmax")(r)
    m = keras.Model(inp, out, name="zoo")
    randomize(m, 7)
    return m


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    m = zoo_model()
    files = save_all(m, tmp_path_factory.mktemp("zoo"), "zoo")
    x = np.random.default_rng(1).uniform(0, 255, (3, 24, 24, 3)).astype("float32")
    return m, files, x


@pytest.mark.slow
def test_zoo_covers_every_supported_layer(zoo):
    m, _, _ = zoo
    used = set()

    def walk(model):
        for layer in model.layers:
            used.add(type(layer).__name__)
            if hasattr(layer, "layers"):
                walk(layer)
    walk(m)
    missing = set(supported_layers()) - used
    assert not missing, f"zoo model does not exercise {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_zoo_every_format_every_layer(zoo, fmt):
    m, files, x = zoo
    ref = keras_outputs(m, x)
    model, params = load_any(fmt, files[fmt], files["keras"])
    y, acts = jax.jit(lambda p, x: model.apply(p, x, layers=list(ref)))(params, x)
    for name in ref:
        assert_close(acts[name], ref[name], f"[{fmt}] {name}")
    assert_close(y, ref["softmax"], "output")
    logits, _ = model.apply(params, x, logits=True)
    assert_close(logits, ref["d_nobias"], "logits")


def test_nested_layers_are_addressable(zoo):
    m, files, x = zoo
    model, params = keras_io.load_model_file(files["keras"])
    _, acts = model.apply(params, x, layers=["in_conv", "fn_conv", "inner_seq", "inner_fn"])
    inner = keras.Model(m.get_layer("inner_seq").inputs, m.get_layer("inner_seq").get_layer("in_conv").output)
    crop = keras_outputs(m, x)["crop"]
    assert_close(acts["in_conv"], inner.predict(crop, verbose=0), "in_conv")
    assert_close(acts["inner_fn"], keras_outputs(m, x)["inner_fn"], "inner_fn")


def test_keras3_weights_without_name_attributes(zoo, tmp_path):
    """Older Keras 3 files carry no `name` attribute: groups are matched by Keras's
    class-based auto names in layer order (conv2d, conv2d_1, ... conv2d_10 after conv2d_9)."""
    m, files, x = zoo
    model, params = keras_io.load_model_file(files["keras"])
    stripped = tmp_path / "stripped.weights.h5"
    stripped.write_bytes(files["weights_h5"].read_bytes())
    with h5py.File(stripped, "r+") as f:
        def strip(name, obj):
            if "name" in obj.attrs:
                del obj.attrs["name"]
        f.visititems(strip)
    again = keras_io.load_weights(model, stripped)
    for layer in params:
        for k in params[layer]:
            np.testing.assert_array_equal(np.asarray(again[layer][k]), np.asarray(params[layer][k]))


def test_auto_names_beyond_ten(tmp_path):
    """VGG16 has 13 Conv2D: conv2d_10 must follow conv2d_9, not conv2d_1."""
    keras.utils.set_random_seed(5)
    k = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    randomize(k, 5)
    path = tmp_path / "v.weights.h5"
    k.save_weights(path)
    with h5py.File(path, "r+") as f:
        f.visititems(lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None)
    model = build_model("vgg16", include_top=False)
    params = keras_io.load_weights(model, path)
    for layer in k.layers:
        for w in layer.weights:
            tail = w.path.split("/")[-1]
            np.testing.assert_array_equal(np.asarray(params[layer.name][tail]), np.asarray(w.numpy()))


def test_snake_case_matches_keras():
    from keras.src.utils import naming
    for cls in supported_layers() + ["Functional", "Sequential", "ReLU", "PReLU", "Conv2DTranspose"]:
        assert keras_io.snake_case(cls) == naming.to_snake_case(cls)


# ------------------------------------------------------------------------------ bad files

def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        keras_io.file_kind(tmp_path / "nope.h5")
    with pytest.raises(ModelFileError, match="is a directory"):
        keras_io.file_kind(tmp_path)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "junk.h5"
    p.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelFileError, match="neither a Keras .keras archive nor an HDF5"):
        load_model(str(p))
    empty = tmp_path / "empty.keras"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="neither"):
        load_model(str(empty))


@pytest.mark.parametrize("fmt", ["keras", "legacy_h5", "weights_h5", "published"])
def test_truncated_files(zoo, tmp_path, fmt):
    _, files, _ = zoo
    data = files[fmt].read_bytes()
    cut = tmp_path / files[fmt].name
    cut.write_bytes(data[: len(data) // 2])
    model, _ = keras_io.load_model_file(files["keras"])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        if fmt in ("keras", "legacy_h5"):
            keras_io.load_model_file(cut)
        else:
            keras_io.load_weights(model, cut)


def test_corrupt_bytes_in_hdf5(zoo, tmp_path):
    _, files, _ = zoo
    data = bytearray(files["legacy_h5"].read_bytes())
    data[8:4096] = b"\x00" * (4096 - 8)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        keras_io.load_model_file(bad)


def test_wrong_architecture_lists_layers(tmp_path):
    keras.utils.set_random_seed(6)
    k = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    k.save_weights(path)
    model = build_model("vgg19", include_top=False)
    with pytest.raises(ModelFileError) as e:
        keras_io.load_weights(model, path)
    msg = str(e.value)
    assert "missing layers: block3_conv4, block4_conv4, block5_conv4" in msg
    assert "\n" not in msg


def test_shape_mismatch_is_named(tmp_path):
    keras.utils.set_random_seed(6)
    k = keras.Sequential([
        keras.Input((150, 150, 3)),
        L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(128, 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(128, 3, activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dropout(0.5), L.Dense(512, activation="relu"), L.Dense(2, activation="softmax")])
    path = tmp_path / "two_class.weights.h5"
    k.save_weights(path)
    with pytest.raises(ModelFileError, match=r"dense_1/kernel: file shape \(512, 2\), model shape \(512, 1\)"):
        load_model("smallcnn", weights=str(path))


def test_weights_only_file_is_not_a_model(zoo):
    _, files, _ = zoo
    with pytest.raises(ModelFileError, match="weights only"):
        load_model(str(files["published"]))


def _lambda_model():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(2, 3)(inp)
    x = L.Lambda(lambda t: t * 2.0, name="double")(x)
    return keras.Model(inp, L.Flatten()(x))


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_refused(tmp_path, suffix):
    path = tmp_path / f"lam{suffix}"
    _lambda_model().save(path)
    with pytest.raises(UnsupportedLayerError, match="layer 'double' is a Lambda layer.*never executes code"):
        keras_io.load_model_file(path)


def test_custom_layer_refused(tmp_path):
    @keras.saving.register_keras_serializable(package="mine")
    class Twice(L.Layer):
        def call(self, x):
            return 2 * x

    inp = keras.Input((8, 8, 3))
    m = keras.Model(inp, Twice(name="twice")(L.Conv2D(2, 3)(inp)))
    path = tmp_path / "custom.keras"
    m.save(path)
    with pytest.raises(UnsupportedLayerError, match="layer 'twice' has type 'mine>Twice'.*custom objects are never"):
        keras_io.load_model_file(path)


def test_unsupported_layer_lists_supported(tmp_path):
    inp = keras.Input((8, 8, 3))
    m = keras.Model(inp, L.UpSampling2D(name="up")(L.Conv2D(2, 3)(inp)))
    path = tmp_path / "up.keras"
    m.save(path)
    with pytest.raises(UnsupportedLayerError) as e:
        keras_io.load_model_file(path)
    msg = str(e.value)
    assert "layer 'up' has type 'UpSampling2D'" in msg and "Conv2D" in msg and "DepthwiseConv2D" in msg


def test_channels_first_refused():
    inp = keras.Input((3, 8, 8))
    m = keras.Model(inp, L.Conv2D(2, 3, data_format="channels_first", name="cf")(inp))
    with pytest.raises(UnsupportedLayerError, match="'cf'.*channels_first"):
        graph_from_config(json.loads(json.dumps({"class_name": "Functional", "config": m.get_config()})))


def test_config_without_weights_member(zoo, tmp_path):
    _, files, _ = zoo
    bad = tmp_path / "noweights.keras"
    with zipfile.ZipFile(files["keras"]) as src, zipfile.ZipFile(bad, "w") as dst:
        dst.writestr("config.json", src.read("config.json"))
    with pytest.raises(ModelFileError, match="no model.weights.h5"):
        keras_io.load_model_file(bad)


def test_builtin_refuses_without_weights():
    with pytest.raises(ConvlensError, match="--random-init SEED"):
        load_model("vgg16")
    model, params = load_model("vgg_tiny", random_init=0)
    assert model.source == "random-init:0"


@pytest.mark.parametrize("entry, ok", [
    ({"class_name": "LayerScale", "module": "keras.src.applications.convnext",
      "config": {"name": "ls", "init_values": 0.5, "projection_dim": 4}}, True),
    # A legacy .h5 names no module: Keras's options exactly, or refused.
    ({"class_name": "LayerScale", "config": {"name": "ls", "init_values": 0.5, "projection_dim": 4}}, True),
    ({"class_name": "LayerScale", "config": {"name": "ls", "init_values": 0.5, "projection_dim": 4, "axis": 1}},
     False),
    ({"class_name": "LayerScale", "module": "mypkg.layers", "registered_name": "mypkg>LayerScale",
      "config": {"name": "ls", "init_values": 0.5, "projection_dim": 4}}, False),
    ({"class_name": "CustomScaleLayer", "module": "keras.src.applications.convnext", "config": {"scale": 0.2}},
     False),
])
def test_keras_application_layers_only_from_keras(entry, ok):
    """LayerScale, StochasticDepth and CustomScaleLayer are Keras's own only by module (or,
    in a legacy file without modules, by exactly Keras's options); another class of the
    same name is refused, never guessed at."""
    from convlens.errors import UnsupportedLayerError
    from convlens.models.keras_graph import _check_class
    if ok:
        _check_class(entry, "ls")
    else:
        with pytest.raises(UnsupportedLayerError, match="not Keras's own"):
            _check_class(entry, "ls")
