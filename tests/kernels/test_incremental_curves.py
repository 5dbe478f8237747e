"""Faithfulness curves by incremental re-inference (`incremental.patch_curve`): each step
recomputes only its patch's cone on the previous step's maps, and must give the numbers
of running the whole model on every step's image (to float32 rounding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convlens.kernels import incremental
from convlens.kernels.metrics import faithful
from convlens.kernels.metrics.base import Scorer
from convlens.models.registry import build_model
from tests.kernels.nets import functional, layer, with_random_biases


def residual_net():
    """A stem (pad, strided conv, BN, ReLU, pool) then a residual block: the stem is the
    sequential prefix the curves run incrementally, the block runs in full."""
    return functional("resnet_like", [
        layer("ZeroPadding2D", "pad", "img", padding=[[1, 1], [1, 1]]),
        layer("Conv2D", "stem", "pad", filters=8, kernel_size=[3, 3], strides=[2, 2], padding="valid"),
        layer("BatchNormalization", "bn", "stem", epsilon=1e-3),
        layer("ReLU", "relu", "bn"),
        layer("MaxPooling2D", "pool", "relu", pool_size=[2, 2], strides=[2, 2], padding="same"),
        layer("Conv2D", "b1", "pool", filters=8, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("Conv2D", "b2", "b1", filters=8, kernel_size=[3, 3], padding="same"),
        layer("Add", "add", ["pool", "b2"]),
        layer("GlobalAveragePooling2D", "gap", "add"),
        layer("Dense", "pred", "gap", units=5, activation="softmax"),
    ], (30, 30, 3))


def _curves(model, params, x, a, metric, output="curve", **kw):
    """The metric's curve on logits, incrementally and by full re-inference."""
    y = jnp.argmax(Scorer(model, params, False)(x), -1)
    out = {}
    for inc in (True, False):
        f = jax.jit(lambda p, x, a, y, inc=inc: metric(Scorer(model, p, False), x, a, y, incremental=inc, **kw))
        out[inc] = np.asarray(f(params, x, a, y)[output])
    return out[True], out[False]


def _inputs(model, n, seed):
    h, w = model.input_size
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.uniform(0, 255, (n, h, w, 3)).astype(np.float32)),
            jnp.asarray(rng.normal(size=(n, h, w)).astype(np.float32)))


def _assert_equal(inc, full):
    scale = max(1.0, float(np.abs(full).max()))
    np.testing.assert_allclose(inc, full, rtol=0, atol=1e-5 * scale)
    assert np.ptp(full) > 1e-3 * scale  # the curve moves: the test could fail


def test_patch_grid_is_the_metrics_grid():
    idx, sy, sx = incremental.patch_grid(30, 29, 8)
    # 30 rows padded to 32 (1 before, 1 after), 29 columns to 32 (1 before, 2 after).
    assert list(sy) == [-1, 7, 15, 23] and list(sx) == [-1, 7, 15, 23]
    assert idx[0, 0] == 0 and idx[6, 6] == 0 and idx[7, 6] == 4 and idx[29, 28] == 15
    for t in range(16):  # each patch is the square at its start, cut at the border
        ys, xs = np.nonzero(idx == t)
        assert ys.min() == max(sy[t // 4], 0) and ys.max() == min(sy[t // 4] + 7, 29)
        assert xs.min() == max(sx[t % 4], 0) and xs.max() == min(sx[t % 4] + 7, 28)


def test_the_prefix_stops_where_the_rest_reads_only_its_last_layer():
    names = [n.name for n in incremental.chain(residual_net(), prefix=True)]
    assert names == ["pad", "stem", "bn", "relu", "pool"]
    with pytest.raises(Exception, match="sequential chain"):
        incremental.chain(residual_net())


@pytest.mark.parametrize("net", ["vgg_tiny", "residual"])
def test_incremental_curves_equal_full_reinference(net):
    model = build_model("vgg_tiny") if net == "vgg_tiny" else residual_net()
    params = with_random_biases(model, 3)
    x, a = _inputs(model, 3, 4)
    inc, full = _curves(model, params, x, a, faithful.region_perturbation, patch_size=6, regions_evaluation=12)
    _assert_equal(inc, full)
    inc, full = _curves(model, params, x, a, faithful.selectivity, patch_size=8, baseline="mean")
    _assert_equal(inc, full)
    keys = jax.random.split(jax.random.key(1), 3)  # noise: the fill is an image, not a value
    inc, full = _curves(model, params, x, a, faithful.infidelity, "score", patch_sizes=(7,), n_perturb_samples=1,
                        noise=5.0, keys=keys)
    np.testing.assert_allclose(inc, full, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_incremental_curves_equal_full_reinference_on_vgg16_and_resnet50(name):
    model = build_model(name)
    params = model.init(0)
    x, a = _inputs(model, 1, 5)
    inc, full = _curves(model, params, x, a, faithful.region_perturbation, patch_size=16, regions_evaluation=6,
                        order="random", keys=jax.random.split(jax.random.key(0), 1))
    _assert_equal(inc, full)
