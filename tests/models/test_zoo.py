"""Every convnet of keras.applications, built in Keras (random weights, biases and
BatchNorm statistics randomised, classifier_activation=None so the outputs are logits),
saved as .keras and read back by convlens: the logits and every layer's output agree to
``max|diff| <= 1e-4 * max(1, max|keras|)``. The built-in of the same name (built from
convlens's data, no Keras) takes the same weights and gives the same logits.

convlens runs grouped and depthwise convolutions in its default lowering (shifted
multiply-adds); Keras on JAX runs them as XLA's grouped convolution, the native
lowering, so the comparison checks one against the other layer by layer and end to end.
Each grouped layer is also run in both lowerings on the same input, and the gradient of
each convolution with few input channels in the ``im2col`` and native lowerings.

Inputs are reduced to the smallest size each architecture allows (the weights do not
depend on it), two real photos each."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convlens.models import keras_io, layers, zoo
from convlens.models.registry import MODELS, build_model
from tests.conftest import photo_batch
from tests.keras_helpers import assert_close, keras_outputs, randomize

keras = pytest.importorskip("keras")

# The smallest input each family accepts (Keras checks it), to keep the test fast.
MIN_SIZE = {"inception_v3": 75, "inception_resnet_v2": 75, "xception": 71, "nasnet_mobile": 32,
            "nasnet_large": 32}
NAMES = [n for n in zoo.names()]
# The default run covers one architecture per keras.applications builder (every layer type
# and block the zoo has); the other 26, the same builders at other widths and depths, are
# marked `huge` and left out of the default run (pyproject's addopts), since together they
# took most of the suite's time: `pytest -m huge tests/models/test_zoo.py` runs them.
DEFAULT = ("convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_b0", "inception_resnet_v2",
           "inception_v3", "mobilenet", "mobilenet_v2", "mobilenet_v3_small", "nasnet_mobile", "resnet50",
           "resnet50_v2", "vgg16", "xception")
NAMES = [n for n in NAMES if n in DEFAULT] + [pytest.param(n, marks=pytest.mark.huge) for n in NAMES
                                             if n not in DEFAULT]


@pytest.fixture(autouse=True)
def _release_each_model():
    """40 models in Keras and convlens, compiled in one process: release each one's
    programs before the next (see ``tests/conftest.py``)."""
    yield
    keras.backend.clear_session()
    from convlens.engine import executor
    executor.clear_cache()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_keras_applications_zoo(name, tmp_path):
    t0 = time.perf_counter()
    e = zoo.entries()[name]
    size = MIN_SIZE.get(name, 32)
    fn = getattr(keras.applications, e["keras_name"])
    kmodel = fn(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    # Contracting BatchNorms: with random weights, hundreds of layers otherwise grow the
    # activations until float32 rounding alone, amplified, decides the last digits.
    randomize(kmodel, seed=len(name), gamma=(0.5, 1.0), variance=(1.0, 2.0))
    x = photo_batch((size, size), ("chelsea", "coffee")).astype(np.float32)
    x = np.asarray(MODELS[name].preprocess(x)) if name in MODELS else x  # the model's own input space
    ref = keras_outputs(kmodel, x)
    path = tmp_path / f"{name}.keras"
    kmodel.save(path)
    model, params = keras_io.load_model_file(path)
    names = list(ref)
    grouped = [n for n in model.graph.nodes
               if n.cls in ("DepthwiseConv2D", "SeparableConv2D") or n.config.get("groups", 1) > 1]
    # Convolutions of few input channels (the first), whose gradient im2col computes.
    shapes = model.output_shapes()
    few = [n for n in model.graph.nodes if n.cls == "Conv2D" and n.config.get("groups", 1) == 1
           and shapes[n.inputs[0]][-1] <= layers.IM2COL_MAX_CHANNELS]
    feeding = [i for n in grouped + few for i in n.inputs if i != model.graph.input]
    y, acts = jax.jit(lambda p, v: model.apply(p, v, layers=list(dict.fromkeys(names + feeding))))(params, x)
    for layer in names:
        assert_close(acts[layer], ref[layer], f"{name}: {layer}")
    assert_close(y, ref[names[-1]], f"{name}: logits")
    for node in grouped:
        xs = [x if i == model.graph.input else acts[i] for i in node.inputs]
        outs = {}
        for lowering in layers.LOWERINGS:
            with layers.lowering(lowering):
                outs[lowering] = node.layer_type.apply(node.config, params[node.name], xs)
        assert_close(outs["shifted"], outs["native"], f"{name}: {node.name} in both lowerings")
    # im2col changes the gradient of convolutions of few input channels (the first one):
    # the VJP, for the input and the kernel, in both lowerings.
    assert few, f"{name}: no convolution of few input channels found"
    for node in few:
        xin = x if node.inputs[0] == model.graph.input else acts[node.inputs[0]]
        vjps = {}
        for lowering in ("im2col", "native"):
            def f(p, v, lowering=lowering, node=node):
                with layers.lowering(lowering):
                    return node.layer_type.apply(node.config, p, [v])
            out, pull = jax.vjp(f, params[node.name], jnp.asarray(xin))
            vjps[lowering] = pull(jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)))
        for a, b in zip(jax.tree.leaves(vjps["im2col"]), jax.tree.leaves(vjps["native"])):
            assert_close(a, b, f"{name}: {node.name}'s gradient in both lowerings")
    # The built-in, from convlens's own data, with the same weights: the same logits.
    builtin = build_model(name, input_shape=(size, size, 3)) if not MODELS[name].fixed_size else None
    if builtin is not None:
        bparams = keras_io.load_weights(builtin, path)
        logits, _ = jax.jit(lambda p, v: builtin.apply(p, v, logits=True))(bparams, x)
        assert_close(logits, ref[names[-1]], f"{name}: built-in logits")
    print(f"{name}: {len(names)} layers at {size}x{size}, {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
# ConvNeXt-Tiny's end-to-end run is in the huge tier (its layers are checked against Keras
# above): the two runs took over 9 minutes together.
@pytest.mark.parametrize("name", ["resnet50", pytest.param("convnext_tiny", marks=pytest.mark.huge)])
def test_zoo_models_explain_end_to_end(name, tmp_path, capsys):
    """A ResNet50 and a ConvNeXt-Tiny through run, audit and render (random weights, 64x64)."""
    from PIL import Image

    from tests.test_cli import run as cli
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(photo_batch((96, 96))):
        Image.fromarray(img).save(photos / f"{i}.png")
    out = tmp_path / "s.zarr"
    code, stdout, err = cli(["run", name, "--random-init", "0", "--input-size", "64x64", "--data", str(photos),
                             "-m", "gradcam,hirescam", "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and "4 done" in stdout, err
    code, stdout, err = cli(["audit", str(out), "--quality-items", "2", "--no-progress", "--quality-options",
                             "deletion.steps=4,insertion.steps=4,mprt.stages=2"], capsys)
    assert code == 0 and "audited" not in err and "gradcam:" in stdout, err
    code, stdout, err = cli(["render", str(out), "--out", str(tmp_path / "pics")], capsys)
    assert code == 0 and "overlays" in stdout, err
    assert (tmp_path / "pics" / "overlays" / "0.png").exists()
