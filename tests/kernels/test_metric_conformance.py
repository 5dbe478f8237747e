"""Conformance of every registered quality metric, generated from the registry (as
`test_conformance.py` is for methods): the declaration matches the function, the score is
one finite number per item (or NaN where the metric says so), the same at batch sizes 1, 3
and 8 (each item draws from its own key), the same for the same key, and the compiled
program equals eager execution."""

import dataclasses
import inspect

import jax
import numpy as np
import pytest

import convlens
from convlens.engine.quality import Plan, evaluate, layers_with_weights
from convlens.errors import OptionError
from convlens.kernels.metrics.registry import METRICS, NEEDS
from convlens.kernels.registry import METHODS
from tests.kernels.nets import with_random_biases
from tests.kernels.test_metric_catalogue import grey_net

N, H, W = 8, 16, 16
# Small settings: the same code paths, a fraction of the passes.
CHEAP = {"steps": 4, "nr_runs": 3, "subset_size": 8, "nr_samples": 2, "percentages": (10, 50),
         "regions_evaluation": 4, "patch_size": 4, "stages": 2, "smooth_samples": 2, "nr_steps": 2,
         "features_in_step": 64, "fractions": (0.1, 0.5), "n_perturb_samples": 1, "bins": 10}
# Where a NaN score is the metric's answer, and why.
NAN_OK = {"relative_input_stability": "every noisy copy changed the prediction",
          "relative_output_stability": "every noisy copy changed the prediction",
          "faithfulness_correlation": "a constant drop", "faithfulness_estimate": "a constant drop",
          "monotonicity_correlation": "a constant variance", "sensitivity_n": "constant drops",
          "mprt": "a constant map", "smooth_mprt": "a constant map", "efficient_mprt": "a constant map"}


def cheap(name):
    spec = METRICS[name]
    opts = {k: v for k, v in CHEAP.items() if k in spec.option_names}
    if name == "mprt":
        opts.pop("smooth_samples", None)
    return spec.resolve(opts)


@pytest.fixture(scope="module")
def data():
    model = grey_net()
    params = with_random_biases(model, 3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (N, H, W, 1)).astype(np.float32)
    e = convlens.explain(model, params, x, "gradient")
    masks = np.zeros((N, H, W), bool)
    masks[:, 4:10, 3:9] = True
    seg = np.repeat((np.arange(H * W).reshape(H, W) // 64)[None], N, 0).astype(np.int32)
    arrays = {"images": x, "targets": e.targets[:, 0], "maps": e.heatmap[:, 0], "masks": masks, "segments": seg}
    spec = METHODS["gradient"]
    plan = Plan(model, list(METRICS), {n: cheap(n) for n in METRICS}, spec, spec.resolve(model, {}),
                maps_given=True, n_segments=4, num_classes=5, layers=layers_with_weights(model, params))
    return model, params, arrays, plan


@pytest.fixture(scope="module")
def by_batch(data):
    """Every metric in one program per batch size."""
    model, params, arrays, plan = data
    return {b: evaluate(model, params, plan, arrays, key=0, batch=b) for b in (1, 3, 8)}


@pytest.mark.parametrize("name", list(METRICS))
def test_declaration_matches_the_function(name):
    spec = METRICS[name]
    params = inspect.signature(spec.fn).parameters
    keyword = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    fields = [f.name for f in dataclasses.fields(spec.config) if f.name != "softmax"]
    # Every keyword parameter is an option, a bound argument, the keys or a replay array.
    assert set(keyword) == set(fields) | set(spec.fixed) | ({"keys"} if spec.stochastic else set()) | set(spec.replay)
    assert set(spec.needs) <= set(NEEDS) and spec.doc
    cfg = spec.config()
    differ = {f.name for f in dataclasses.fields(spec.config) if f.name in params
              and getattr(cfg, f.name) != params[f.name].default}
    assert differ == set(AFFORDABLE.get(name, ())), (name, differ)


# Options whose registered default is not the function's (Quantus's): affordable on a CPU.
AFFORDABLE = {"avg_sensitivity": ("nr_samples",), "max_sensitivity": ("nr_samples",),
              "local_lipschitz_estimate": ("nr_samples",), "relative_input_stability": ("nr_samples",),
              "relative_output_stability": ("nr_samples",), "continuity": ("nr_steps",),
              "road_morf": ("percentages",), "road_lerf": ("percentages",), "road_gain": ("percentages",),
              "infidelity": ("n_perturb_samples",), "non_sensitivity": ("features_in_step",),
              "smooth_mprt": ("smooth_samples",)}


@pytest.mark.parametrize("name", [n for n in METRICS if any(
    f.type in ("int", int) and f.name not in ("seed",) for f in dataclasses.fields(METRICS[n].config))])
def test_options_are_checked_against_their_bounds(name):
    spec = METRICS[name]
    field = next(f for f in dataclasses.fields(spec.config) if f.type in ("int", int))
    with pytest.raises(OptionError, match=f"{field.name}=-3"):
        spec.resolve({field.name: "-3"})
    with pytest.raises(OptionError, match="has no option"):
        spec.resolve({"no_such_option": 1})


@pytest.mark.parametrize("name", list(METRICS))
def test_scores_are_finite_and_the_same_at_every_batch_size(name, by_batch):
    ref = by_batch[8][name]
    assert ref.shape == (N,) and ref.dtype == np.float32
    assert not np.isinf(ref).any(), ref
    if name not in NAN_OK:
        assert np.isfinite(ref).all(), ref
    else:
        assert np.isfinite(ref).any(), f"{name}: every score NaN"
    for b in (1, 3):
        for key in (name, f"{name}_curve"):
            if key not in by_batch[8]:
                continue
            got, want = by_batch[b][key], by_batch[8][key]
            scale = max(1.0, float(np.nanmax(np.abs(want)))) if np.isfinite(want).any() else 1.0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, equal_nan=True,
                                       err_msg=f"{key} at batch {b}")


# Metrics that draw with their default options (the others take keys for options such as
# baseline="uniform" or order="random").
DRAWING = ("faithfulness_correlation", "monotonicity_correlation", "sensitivity_n", "road_morf", "road_lerf",
           "road_gain", "avg_sensitivity", "max_sensitivity", "local_lipschitz_estimate", "relative_input_stability",
           "relative_output_stability", "random_logit", "smooth_mprt")


def test_the_key_fixes_the_draws(data, by_batch):
    """The same key, the same scores (the program is the cached one); another key, other
    draws for every metric that draws."""
    model, params, arrays, plan = data
    again = evaluate(model, params, plan, arrays, key=0, batch=8)
    other = evaluate(model, params, plan, arrays, key=1, batch=8)
    for name in METRICS:
        np.testing.assert_array_equal(again[name], by_batch[8][name], err_msg=name)
        moved = not np.allclose(other[name], again[name], equal_nan=True)
        assert moved == (name in DRAWING), name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METRICS))
