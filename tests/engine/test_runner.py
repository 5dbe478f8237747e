"""Data-set runs: the store equals the single-call API, bad items fail alone, runs resume."""

import shutil

import numpy as np
import pytest
import zarr
from PIL import Image

import convlens
from convlens.engine import schema
from convlens.engine import runner, sources, store
from convlens.errors import ConvlensError

METHODS = {"gradcam": {}, "integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4}}


@pytest.fixture(scope="module")
def tiny():
    return convlens.load_model("vgg_tiny", random_init=0)


def api_result(model, params, src, method, opts, resize="squash", target="top1", seed=0):
    x = np.stack([sources.fit(src.read(i).image, model.input_size, resize) for i in range(len(src))])
    return x, convlens.explain(model, params, x, method, target=target, key=seed, **opts)


def arrays_of(path):
    root = zarr.open_group(str(path), mode="r")
    return {k: root[k][...] for k in schema.describe(root) if not k.startswith("timing/")}


def assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.kind in "fc":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # NaN == NaN here
        else:
            assert (a[k] == b[k]).all(), k


@pytest.mark.slow
def test_folder_run_matches_api_and_opens_in_xarray(tiny, folder, tmp_path):
    import xarray as xr

    model, params = tiny
    out = tmp_path / "run.zarr"
    s = runner.run(model, params, str(folder), METHODS, out, batch_size=5, chunk=10, target="top2",
                   progress=False, keep_inputs=True)
    assert (s.done, s.failed, s.items) == (48, 0, 48)
    root = store.open_store(out)
    assert schema.validate(root) == []
    src = sources.open_source(str(folder))
    for method, opts in METHODS.items():
        x, e = api_result(model, params, src, method, opts, target="top2")
        for name, value in e.outputs.items():
            np.testing.assert_allclose(root[f"{method}/{name}"][:], value, rtol=2e-5, atol=1e-6,
                                       err_msg=f"{method}/{name}")
        np.testing.assert_array_equal(root[f"{method}/targets"][:], e.targets)
    np.testing.assert_array_equal(root["inputs"][:], x)
    np.testing.assert_array_equal(root["labels"][:], src.labels)
    assert list(root["ids"][:]) == src.ids
    assert root.attrs["run"]["done"] == 48 and root.attrs["class_names"] == ["cats", "dogs"]
    assert set(root.attrs["run"]["method_seconds_per_item"]) == set(METHODS)
    ds = xr.open_zarr(str(out), group="gradcam", consolidated=True)
    assert ds["heatmap"].dims == ("sample", "target", "y", "x") and ds["heatmap"].shape == (48, 2, 32, 32)
    np.testing.assert_allclose(ds["heatmap"].values, root["gradcam/heatmap"][:])
    top = xr.open_zarr(str(out), consolidated=True)
    assert top["status"].dims == ("sample",) and int((top["status"] == schema.DONE).sum()) == 48
    assert root["gradcam/heatmap"].chunks[0] == 10


def test_tfds_run_matches_api(tiny, tfds_dir, tmp_path):
    model, params = tiny
    d, _ = tfds_dir
    out = tmp_path / "tfds.zarr"
    s = runner.run(model, params, "tfds:convlens_toy:train", {"gradcam": {}}, out, data_dir=str(d),
                   batch_size=8, target="label", resize="crop", progress=False)
    assert s.done == 40
    src = sources.open_source("tfds:convlens_toy:train", data_dir=str(d))
    labels = np.asarray([src.read(i).label for i in range(len(src))])
    root = store.open_store(out)
    np.testing.assert_array_equal(root["labels"][:], labels)
    np.testing.assert_array_equal(root["gradcam/targets"][:, 0], labels)  # target=label explains the truth
    x, e = api_result(model, params, src, "gradcam", {}, resize="crop", target=labels)
    np.testing.assert_allclose(root["gradcam/heatmap"][:], e["heatmap"], rtol=2e-5, atol=1e-6)


def test_bad_files_fail_alone(tiny, folder, tmp_path):
    model, params = tiny
    salted = tmp_path / "salted"
    shutil.copytree(folder / "cats", salted / "cats")
    bad = salted / "cats"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.png").write_text("this is not an image")
    good_png = (folder / "cats" / "img001.png").read_bytes()
    (bad / "truncated.png").write_bytes(good_png[: len(good_png) // 3])
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(bad / "tiny.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40), dtype=np.uint8)).save(bad / "grey.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 60, 4), dtype=np.uint8)).save(bad / "rgba.png")
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 60, 3), dtype=np.uint8)).convert("CMYK").save(
        bad / "cmyk.jpg")
    Image.fromarray((np.random.default_rng(3).random((40, 40)) * 65535).astype(np.uint16)).save(bad / "deep.tif")
    out = tmp_path / "salted.zarr"
    s = runner.run(model, params, str(salted), {"gradcam": {}}, out, batch_size=4, progress=False)
    root = store.open_store(out)
    ids = [p.rsplit("/", 1)[-1] for p in root["ids"][:]]
    status = dict(zip(ids, root["status"][:]))
    errors = dict(zip(ids, root["errors"][:]))
    failed = {"zero.jpg": "empty file", "text.png": "not an image", "truncated.png": "cannot decode",
              "tiny.png": "too small"}
    for name, why in failed.items():
        assert status[name] == schema.FAILED and why in errors[name], (name, errors[name])
    for name in ids:
        if name not in failed:
            assert status[name] == schema.DONE and errors[name] == "", name
    assert s.failed == 4 and s.done == len(ids) - 4
    i = ids.index("zero.jpg")
    assert np.isnan(root["gradcam/heatmap"][i]).all() and (root["predictions/topk_index"][i] == -1).all()
    assert root.attrs["run"]["failed"] == 4


