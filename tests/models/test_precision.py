"""The precision policy: full float32 by default (recorded in stores), bfloat16 on request."""

import numpy as np

import convlens
from convlens.engine import executor, runner, store
from convlens.engine.executor import Explain
from convlens.engine.sources import ArraySource
from convlens.kernels.metrics.base import spearman
from tests.conftest import photo_batch
from tests.kernels.nets import gap_net, with_random_biases


def test_fast_precision_computes_in_bfloat16_with_float32_results_and_close_maps():
    model = gap_net()
    params = with_random_biases(model, 0)
    x = photo_batch((16, 16))
    full = convlens.explain(model, params, x, "gradcam")
    fast = convlens.explain(model.replace(precision="fast"), params, x, "gradcam")
    assert full.heatmap.dtype == fast.heatmap.dtype == np.float32
    assert not np.array_equal(full.logits, fast.logits)  # bfloat16 did change the arithmetic
    rel = np.abs(fast.logits - full.logits).max() / np.abs(full.logits).max()
    assert rel < 0.05, rel  # bfloat16 keeps ~3 significant digits
    rho = np.asarray(spearman(full.heatmap[:, 0], fast.heatmap[:, 0]))
    assert rho.min() > 0.9, rho
    # Each precision compiles its own kernel (the model's value differs).
    cfg = convlens.api.resolve(model, "gradcam")
    assert Explain(model, "gradcam", cfg, 1) != Explain(model.replace(precision="fast"), "gradcam", cfg, 1)
    assert executor.signatures(Explain(model.replace(precision="fast"), "gradcam", cfg, 1)) >= 1


def test_stores_record_the_precision(tmp_path):
    model = gap_net()
    params = with_random_biases(model, 0)
    src = ArraySource(photo_batch((16, 16)))
    runner.run(model, params, src, ["gradcam"], tmp_path / "full.zarr", progress=False)
    runner.run(model.replace(precision="fast"), params, src, ["gradcam"], tmp_path / "fast.zarr", progress=False)
    assert store.open_store(tmp_path / "full.zarr").attrs["precision"].startswith("full: float32")
    assert store.open_store(tmp_path / "fast.zarr").attrs["precision"].startswith("fast: bfloat16")
