"""The CLI: output, and one-line errors with the right exit codes (never a traceback)."""

import subprocess
import sys

import pytest

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
    code, out, _ = run(["summary", "vgg16", "--random-init", "0", "--no-top"], capsys)
    assert code == 0
    assert "block5_conv3 (Conv2D)" in out and "(None, None, None, 512)" in out
    assert "Total params: 14,714,688" in out


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
