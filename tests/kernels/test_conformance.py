"""Conformance suite generated from the method registry: every registered method gets
every check, so a new method cannot skip them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convlens
from convlens.engine.executor import item_keys
from convlens.kernels.registry import METHODS
from tests.kernels.nets import binary_net, gap_net, with_random_biases

FAST = {"smoothgrad": {"samples": 6}, "integrated_gradients": {"steps": 8}, "occlusion": {"window": 6, "stride": 5},
        "lime": {"samples": 40, "features": 16, "segmentation": "grid"}, "rise": {"samples": 24},
        "kernelshap": {"samples": 200, "features": 16, "segmentation": "grid"},
        "deeplift_shap": {"samples": 2}, "gradient_shap": {"samples": 2, "references": 2}}


@pytest.fixture(scope="module")
def net():
    model = gap_net()
    params = with_random_biases(model, 5)
    x = np.random.default_rng(6).uniform(0, 255, (3, 16, 16, 3)).astype("float32")
    return model, params, x


def close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * max(1.0, float(np.abs(b).max())), err_msg=what)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_declared_outputs_and_dims(net, method):
    model, params, x = net
    e = convlens.explain(model, params, x, method, target="top2", **FAST.get(method, {}))
    spec = METHODS[method]
    declared = {o.name: o.dims for o in spec.outputs}
    assert set(e.outputs) == set(declared), f"{method}: outputs {set(e.outputs)} != declared {set(declared)}"
    sizes = {"sample": 3, "target": 2, "y": 16, "x": 16, "channel": 3, "class": 6, "layer_y": 8, "layer_x": 8,
             "grid_y": 3, "grid_x": 3, "segment": 16}
    for name, arr in e.outputs.items():
        dims = e.dims[name]
        assert arr.ndim == len(dims), f"{method}.{name}: {arr.shape} vs dims {dims}"
        for d, n in zip(dims, arr.shape):
            assert sizes[d] == n, f"{method}.{name}: dim {d} has {n}, expected {sizes[d]}"
        assert np.isfinite(arr).all(), f"{method}.{name} has non-finite values"
        assert np.abs(arr).max() > 0, f"{method}.{name} is all zeros"
    assert e.targets.shape == (3, 2) and e.logits.shape == (3, 6)
    assert {o.name for o in spec.all_outputs} >= {"targets", "logits"}


# Eager execution runs op by op: one image and the fewest samples that still take every path.
EAGER = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 3}, "occlusion": {"window": 8, "stride": 8},
         "lime": {"samples": 12, "features": 4, "segmentation": "grid"}, "rise": {"samples": 4},
         "scorecam": {"channels": 3}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_jit_equals_eager(net, method):
    model, params, x = net
    spec = METHODS[method]
    x = x[:1]
    e = convlens.explain(model, params, x, method, target="top1", key=3, **EAGER.get(method, {}))
    with jax.disable_jit():
        eager = spec.explain(model, params, jnp.asarray(x), 1, e.config, item_keys(3, np.arange(len(x))))
    for name in e.outputs:
        close(np.asarray(eager[name]), e[name], f"{method}.{name}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batch_size_invariance(net, method):
    model, params, x = net
    kw = FAST.get(method, {})
    whole = convlens.explain(model, params, x, method, key=1, **kw)
    for bs in (1, 2):
        part = convlens.explain(model, params, x, method, key=1, batch_size=bs, **kw)
        for name in whole.outputs:
            close(part[name], whole[name], f"{method}.{name} batch_size={bs}")


@pytest.mark.parametrize("method", sorted(m for m, s in METHODS.items()
                                          if "chunk" in {f.name for f in dataclasses.fields(s.config)}))
def test_chunk_invariance(net, method):
    model, params, x = net
    kw = dict(FAST.get(method, {}))
    # chunk counts images per pass: 3 images -> 1, 1, 2 and every copy in one step.
    ref = convlens.explain(model, params, x, method, key=2, chunk=100_000, **kw)
    for chunk in (1, 3, 7):
        other = convlens.explain(model, params, x, method, key=2, chunk=chunk, **kw)
        for name in ref.outputs:
            close(other[name], ref[name], f"{method}.{name} chunk={chunk}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_key_determinism(net, method):
    model, params, x = net
    kw = FAST.get(method, {})
    a = convlens.explain(model, params, x, method, key=4, **kw)
    b = convlens.explain(model, params, x, method, key=4, **kw)
    c = convlens.explain(model, params, x, method, key=5, **kw)
    varies = "attribution" if "attribution" in a.outputs else "heatmap"
    for name in a.outputs:
        np.testing.assert_array_equal(a[name], b[name])
        if METHODS[method].stochastic and name == varies:
            assert not np.allclose(a[name], c[name]), f"{method}: the key has no effect"


# ---------------------------------------------------------------- binary heads
# A single sigmoid unit is a two-class problem: explaining class 0 explains -z. So
# explaining class 0 of a model must equal explaining class 1 of the same model with its
# last layer negated (z -> -z), for every method, and top1 must explain the predicted class.

@pytest.fixture(scope="module")
def binary():
    import jax.numpy as jnp
    model = binary_net()
    params = with_random_biases(model, 7)
    x = np.random.default_rng(8).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    z = np.asarray(model.apply(params, model.preprocess(jnp.asarray(x)), logits=True)[0])[:, 1]
    # centre the unit's bias so the images fall on both sides of the decision boundary
    params["pred"]["bias"] = params["pred"]["bias"] - float(np.median(z))
    negated = {k: dict(v) for k, v in params.items()}
    negated["pred"] = {k: -v for k, v in params["pred"].items()}
    return model, params, negated, x


@pytest.mark.parametrize("method", sorted(METHODS))
def test_binary_class0_is_class1_of_the_negated_model(binary, method):
    model, params, negated, x = binary
    kw = FAST.get(method, {})
    for c in (0, 1):
        ours = convlens.explain(model, params, x, method, target=c, key=4, **kw)
        twin = convlens.explain(model, negated, x, method, target=1 - c, key=4, **kw)
        np.testing.assert_array_equal(ours.targets, c)
        np.testing.assert_array_equal(twin.targets, 1 - c)
        close(ours.logits[:, ::-1], twin.logits, f"{method} two-class scores")
        for name in ours.outputs:
            close(ours[name], twin[name], f"{method}.{name}: class {c} vs class {1 - c} of the negated model")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_binary_top1_explains_the_predicted_class(binary, method):
    model, params, _, x = binary
    kw = FAST.get(method, {})
    top = convlens.explain(model, params, x, method, key=4, **kw)
    z = top.logits[:, 1]
    assert (z > 0).any() and (z < 0).any()  # both classes predicted among the images
    np.testing.assert_array_equal(top.targets[:, 0], (z > 0).astype(int))
    np.testing.assert_allclose(top.logits[:, 0], -z)
    explicit = convlens.explain(model, params, x, method, target=(z > 0).astype(np.int32), key=4, **kw)
    for name in top.outputs:
        close(top[name], explicit[name], f"{method}.{name}: top1 vs the predicted class")


def test_binary_gradients_of_the_two_classes_are_opposite(binary):
    """The analytic truth behind the view: d(-z)/dx = -dz/dx."""
    model, params, _, x = binary
    g0 = convlens.explain(model, params, x, "gradient", target=0)["attribution"]
    g1 = convlens.explain(model, params, x, "gradient", target=1)["attribution"]
    close(g0, -g1, "gradient of class 0 vs class 1")
    assert np.abs(g1).max() > 0