def test_compiled_equals_eager(name, data):
    model, params, arrays, plan = data
    one = {k: v[:2] for k, v in arrays.items()}
    keys = jax.random.split(jax.random.key(3), 2)
    metric = Plan(model, [name], {name: cheap(name)}, plan.method, plan.method_cfg, maps_given=True, n_segments=4,
                  num_classes=5, layers=plan.layers)
    variables = {"model": params, **({"fresh": model.init(1234)} if metric.weights else {})}
    inputs = {k: one[k] for k in metric.inputs(True, "segments" in metric.needs)}
    compiled = jax.jit(metric)(variables, inputs, keys)
    with jax.disable_jit():
        eager = metric(variables, inputs, keys)
    for k in compiled:
        np.testing.assert_allclose(np.asarray(eager[k]), np.asarray(compiled[k]), rtol=1e-4, atol=1e-5,
                                   equal_nan=True, err_msg=k)


def test_public_api_scores_maps_from_python(data):
    """`convlens.evaluate`: Quantus's metric(model, x, y, a) in one call; map-only metrics
    need no model; a missing need is a one-line error naming it."""
    model, params, arrays, plan = data
    x, y, a = arrays["images"], arrays["targets"], arrays["maps"]
    out = convlens.evaluate("pixel_flipping", model, params, x, y, a, steps=4, batch_size=3)
    np.testing.assert_allclose(out["score"], evaluate(model, params, Plan(
        model, ["pixel_flipping"], {"pixel_flipping": cheap("pixel_flipping")}), arrays, batch=8)["pixel_flipping"],
        rtol=1e-5, atol=1e-6)
    assert out["curve"].shape == (N, 4)
    sp = convlens.evaluate("sparseness", maps=a)
    assert sp["score"].shape == (N,) and np.isfinite(sp["score"]).all()
    # The maps computed here when only the method is named.
    gm = convlens.evaluate("sparseness", model, params, x, y, method="gradient")
    np.testing.assert_allclose(gm["score"], sp["score"], rtol=1e-5)
    for call, words in ((lambda: convlens.evaluate("pointing_game", maps=a), "masks"),
                        (lambda: convlens.evaluate("avg_sensitivity", model, params, x, y, a), "method="),
                        (lambda: convlens.evaluate("deletion", maps=a), "model="),
                        (lambda: convlens.evaluate("deletion", model, params, x, y, a, steps=-3), "steps=-3"),
                        (lambda: convlens.evaluate("sparseness", maps=a, baseline="black"), "no option baseline")):
        with pytest.raises(convlens.ConvlensError, match=words):
            call()
