"""The shape of the package: importable pieces, one executor, values as cache keys, and a
renderer without JAX. Each test here failed on the code before the redesign (issue 17)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convlens
import convlens.api  # noqa: F401 - the tests call convlens.api.resolve
from convlens.engine import executor
from convlens.engine.executor import Batch, Executor, Explain, Fn
from convlens.models.preprocess import Preprocess
from tests.kernels.nets import depthwise_net, gap_net, with_random_biases

PACKAGE = Path(convlens.__file__).parent


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)


ON_ITS_OWN = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "convlens" or m.startswith("convlens.")]:
        del sys.modules[m]  # nothing of convlens loaded before: the module imports on its own
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("FAILED", failed)
"""


def test_every_kernel_and_metric_module_imports_on_its_own():
    # The registry once imported the method modules for their side effect and they imported
    # it back: `from convlens.kernels.cam import cam_from_weights` failed in a fresh interpreter;
    # the metric modules once imported each other in a cycle.
    kernels = ["cam", "cam_gradfree", "gradients", "occlusion", "sampling", "spec", "common", "ascent",
               "incremental", "baselines", "controls", "registry"]
    metrics = ["spec", "registry", "base", "faithful", "robust", "localise", "complexity", "randomise", "axioms"]
    names = [f"convlens.kernels.{m}" for m in kernels] + [f"convlens.kernels.metrics.{m}" for m in metrics]
    r = subprocess.run([sys.executable, "-c", ON_ITS_OWN, *names], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert r.returncode == 0 and "FAILED []" in r.stdout, r.stdout + r.stderr
    r = _fresh("from convlens.kernels.cam import cam_from_weights, gradient_cam, CAM_OUTPUTS, cam_spec; print('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_registry_is_assembled_from_declarations_without_side_effects():
    from convlens.kernels import registry
    assembled = registry._assemble()
    assert list(assembled) == list(registry.METHODS) and len(assembled) == 30  # 9 of them propagation and Shapley methods
    # Importing a method module twice registers nothing twice (there is no registration).
    import importlib

    import convlens.kernels.cam as cam
    importlib.reload(cam)
    assert len(registry._assemble()) == 30


def _imagenet_store(path: Path):
    from convlens.engine import store
    n, h, w = 2, 24, 24
    root = store.create(path, attrs={"model": "vgg16", "model_class_names": "imagenet-1k", "methods": {
        "gradcam": {"config": {}, "outputs": {"heatmap": ["sample", "target", "y", "x"],
                                              "targets": ["sample", "target"]}, "heatmap": "heatmap"}}})
    store.write(root, "ids", np.asarray(["a.png", "b.png"]))
    store.write(root, "status", np.ones(n, np.uint8))
    store.write(root, "inputs", np.full((n, h, w, 3), 128, np.uint8))
    store.write(root, "predictions/topk_index", np.asarray([[281, 285], [1, 2]], np.int32))
    store.write(root, "predictions/topk_prob", np.asarray([[0.9, 0.1], [0.6, 0.3]], np.float32))
    yy = np.linspace(0, 1, h)[:, None] * np.ones(w)
    store.write(root, "gradcam/heatmap", np.broadcast_to(yy, (n, 1, h, w)).astype(np.float32),
                ("sample", "target", "y", "x"))
    store.write(root, "gradcam/targets", np.asarray([[281], [1]], np.int32), ("sample", "target"))
    store.finish(path)


def test_rendering_an_imagenet_store_never_imports_jax(tmp_path):
    # render -> models.labels -> models/__init__ -> network -> flax used to pull in JAX.
    _imagenet_store(tmp_path / "s.zarr")
    code = f"""
import sys
from convlens.render.render import render_store
from convlens.render.report import report
groups = render_store({str(tmp_path / 's.zarr')!r}, {str(tmp_path / 'pics')!r})
report({str(tmp_path / 's.zarr')!r}, {str(tmp_path / 'r.html')!r})
from convlens.engine import store
from convlens.render.render import class_names_of, prediction_title
root = store.open_store({str(tmp_path / 's.zarr')!r})
print('TITLE', prediction_title(root, 0, class_names_of(root)))
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax'))
print('HEAVY', heavy)
print('FILES', sum(len(v) for v in groups.values()))
"""
    r = _fresh(code)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout
    assert int(r.stdout.split("FILES")[1]) >= 3
    # The ImageNet label of class 281 is in the drawn titles: labels were read without JAX.
    assert "TITLE a.png: tabby" in r.stdout, r.stdout


def test_model_is_immutable_and_compiled_kernels_follow_its_value():
    # `model.preprocess_spec = ...` once changed the model but not the kernel compiled for it.
    model = gap_net()
    params = with_random_biases(model, 0)
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    with pytest.raises(AttributeError, match="immutable"):
        model.preprocess_spec = Preprocess("caffe")
    before = convlens.explain(model, params, x, "gradcam")
    caffe = model.replace(preprocess=Preprocess("caffe"))
    after = convlens.explain(caffe, params, x, "gradcam")
    logits = np.asarray(caffe.apply(params, caffe.preprocess(jnp.asarray(x)), logits=True)[0])
    np.testing.assert_allclose(after.logits, logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(after.logits, before.logits)
    assert model.preprocess_spec == Preprocess("rescale")  # the original is untouched


def test_equal_models_share_one_executable_and_changed_ones_compile_anew():
    a, b = gap_net(), gap_net()  # built separately: equal values
    assert a == b and hash(a) == hash(b) and a is not b
    params = with_random_biases(a, 1)
    x = np.zeros((3, 16, 16, 3), np.float32)
    cfg = convlens.api.resolve(a, "gradcam")
    comps = [Explain(m, "gradcam", cfg, 1) for m in (a, b)]
    assert comps[0] == comps[1]
    executor.clear_cache()
    for c in comps:
        with Executor(params, batch=3) as ex:
            ex.run({"g": c}, Batch({"images": x}, np.arange(3)))
    assert executor.signatures(comps[0]) == 1
    other = Explain(a.replace(preprocess=Preprocess("tf")), "gradcam", cfg, 1)
    assert other != comps[0]
    # Provenance is not part of what a kernel computes: it does not recompile.
    from convlens.models.network import Provenance
    same = Explain(a.replace(provenance=Provenance.of("w.h5", "abc")), "gradcam", cfg, 1)
    assert same == comps[0]


def test_executor_pads_keys_and_dispatches_ahead():
    """The last batch is padded (results unchanged), item keys follow the global index,
    and group n+1 is dispatched before group n is fetched."""
    model = gap_net()
    params = with_random_biases(model, 2)
    x = np.random.default_rng(1).uniform(0, 255, (5, 16, 16, 3)).astype(np.float32)
    cfg = convlens.api.resolve(model, "smoothgrad", {"samples": 3})
    comp = {"s": Explain(model, "smoothgrad", cfg, 1)}
    events = []

    class Spy(Executor):
        def submit(self, comps, batch, params=None):
            events.append(("submit", int(batch.indices[0])))
            return super().submit(comps, batch, params)

        @staticmethod
        def fetch(pendings):
            events.append(("fetch", None))
            return Executor.fetch(pendings)

    with Spy(params, batch=2, key=7) as ex:
        parts = [r for _, rs in ex.stream((b, comp, [b]) for b in ex.split({"images": x})) for r in rs]
    assert [e[0] for e in events] == ["submit", "submit", "fetch", "submit", "fetch", "fetch"]
    got = executor.merge(parts)["s"]["attribution"]
    with Executor(params, batch=5, key=7) as ex:
        whole = ex.run(comp, Batch({"images": x}, np.arange(5)))["s"]["attribution"]
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
    # Item i's noise is fold_in(key, i): item 3 alone, at index 3, gets the same map.
    with Executor(params, batch=1, key=7) as ex:
        one = ex.run(comp, Batch({"images": x[3:4]}, np.asarray([3])))["s"]["attribution"]
    np.testing.assert_allclose(one[0], whole[3], rtol=1e-5, atol=1e-6)


def _logits_function(model, seed, label, n):
    """A model's logits as an executor function, its params, ``n`` inputs and their keys."""
    params = with_random_biases(model, seed)
    comp = Fn(lambda p, i, k: {"y": model.apply(p, model.preprocess(i["x"]), logits=True)[0] * 1.0},
              (label, model.computation), ("x",), label)
    size = model.input_size
    x = np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype(np.float32)
    return model, params, executor.function(comp), x, executor.item_keys(0, np.arange(n))


def test_xla_options_are_measured_once_remembered_and_change_no_number(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path))
    monkeypatch.setenv("CONVLENS_XLA", "auto")
    monkeypatch.setattr(executor, "TUNE_MIN_SECONDS", 0.0)
    fake = {"default": 3.0, "ynn-dot": 1.0, "ynn-off": 2.0}
    # The default is timed once first, then every candidate in turns (default, ynn-dot, ynn-off).
    order = iter(["default"] + ["default", "ynn-dot", "ynn-off"] * executor.TUNE_ROUNDS)
    monkeypatch.setattr(executor, "TUNE_BUDGET", 0.0)
    monkeypatch.setattr(executor, "_time_call", lambda compiled, args, reps=1: fake[next(order)])
    model, params, fn, x, keys = _logits_function(gap_net(), 3, "tuning-test", 4)
    executor.clear_cache()
    t = fn.tuning(params, {"x": x}, keys)
    assert t.source == "measured" and t.choice == "ynn-dot", t
    saved = json.loads((tmp_path / "xla-options.json").read_text())
    assert [v["choice"] for v in saved.values()] == ["ynn-dot"]
    executor.clear_cache()
    assert fn.tuning(params, {"x": x}, keys).source == "remembered"
    # Every setting computes the same numbers (to float rounding).
    lowered = fn.lowered(params, {"x": x}, keys)
    outs = [np.asarray(executor.compile_with(lowered, name)(params, {"x": x}, keys)["y"]) for name in executor.CPU_CANDIDATES]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5)
    executor.clear_cache()


def test_lowerings_are_measured_with_the_options_remembered_overridable_and_agree(monkeypatch, tmp_path):
    """Convolutions have three lowerings (`layers.LOWERINGS`): measured first with
    XLA's default options, then the options with the faster lowering; remembered; fixed by
    CONVLENS_LOWERING; identical numbers to float32 rounding."""
    from convlens.models import layers
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path))
    monkeypatch.setenv("CONVLENS_XLA", "auto")
    monkeypatch.setattr(executor, "TUNE_MIN_SECONDS", 0.0)
    monkeypatch.setattr(executor, "TUNE_BUDGET", 0.0)
    fake = {"default/shifted": 3.0, "default/native": 2.0, "ynn-dot/native": 2.5, "ynn-off/native": 1.0}
    timed = []

    def fake_time(compiled, args, reps=1):
        name = next(n for n, f in jitted.items() if f is compiled)
        timed.append(name)
        return fake[name]
    jitted = {}
    real = executor.Function.jitted

    def spy(self, name="default", lowering=None):
        fn = real(self, name, lowering)
        jitted[f"{name}/{lowering}"] = fn
        return fn
    monkeypatch.setattr(executor.Function, "jitted", spy)
    monkeypatch.setattr(executor, "_time_call", fake_time)
    model, params, fn, x, keys = _logits_function(depthwise_net(), 5, "lowering-test", 2)
    executor.clear_cache()
    t = fn.tuning(params, {"x": x}, keys)
    assert (t.source, t.choice, t.lowering) == ("measured", "ynn-off", "native"), t
    # Stage one races the lowerings at XLA's default options, stage two the options at the winner.
    assert set(timed) == set(fake), timed
    saved = json.loads((tmp_path / "xla-options.json").read_text())
    assert [(v["choice"], v["lowering"]) for v in saved.values()] == [("ynn-off", "native")]
    executor.clear_cache()
    t = fn.tuning(params, {"x": x}, keys)
    assert (t.source, t.choice, t.lowering) == ("remembered", "ynn-off", "native")
    executor.clear_cache()
    monkeypatch.setenv("CONVLENS_LOWERING", "shifted")
    t = fn.tuning(params, {"x": x}, keys)
    assert (t.source, t.choice, t.lowering) == ("remembered", "ynn-off", "shifted")
    monkeypatch.setenv("CONVLENS_LOWERING", "winograd")
    executor.clear_cache()
    with pytest.raises(convlens.ConvlensError, match="CONVLENS_LOWERING='winograd': choose auto or shifted, im2col, native"):
        fn.tuning(params, {"x": x}, keys)
    monkeypatch.setenv("CONVLENS_LOWERING", "auto")
    executor.clear_cache()
    # The two lowerings trace different programs and compute the same numbers, also for gradients.
    outs, grads = [], []
    for name in layers.LOWERINGS:
        with layers.lowering(name):
            y, acts = model.apply(params, model.preprocess(jnp.asarray(x)), layers="all", logits=True)
            g = jax.grad(lambda z: model.apply(params, z, logits=True)[0][:, 1].sum())(model.preprocess(jnp.asarray(x)))
        outs.append((np.asarray(y), {k: np.asarray(v) for k, v in acts.items()}))
        grads.append(np.asarray(g))
    texts = {name: fn.jitted("default", name).lower(params, {"x": x}, keys).as_text() for name in layers.LOWERINGS}
    assert texts["shifted"] != texts["native"] and "feature_group_count = 4" in texts["native"]
    # im2col changes only the first convolution's gradient: a forward pass traces as shifted
    # (so it was not raced above), a gradient does not.
    assert texts["im2col"] == texts["shifted"]
    def gradient_text(name):
        with layers.lowering(name):
            return jax.jit(jax.grad(lambda z: model.apply(params, z, logits=True)[0].sum())).lower(
                model.preprocess(jnp.asarray(x))).as_text()
    assert gradient_text("im2col") != gradient_text("shifted")
    for i in range(1, len(outs)):
        for k in outs[0][1]:
            np.testing.assert_allclose(outs[i][1][k], outs[-1][1][k], rtol=1e-5, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(outs[i][0], outs[-1][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads[i], grads[-1], rtol=1e-4, atol=1e-6)
    executor.clear_cache()


def test_no_xla_flags_are_set_at_import():
    r = _fresh("import os; os.environ.pop('XLA_FLAGS', None); import convlens, convlens.api; "
               "print(repr(os.environ.get('XLA_FLAGS')))")
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stdout + r.stderr


def executor_offences(source: str, rel: str) -> list[str]:
    """Where ``source`` (the module at ``rel`` in the package) compiles, dispatches or
    fetches by itself: ``jax.jit`` in any form (a call, ``@jax.jit``, ``partial(jax.jit,
    ...)``, ``from jax import jit``), a jitted function's ``.lower(args)``, and, outside
    the engine, ``device_get`` / ``device_put`` / ``block_until_ready``."""
    out = []
    in_engine = rel.startswith("engine/")
    for node in ast.walk(ast.parse(source)):
        line = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jax":
            out += [f"{line} from jax import {a.name}" for a in node.names
                    if a.name == "jit" or (not in_engine and a.name in ("device_get", "device_put"))]
        elif isinstance(node, ast.Attribute):
            if node.attr == "jit" and isinstance(node.value, ast.Name) and node.value.id == "jax":
                out.append(f"{line} jax.jit")
            elif not in_engine and node.attr in ("device_get", "device_put", "block_until_ready"):
                out.append(f"{line} {node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "lower" \
                and (node.args or node.keywords):  # str.lower() takes none
            out.append(f"{line} .lower(args)")
    return out


def test_only_the_executor_compiles():
    """No driver compiles, dispatches or fetches by itself: every loop goes through the
    executor (the demo's training included: an epoch is one of its `Loop` s)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel != "engine/executor.py":
            offenders += executor_offences(path.read_text(), rel)
    assert offenders == [], offenders


@pytest.mark.parametrize("code", [
    "f = jax.jit(g)", "@jax.jit\ndef f(x):\n    return x", "f = functools.partial(jax.jit, static_argnums=1)(g)",
    "from jax import jit", "y = jax.device_get(x)", "f.lower(x)", "jax.block_until_ready(y)"])
def test_the_compile_check_catches_every_spelling(code):
    assert executor_offences(code, "demo.py"), code
    assert executor_offences("s.lower()\nx = np.asarray(y)", "demo.py") == []


def test_layer_kinds_replace_class_name_lists_in_kernels():
    offenders = []
    for path in (PACKAGE / "kernels").rglob("*.py"):
        text = path.read_text()
        for cls in ("\"Conv2D\"", "\"MaxPooling2D\"", "\"Dropout\"", "\"GlobalAveragePooling2D\"", "\"Dense\""):
            if cls in text:
                offenders.append(f"{path.name}: {cls}")
    # CAM is defined by GlobalAveragePooling2D itself (not any global pooling): the one
    # class name a kernel may say.
    assert offenders in ([], ["cam.py: \"GlobalAveragePooling2D\""]), offenders


def test_methods_sharing_a_pass_run_it_once_with_the_same_numbers():
    """Five CAM variants on one layer (and gradient with gradient x input) dispatched
    together are one computation whose program holds one forward and one backward pass
    (as many convolutions as one variant alone), and each method's outputs equal its
    own run's."""
    import jax
    model = gap_net()
    params = with_random_biases(model, 4)
    x = np.random.default_rng(5).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    t = np.asarray([[0, 2], [1, 3], [5, 0]], np.int32)
    cams = ["gradcam", "gradcampp", "hirescam", "layercam", "xgradcam"]
    comps = {m: Explain(model, m, convlens.api.resolve(model, m, {}), None) for m in cams}
    comps["gradient"] = Explain(model, "gradient", convlens.api.resolve(model, "gradient", {}), None)
    comps["gradient_x_input"] = Explain(model, "gradient_x_input",
                                        convlens.api.resolve(model, "gradient_x_input", {}), None)
    comps["cam"] = Explain(model, "cam", convlens.api.resolve(model, "cam", {}), None)
    plan = Executor.plan(comps)
    assert sorted(len(names) for names, _ in plan) == [1, 2, 5]
    batch = Batch({"images": x, "targets": t}, np.arange(3))
    with Executor(params, batch=3, tune=False) as ex:
        together = ex.run(comps, batch)
        for m, c in comps.items():
            alone = ex.run({m: c}, batch)[m]
            for k in alone:
                np.testing.assert_allclose(together[m][k], alone[k], rtol=1e-6, atol=1e-7)
    shared = next(c for names, c in plan if len(names) == 5)
    inputs = {"images": jnp.asarray(x), "targets": jnp.asarray(t)}

    def convs(fn):
        return str(jax.make_jaxpr(fn)(params, inputs, jnp.zeros((3, 2), jnp.uint32))).count("conv_general_dilated")
    assert convs(shared) == convs(comps["gradcam"]) > 0


def test_compiles_near_the_memory_region_cap_drop_the_compiled_programs_first(monkeypatch):
    """Past Linux's cap on a process's memory regions (vm.max_map_count) the next XLA
    compile segfaults; the executor drops its compiled programs before a compile that
    starts near the cap, and not otherwise, and the numbers are the same after."""
    model = gap_net()
    params = with_random_biases(model, 2)
    x = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    counts = executor._map_count()
    assert counts is not None and 0 < counts[0] < counts[1]  # Linux: the guard has numbers to go by
    executor.clear_cache()
    before = convlens.explain(model, params, x, "gradcam")
    assert executor.cache_size() >= 1
    n = executor.cache_size()
    convlens.explain(model, params, x, "gradcam")  # cached: no compile, nothing dropped
    assert executor.cache_size() == n
    monkeypatch.setattr(executor, "_map_count", lambda: (60000, 65530))
    after = convlens.explain(model, params, x, "gradient")  # a new compile near the cap
    assert executor.cache_size() == 1  # everything before it was dropped
    monkeypatch.undo()
    again = convlens.explain(model, params, x, "gradcam")  # recompiled, the same numbers
    np.testing.assert_array_equal(again.heatmap, before.heatmap)
    assert np.isfinite(after.heatmap).all()


# ---------------------------------------------------------------- the executor owns every loop (issue 28, 1)

EXECUTOR_INTERNALS = ("item_keys", "function", "pad_rows", "Pending", "_fold_each", "Function")


def test_only_the_executor_keys_pads_and_dispatches():
    """Outside the executor nobody makes item keys, pads, dispatches (``submit``/``fetch``)
    or compiles through ``function``: drivers hand computations and batches to an
    `Executor` (``run``, ``stream``, ``map``, ``call``). Batch rounding is `round_batch`."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "engine/executor.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module == "convlens.engine.executor":
                offenders += [f"{where} imports {a.name}" for a in node.names if a.name in EXECUTOR_INTERNALS]
            if isinstance(node, ast.Attribute) and node.attr in ("submit", "fetch", "dispatch", "function") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("ex", "executor", "Executor", "self"):
                offenders.append(f"{where} .{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr in ("local_devices", "local_device_count"):
                offenders.append(f"{where} counts devices (use round_batch)")
    assert offenders == [], offenders


def test_one_executor_serves_batches_of_several_sizes_and_salts():
    """An atlas's layers go through one executor: each batch names its compiled size and
    its key salt, and gets the keys ``fold_in(fold_in(key, salt), i)``."""
    model = gap_net()
    params = with_random_biases(model, 5)
    comp = {"k": Fn(lambda p, i, k: {"bits": jax_key_data(k)}, ("key-bits",), ("x",), "key-bits")}
    with Executor(params, batch=4, key=3) as ex:
        a = ex.run(comp, Batch({"x": np.zeros((2, 1))}, np.asarray([5, 6]), salt=1, size=2))["k"]["bits"]
        b = ex.run(comp, Batch({"x": np.zeros((3, 1))}, np.asarray([5, 6, 7]), salt=2))["k"]["bits"]
    want = np.asarray(jax_key_data(executor.item_keys(3, [5, 6], salt=1)))
    np.testing.assert_array_equal(a, want)
    assert not np.array_equal(b[:2], want)  # another salt, other keys
    assert executor.signatures(comp["k"]) == 2  # sizes 2 and 4, one executable each


def jax_key_data(k):
    import jax
    return jax.random.key_data(k)


def test_a_loop_is_dispatched_step_by_step_with_the_numbers_of_one_program():
    """`Loop`: explicit state through start/step/finish, dispatched by the executor;
    calling it whole (lax.fori_loop) gives the same numbers."""
    import jax
    loop = executor.Loop(("count-test",), ("x",), start=lambda p, i, k: i["x"] * 0,
                         step=lambda p, i, k, s, n: s + i["x"] * (n + 1), finish=lambda p, i, k, s: {"y": s},
                         steps=4, label="count")
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    with Executor(None, batch=3) as ex:
        got = ex.run({"l": loop}, Batch({"x": x}, np.arange(3)))["l"]["y"]
    np.testing.assert_array_equal(got, x * 10)
    whole = jax.jit(loop)(None, {"x": x}, executor.item_keys(0, np.arange(3)))["y"]
    np.testing.assert_array_equal(np.asarray(whole), got)


# ---------------------------------------------------------------- a thin CLI over configs (issue 28, 5)

def _imports(rel: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse((PACKAGE / rel).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_engine_never_imports_the_api_facade():
    offenders = [p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "engine").rglob("*.py")
                 if "convlens.api" in _imports(p.relative_to(PACKAGE).as_posix())]
    offenders += [rel for rel in ("live.py", "training.py", "keras.py", "demo.py") if "convlens.api" in _imports(rel)]
    assert offenders == [], offenders


def test_the_cli_is_thin():
    """The command line builds configs and calls one driver each: it stays short, makes no
    method choice of its own (`choose_method` does) and computes nothing."""
    text = (PACKAGE / "cli.py").read_text()
    assert len(text.splitlines()) <= 480, len(text.splitlines())
    for word in ("head_kind", "default_layer", "jax", "numpy", "Executor", "incremental"):
        assert word not in _imports("cli.py") and f"import {word}" not in text, word
    assert "incremental" not in text  # occlusion's tau rule lives in OcclusionConfig


def test_drivers_take_config_objects():
    """Drivers take a few arguments and config objects, not a dozen unpacked options."""
    import inspect

    from convlens.engine.audit import audit
    from convlens.engine.runner import Run
    from convlens.live import live
    from convlens.render.render import render_store
    from convlens.render.report import report
    for fn in (Run.__init__, live, render_store, report, audit):
        named = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        assert len(named) <= 9, (fn.__qualname__, [p.name for p in named])


def test_the_audit_names_no_method():
    """What to run instead of a degenerate method is the method's own declaration
    (`MethodSpec.when_empty`), not a name in the audit."""
    from convlens.kernels.registry import METHODS
    tree = ast.parse((PACKAGE / "engine" / "audit.py").read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}  # docstrings may mention methods
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and id(n) not in docs}
    named = [m for m in METHODS if any(m in s.replace("-m ", " ").split() for s in strings)]
    assert named == [], named


def test_flags_are_a_table_of_rules():
    from convlens.engine.audit import FLAG_RULES
    kinds = [r.kind for r in FLAG_RULES]
    assert kinds == ["empty_maps", "degenerate", "class_location", "class_border", "off_object", "sanity"]
    assert all(r.when and callable(r.check) for r in FLAG_RULES)


# ---------------------------------------------------------------- defects found on the way (issue 28, 8)

def test_config_list_defaults_are_not_shared():
    import dataclasses

    from convlens.config import Config, option

    @dataclasses.dataclass
    class Listy(Config):
        xs: list = option([1])
    a, b = Listy(), Listy()
    a.xs.append(2)
    assert b.xs == [1]


def test_report_does_not_hide_a_broken_ranking(tmp_path):
    """The report once swallowed every exception of the ranking table; a broken audit
    record is now an error, not a report without its ranking."""
    from convlens.engine import store
    from convlens.render.report import report
    _imagenet_store(tmp_path / "s.zarr")
    root = store.open_store(tmp_path / "s.zarr", "r+")
    root.attrs["audit"] = {"methods": {"gradcam": {"flags": [], "summary": {
        "items": 2, "mean_center_share": 0.5, "mean_entropy": 0.5}}}, "quality": {"scores": {"gradcam": {}}}}
    store.finish(tmp_path / "s.zarr")
    with pytest.raises(KeyError):
        report(tmp_path / "s.zarr", tmp_path / "r.html")


def test_dead_code_is_gone():
    from convlens.engine import store
    from convlens.kernels import common, occlusion, registry
    for mod, name in ((store, "add_method"), (common, "is_conv"), (occlusion, "grid_shape"),
                      (registry, "all_outputs"), (registry, "heatmap_methods")):
        assert not hasattr(mod, name), f"{mod.__name__}.{name}"
