"""Feature visualisation: batch invariance, the objective rises, and the classic recipe
against a hand-written reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convlens
from convlens.errors import ConvlensError
from convlens.engine.executor import item_keys
from convlens.kernels import ascent as A


@pytest.fixture(scope="module")
def vgg16():
    return convlens.load_model("vgg16", random_init=0)


@pytest.fixture(scope="module")
def tiny():
    return convlens.load_model("vgg_tiny", random_init=0)


def run(model, params, obj, units, cfg, seed=0, layer_index=0):
    units = jnp.asarray(units, jnp.int32)
    return jax.device_get(jax.jit(lambda p, u, k: A.visualize(model, p, obj, u, cfg, k))(
        params, units, item_keys(seed, units, salt=layer_index)))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["classic", "lucid"])
def test_batched_equals_one_filter_at_a_time(tiny, recipe):
    model, params = tiny
    cfg = A.AscentConfig(recipe=recipe, size=24, steps=12 if recipe == "lucid" else 0)
    obj = A.channel("block2_conv1")
    batch = run(model, params, obj, np.arange(8), cfg)
    for i in (0, 3, 7):
        one = run(model, params, obj, [i], cfg)
        if recipe == "classic":
            np.testing.assert_array_equal(one["patterns"][0], batch["patterns"][i])
        else:  # Adam amplifies last-bit differences of batched convolutions a little
            diff = np.abs(one["patterns"][0].astype(int) - batch["patterns"][i].astype(int))
            assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
        np.testing.assert_allclose(one["scores"][0], batch["scores"][i], rtol=1e-5 if recipe == "classic" else 5e-3,
                                   atol=1e-5)


@pytest.mark.slow
def test_objective_rises_for_every_filter_of_a_layer(vgg16):
    """Every filter that responds at all to the starting noise ends >= 5x higher; a filter
    that does not respond (dead ReLU with random weights) has no gradient to follow."""
    model, params = vgg16
    cfg = A.AscentConfig(size=32)
    out = run(model, params, A.channel("block2_conv2"), np.arange(128), cfg)
    s0, s1 = out["start_scores"], out["scores"]
    alive = s0 > 1e-6
    assert alive.mean() > 0.9
    assert (s1[alive] >= 5 * s0[alive]).all(), (s1 / np.maximum(s0, 1e-12))[alive].min()
    assert (s1[~alive] == 0).all()
    # Dead at the start means no gradient: nothing for any ascent to follow.
    units = np.flatnonzero(~alive)
    if units.size:
        px = A.classic_init(jax.vmap(lambda k: jax.random.split(k, 2)[0])(item_keys(0, units, salt=0)), 32)
        g = jax.grad(lambda p: A.evaluate(model, params, A.channel("block2_conv2"), p, jnp.asarray(units)).sum())(px)
        assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.slow
def test_classic_matches_reference_loop(vgg16):
    """The DLwP loop written out for one filter: plain jax.grad, RMS normalisation, step 1."""
    model, params = vgg16
    layer, f, size, steps = "block3_conv1", 17, 40, 40
    out = run(model, params, A.channel(layer), [3, f], A.AscentConfig(size=size), seed=5, layer_index=4)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 4), f)
    init_key = jax.random.split(key, 2)[0]
    px = 128.0 + jax.random.uniform(init_key, (1, size, size, 3), minval=-10.0, maxval=10.0)

    @jax.jit
    def grad(px):
        return jax.grad(lambda x: jnp.mean(model.features(params, model.preprocess(x), layer)[..., f]))(px)
    for _ in range(steps):
        g = grad(px)
        px = px + g / (jnp.sqrt(jnp.mean(g * g)) + 1e-5)
    x = np.asarray(px[0], np.float64)
    x = (x - x.mean()) / (x.std() + 1e-5) * 0.1 + 0.5
    ref = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    got = out["patterns"][1].astype(int)
    assert np.abs(got - ref.astype(int)).max() <= 1  # float32 vs float64 deprocessing
    assert (got == ref).mean() > 0.99


def test_objectives_compose(tiny):
    model, params = tiny
    px = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)), jnp.float32)
    u = jnp.asarray([1, 2, 3])
    acts = model.intermediates(params, model.preprocess(px), ["block2_conv1"])["block2_conv1"]
    ch = np.asarray(acts).mean(axis=(1, 2))[np.arange(3), [1, 2, 3]]
    dd = (np.asarray(acts) ** 2).mean(axis=(1, 2, 3))
    nr = np.asarray(acts)[:, 8, 8, :][np.arange(3), [1, 2, 3]]
    obj = A.channel("block2_conv1") - 0.5 * A.deepdream("block2_conv1") + 2 * A.neuron("block2_conv1")
    np.testing.assert_allclose(A.evaluate(model, params, obj, px, u), ch - 0.5 * dd + 2 * nr, rtol=1e-5, atol=1e-6)
    logits = model.apply(params, model.preprocess(px), logits=True)[0]
    np.testing.assert_allclose(A.evaluate(model, params, A.class_logit(), px, u),
                               np.asarray(logits)[np.arange(3), [1, 2, 3]], rtol=1e-5)


@pytest.mark.slow
def test_class_and_lucid_objectives_rise(tiny):
    model, params = tiny
    out = run(model, params, A.class_logit(), [5, 9], A.AscentConfig(size=32, steps=20))
    assert (out["scores"] > out["start_scores"]).all()
    out = run(model, params, A.channel("block3_conv1"), np.arange(6), A.AscentConfig("lucid", size=32, steps=40))
    assert (out["scores"] >= out["start_scores"]).all() and (out["scores"] > out["start_scores"]).mean() > 0.5
    assert out["patterns"].dtype == np.uint8 and out["patterns"].shape == (6, 32, 32, 3)


def test_bad_config():
    with pytest.raises(ConvlensError, match="recipe='deepdream' is not valid; one of classic, lucid"):
        A.AscentConfig(recipe="deepdream")
    with pytest.raises(ConvlensError, match="size=4 is out of range; give a value 8..4096"):
        A.AscentConfig(size=4)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["classic", "lucid"])
def test_host_loop_equals_compiled_loop(tiny, recipe):
    from convlens.engine.atlas import ascend
    model, params = tiny
    cfg = A.AscentConfig(recipe=recipe, size=16, steps=5)
    units = np.arange(4)
    a = ascend(model, params, A.channel("block2_conv1"), units, cfg, seed=0, salt=1, loop="fori")
    b = ascend(model, params, A.channel("block2_conv1"), units, cfg, seed=0, salt=1, loop="host")
    # The executor's keys are the kernel's: fold_in(fold_in(key(0), salt), unit).
    want = jax.device_get(A.visualize(model, params, A.channel("block2_conv1"), jnp.asarray(units), cfg,
                                      item_keys(0, units, salt=1)))
    np.testing.assert_array_equal(a["patterns"], want["patterns"])
    np.testing.assert_array_equal(a["patterns"], b["patterns"])
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6)
