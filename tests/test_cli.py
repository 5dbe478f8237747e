"""The CLI: output, and one-line errors with the right exit codes (never a traceback)."""

import subprocess
import sys

import pytest

from convlens.engine import schema
from convlens.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_summary_builtin_random_init(capsys):
    code, out, err = run(["summary", "smallcnn", "--random-init", "0"], capsys)
    assert code == 0, err
    assert "conv2d_3 (Conv2D)" in out and "(None, 15, 15, 128)" in out
    assert "Total params: 3,453,121" in out


def test_summary_headless_none_dims(capsys):
    # VGG16's structure at 1/16 width: the same layers and None dims, 57 thousand weights
    # to initialise instead of 14.7 million.
    code, out, _ = run(["summary", "vgg_tiny", "--random-init", "0", "--no-top"], capsys)
    assert code == 0
    assert "block5_conv3 (Conv2D)" in out and "(None, None, None, 32)" in out
    assert "Total params: 57,828" in out


def test_summary_refuses_unweighted_builtin(capsys):
    code, out, err = run(["summary", "vgg16"], capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: model 'vgg16' needs weights")


@pytest.mark.parametrize("argv, code, text", [
    (["summary", "nosuch"], 1, "neither a built-in model"),
    (["summary", "vgg16", "--input-size", "3"], 2, "is not HxW"),
    (["summary"], 2, "Missing argument"),
    (["explode"], 2, "No such command"),
])
def test_errors_are_one_line(capsys, argv, code, text):
    c, out, err = run(argv, capsys)
    assert c == code
    assert text in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_file_via_subprocess(tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    r = subprocess.run([sys.executable, "-m", "convlens.cli", "summary", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: cannot read") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_models_lists_builtins(capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0 and "vgg16" in out and "smallcnn" in out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image
    from skimage import data
    d = tmp_path_factory.mktemp("imgs")
    for name in ("chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.jpg")
    return d


@pytest.mark.slow
def test_explain_writes_store_matching_api(capsys, image_dir, tmp_path):
    import numpy as np
    import zarr

    import convlens
    from convlens.engine import sources
    out = tmp_path / "run.zarr"
    code, stdout, err = run(["explain", "vgg_tiny", "--random-init", "0", str(image_dir), "-m", "gradcam",
                             "-m", "integrated_gradients", "-o", "steps=8", "--target", "top2",
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert "gradcam @ block5_conv3: targets" in stdout and f"wrote {out}" in stdout
    root = zarr.open_group(str(out), mode="r")
    arrays = schema.describe(root)
    assert arrays["gradcam/heatmap"]["dims"] == ("sample", "target", "y", "x")
    assert arrays["gradcam/heatmap"]["shape"] == (3, 2, 32, 32)
    assert arrays["integrated_gradients/attribution"]["dims"] == ("sample", "target", "y", "x", "channel")
    assert root.attrs["methods"]["integrated_gradients"]["config"]["steps"] == 8
    assert root.attrs["schema_version"] == schema.SCHEMA_VERSION and root.attrs["model"] == "vgg_tiny"
    # The stored maps are the single-call API's maps for the same images.
    model, params = convlens.load_model("vgg_tiny", random_init=0)
    x, ids = sources.load_images([str(image_dir)], model.input_size)
    assert list(root["ids"][:]) == ids
    e = convlens.explain(model, params, x, "gradcam", target="top2")
    np.testing.assert_allclose(root["gradcam/heatmap"][:], e["heatmap"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(root["predictions/topk_index"][:, :2], e.targets)
    # Never overwritten silently.
    code, _, err = run(["explain", "vgg_tiny", "--random-init", "0", str(image_dir), "--out", str(out)], capsys)
    assert code == 1 and "already exists; pass --overwrite" in err


def test_activations_and_weights_commands(capsys, image_dir, tmp_path):
    import zarr
    code, stdout, err = run(["activations", "vgg_tiny", "--random-init", "0", str(image_dir / "chelsea.jpg"),
                             "--layers", "block1_conv1,fc1", "--out", str(tmp_path / "a.zarr")], capsys)
    assert code == 0, err
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert root["activations/block1_conv1"].shape == (1, 32, 32, 4)
    assert root["activations/fc1"].metadata.dimension_names == ("sample", "unit")
    code, stdout, err = run(["weights", "vgg_tiny", "--random-init", "0", "--layer", "block1_conv1",
                             "--layer", "block2_conv1", "--out", str(tmp_path / "w.zarr")], capsys)
    assert code == 0, err
    w = zarr.open_group(str(tmp_path / "w.zarr"), mode="r")
    rgb = w["weights/block1_conv1/filters"][:]
    assert rgb.shape == (4, 3, 3, 3) and rgb.min() == 0.0 and rgb.max() == 1.0
    assert w["weights/block2_conv1/filters"].shape == (8, 4, 3, 3)


@pytest.mark.parametrize("argv, text", [
    (["explain", "vgg_tiny", "--random-init", "0", "nowhere/*.jpg"], "no such file, folder or matching files"),
    (["explain", "vgg_tiny", "--random-init", "0", "IMG", "--layer", "fc1"], "needs a spatial layer"),
    (["explain", "vgg_tiny", "--random-init", "0", "IMG", "--target", "5000"], "out of range"),
    (["explain", "vgg_tiny", "--random-init", "0", "IMG", "-m", "nosuch"], "'nosuch' is not a method; choose from"),
    (["weights", "vgg_tiny", "--random-init", "0", "--layer", "fc1"], "not a convolution"),
])
def test_explain_errors_one_line(capsys, image_dir, argv, text):
    argv = [str(image_dir / "chelsea.jpg") if a == "IMG" else a for a in argv]
    code, _, err = run(argv, capsys)
    assert code in (1, 2) and text in err and err.count("\n") == 1, err


def test_unreadable_image_is_a_clear_error(capsys, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, out, err = run(["explain", "vgg_tiny", "--random-init", "0", str(bad)], capsys)
    assert code == 1 and err.startswith(f"error: 1 of 1 images could not be explained (first: {bad}: not an image")
    assert err.count("\n") == 1 and f"{bad}: failed (not an image file" in out


@pytest.mark.slow
def test_occlusion_command_matches_api(capsys, image_dir, tmp_path):
    import numpy as np

    import convlens
    from convlens.engine import sources, store
    out = tmp_path / "occ.zarr"
    code, stdout, err = run(["occlusion", "vgg_tiny", "--random-init", "0", str(image_dir / "chelsea.jpg"),
                             "--window", "8x6", "--stride", "4", "--incremental", "--out", str(out)], capsys)
    assert code == 0, err
    root = store.open_store(out)
    assert root.attrs["methods"]["occlusion"]["config"]["window"] == [8, 6]
    model, params = convlens.load_model("vgg_tiny", random_init=0)
    x, _ = sources.load_images([str(image_dir / "chelsea.jpg")], model.input_size)
    e = convlens.explain(model, params, x, "occlusion", window=(8, 6), stride=4)
    np.testing.assert_allclose(root["occlusion/sensitivity"][:], e["sensitivity"], rtol=1e-4, atol=1e-6)
    code, _, err = run(["occlusion", "vgg_tiny", "--random-init", "0", str(image_dir / "chelsea.jpg"),
                        "--tau", "2"], capsys)
    assert code == 2 and "tau=2.0 is out of range; give a value > 0 and <= 1" in err and err.count("\n") == 1


def test_render_and_report_commands(capsys, tmp_path):
    code, _, err = run(["weights", "vgg_tiny", "--random-init", "0", "--out", str(tmp_path / "w.zarr")], capsys)
    assert code == 0, err
    code, out, err = run(["render", str(tmp_path / "w.zarr"), "--out", str(tmp_path / "pics")], capsys)
    assert code == 0 and "weights" in out, err
    assert (tmp_path / "pics" / "weights" / "block1_conv1.png").exists()
    code, out, err = run(["report", str(tmp_path / "w.zarr"), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 0 and (tmp_path / "r.html").exists() and "Weights" in (tmp_path / "r.html").read_text()
    code, _, err = run(["render", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and "no such store" in err and err.count("\n") == 1
    code, _, err = run(["render", str(tmp_path / "w.zarr"), "--out", str(tmp_path / "x"), "--cmap", "nosuch"], capsys)
    assert code == 2 and "unknown colour map" in err
    code, _, err = run(["compare", str(tmp_path / "w.zarr")], capsys)
    assert code == 1 and "has not been audited" in err