def test_store_is_never_replaced_silently_and_resume_checks_the_run(tiny, folder, tmp_path):
    model, params = tiny
    out = tmp_path / "r.zarr"
    runner.run(model, params, str(folder), ["gradcam"], out, progress=False)
    with pytest.raises(ConvlensError, match="already exists; pass --overwrite"):
        runner.run(model, params, str(folder), ["gradcam"], out, progress=False)
    with pytest.raises(ConvlensError, match="different run"):
        runner.run(model, params, str(folder), ["hirescam"], out, resume=True, progress=False)
    # Resuming a finished run computes nothing and changes nothing.
    before = arrays_of(out)
    s = runner.run(model, params, str(folder), ["gradcam"], out, resume=True, progress=False)
    assert s.computed_chunks == 0 and s.skipped_chunks == 3
    assert_same_arrays(before, arrays_of(out))


@pytest.mark.slow
def test_resume_recomputes_only_unfinished_chunks(tiny, folder, tmp_path):
    model, params = tiny
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    runner.run(model, params, str(folder), METHODS, full, batch_size=4, chunk=8, progress=False)
    runner.run(model, params, str(folder), METHODS, part, batch_size=4, chunk=8, progress=False)
    root = zarr.open_group(str(part), mode="r+")
    # Simulate a crash: chunks 1 and 4 never finished (status pending, outputs garbage).
    for c in (1, 4):
        root["status"][c * 8:(c + 1) * 8] = schema.PENDING
        root["gradcam/heatmap"][c * 8:(c + 1) * 8] = 123.0
    s = runner.run(model, params, str(folder), METHODS, part, batch_size=4, chunk=8, resume=True, progress=False)
    assert (s.computed_chunks, s.skipped_chunks) == (2, 4)
    assert_same_arrays(arrays_of(full), arrays_of(part))


def test_label_target_needs_labels(tiny, tmp_path):
    model, params = tiny
    np.save(tmp_path / "x.npy", np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(ConvlensError, match="needs labelled data"):
        runner.run(model, params, str(tmp_path / "x.npy"), ["gradcam"], tmp_path / "o.zarr", target="label",
                   progress=False)


def test_masks_and_sigmoid_model_predictions(tmp_path):
    """A one-unit sigmoid model stores P(class 0), P(class 1); masks are stored resized."""
    model, params = convlens.load_model("smallcnn", random_init=1)
    imgs = np.random.default_rng(0).integers(0, 255, (3, 60, 60, 3), dtype=np.uint8)
    masks = np.zeros((3, 60, 60), bool)
    masks[:, :, :30] = True  # left half
    src = sources.ArraySource(imgs, masks=masks)
    out = tmp_path / "m.zarr"
    runner.run(model, params, src, ["gradcam"], out, progress=False)
    root = store.open_store(out)
    m = root["masks"][:]
    assert m.shape == (3, 150, 150) and m[:, :, :70].all() and not m[:, :, 80:].any()
    p = root["predictions/topk_prob"][:]
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
