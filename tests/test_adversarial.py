"""Issue 16: convlens never deletes what it does not own, never reports a broken store as
done, and never crashes on what a user hands it.

Every input here is built on the spot (no downloads): a folder of someone's photos, model
files with hostile declarations, fuzzed model files, damaged stores. Each command must end
with a one-line error (exit 2 for a bad option, 1 otherwise) or a per-item failure with
its reason: no traceback, no abort, nothing outside its output path touched, and for the
resource cases a peak memory under 1 GiB.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from convlens.engine import ownership
from convlens.engine import store
from convlens.errors import ConvlensError
from tests.engine.test_runner import arrays_of, assert_same_arrays
from tests.test_cli import run as cli_in_process

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
# Runs the CLI in a fresh process and reports that process's own peak resident memory. VmHWM
# belongs to the address space made by exec; getrusage's ru_maxrss does not: Linux carries the
# forking parent's peak over exec, so a child of a 9 GB pytest process reported 9 GB.
WRAPPER = """
import atexit, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
atexit.register(lambda: print(f"MAXRSS {_hwm()}", file=sys.stderr))
from convlens.cli import main
main(sys.argv[1:])
"""


# Ctrl-C as from a terminal: a shell starts background jobs with SIGINT ignored, and
# Python then keeps ignoring it, so a suite run with ``&`` would test nothing. Set in the
# child itself (a preexec_fn would fork the multithreaded test process).
AS_FROM_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
CLI_FROM_A_TERMINAL = AS_FROM_A_TERMINAL + "import sys; from convlens.cli import main; main(sys.argv[1:])"


class Result:
    def __init__(self, p: subprocess.CompletedProcess):
        self.code = p.returncode
        self.out = p.stdout
        lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("MAXRSS ")]
        rss = [ln for ln in p.stderr.splitlines() if ln.startswith("MAXRSS ")]
        self.err = "\n".join(lines)
        self.rss = int(rss[-1].split()[1]) * 1024 if rss else None


def convlens(*args, cwd=None, env=None, timeout=600) -> Result:
    e = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=e, timeout=timeout)
    return Result(p)


def one_line(err: str, code: int, got: int, text: str = ""):
    """The error contract: the expected exit code, one line starting with ``error:``, no
    traceback, no 'a convlens bug', no C++ abort."""
    assert got == code, f"exit {got}, wanted {code}: {err}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for bad in ("Traceback", "a convlens bug", "terminate called", "Fatal Python error", "Check failed"):
        assert bad not in err, err
    assert text in err, f"{text!r} not in {err!r}"


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict:
    """Every file under ``root`` (but ``skip``) with its size, time and content hash."""
    import hashlib
    out = {}
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


@pytest.fixture
def home(tmp_path):
    """A user's folder: photos with notes, and a data set to explain."""
    from PIL import Image
    photos = tmp_path / "holiday"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (photos / "notes.txt").write_text("do not lose these")
    np.save(tmp_path / "imgs.npy", rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8))
    return tmp_path


TINY = ["vgg_tiny", "--random-init", "0"]


# ---------------------------------------------------------------- data loss (cases 1-3)

@pytest.mark.parametrize("argv", [
    ["run", *TINY, "--data", "imgs.npy", "--out", "holiday", "--overwrite", "--no-progress"],
    ["run", *TINY, "--data", "holiday", "--out", "holiday", "--overwrite", "--no-progress"],
    ["explain", *TINY, "holiday/p0.png", "--out", "holiday", "--overwrite"],
    ["explain", *TINY, "holiday/p0.png", "--out", "holiday/notes.txt", "--overwrite"],
    ["activations", *TINY, "holiday/p0.png", "--out", "holiday", "--overwrite"],
    ["weights", *TINY, "--out", "holiday", "--overwrite"],
    ["atlas", *TINY, "--out", "holiday", "--overwrite", "--layers", "block1_conv1", "--steps", "1"],
    ["filters", *TINY, "--layer", "block1_conv1", "--out", "holiday", "--overwrite", "--steps", "1"],
    ["demo", "--out", "holiday"],
    ["render", "STORE", "--out", "holiday"],
])
def test_overwrite_replaces_only_convlens_stores(home, capsys, monkeypatch, argv):
    monkeypatch.chdir(home)
    if "STORE" in argv:
        cli_in_process(["run", *TINY, "--data", "imgs.npy", "--out", "s.zarr", "--no-progress"], capsys)
        argv = ["s.zarr" if a == "STORE" else a for a in argv]
    before = snapshot(home, skip=(home / "s.zarr",))
    code, _, err = cli_in_process(argv, capsys)
    one_line(err, 1, code)
    assert "holiday" in err and ("not a convlens store" in err or "did not make" in err or "not a folder" in err)
    assert snapshot(home, skip=(home / "s.zarr",)) == before  # nothing the user owned was touched


def test_report_never_deletes_an_unrelated_files_folder(home, capsys, monkeypatch):
    monkeypatch.chdir(home)
    cli_in_process(["weights", *TINY, "--out", "w.zarr"], capsys)
    (home / "page_files").mkdir()
    (home / "page_files" / "mine.txt").write_text("mine")
    before = snapshot(home, skip=(home / "w.zarr",))
    code, _, err = cli_in_process(["report", "w.zarr", "--out", "page.html"], capsys)
    one_line(err, 1, code, "did not make")
    (home / "other.html").write_text("<html>my page</html>")
    code, _, err = cli_in_process(["report", "w.zarr", "--out", "other.html"], capsys)
    one_line(err, 1, code, "convlens did not write")
    assert snapshot(home, skip=(home / "w.zarr", home / "other.html")) == before
    assert (home / "other.html").read_text() == "<html>my page</html>"
    # Its own report and picture folder are replaced freely.
    for _ in range(2):
        code, _, err = cli_in_process(["report", "w.zarr", "--out", "mine.html"], capsys)
        assert code == 0, err


# A process holding a store's lock as a run does (the lock, its heartbeat), until told to go:
# the lock test needs a live holder, not a long computation.
HOLDER = """
import sys, time
from convlens.engine.lock import StoreLock
lock = StoreLock(sys.argv[1], command="convlens run (a test's holder)").acquire()
print("HELD", flush=True)
sys.stdin.readline()
lock.release()
"""


def test_a_running_store_is_locked_against_a_second_writer(home, capsys, monkeypatch):
    monkeypatch.chdir(home)
    args = ["run", *TINY, "--data", "imgs.npy", "--out", "s.zarr", "--no-progress"]
    assert cli_in_process(args, capsys)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "s.zarr"], cwd=home, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        info = json.loads((home / "s.zarr" / ownership.LOCK_NAME).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        for flag in ("--overwrite", "--resume"):
            code, _, err = cli_in_process([*args, flag], capsys)
            one_line(err, 1, code, "is in use by")
            assert f"pid {holder.pid}" in err and "convlens unlock" in err
        # unlock checks the holder as acquire does: a live run on this host keeps its lock.
        code, _, err = cli_in_process(["unlock", "s.zarr"], capsys)
        one_line(err, 1, code, "still running")
        assert (home / "s.zarr" / ownership.LOCK_NAME).exists()
    finally:
        holder.communicate("go\n", timeout=60)
    assert not (home / "s.zarr" / ownership.LOCK_NAME).exists()
    assert cli_in_process([*args, "--resume"], capsys)[0] == 0


def test_stale_locks_are_taken_over_or_reported(home, capsys, monkeypatch):
    monkeypatch.chdir(home)
    cli_in_process(["run", *TINY, "--data", "imgs.npy", "--out", "s.zarr", "--no-progress"], capsys)
    lock = home / "s.zarr" / ownership.LOCK_NAME
    # Same host, a process that is gone: provably stale, taken over with a note.
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 17, "heartbeat": time.time()}))
    code, out, err = cli_in_process(["run", *TINY, "--data", "imgs.npy", "--out", "s.zarr", "--no-progress",
                                     "--overwrite"], capsys)
    assert code == 0 and "taking over the stale lock" in err and "no longer running" in err
    # Another host: cannot be checked from here; refused with the command that clears it.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 4, "heartbeat": time.time() - 3600,
                                "command": "convlens run ..."}))
    code, _, err = cli_in_process(["run", *TINY, "--data", "imgs.npy", "--out", "s.zarr", "--no-progress",
                                   "--resume"], capsys)
    one_line(err, 1, code, "host elsewhere")
    assert "looks stale" in err and "convlens unlock s.zarr" in err
    # unlock checks the holder too: another host's lock needs --force, saying what is at stake.
    code, _, err = cli_in_process(["unlock", "s.zarr"], capsys)
    one_line(err, 1, code, "on another host")
    assert "--force" in err and lock.exists()
    code, out, _ = cli_in_process(["unlock", "s.zarr", "--force"], capsys)
    assert code == 0 and "cleared the lock" in out and not lock.exists()
    code, out, err = cli_in_process(["run", *TINY, "--data", "imgs.npy", "--out", "s.zarr", "--no-progress",
                                     "--resume"], capsys)
    assert code == 0, err


# ---------------------------------------------------------------- broken stores (cases 4-5)

def _damage(path: Path, how: str):
    if how == "delete chunk":
        (path / "gradcam/heatmap/c/1/0/0/0").unlink()
    elif how == "truncate chunk":
        f = path / "gradcam/heatmap/c/0/0/0/0"
        f.write_bytes(f.read_bytes()[:40])
    elif how == "delete array":
        import shutil
        shutil.rmtree(path / "gradcam/heatmap")
    elif how == "flip a bit":
        f = path / "gradcam/cam/c/1/0/0/0"
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["delete chunk", "truncate chunk", "delete array", "flip a bit"])
def test_resume_verifies_what_it_trusts_and_repairs_it(home, capsys, monkeypatch, how):
    monkeypatch.chdir(home)
    run = ["run", *TINY, "--data", "imgs.npy", "-m", "gradcam", "--chunk", "8", "--no-progress"]
    assert cli_in_process([*run, "--out", "ref.zarr"], capsys)[0] == 0
    assert cli_in_process([*run, "--out", "s.zarr"], capsys)[0] == 0
    _damage(home / "s.zarr", how)
    full = ["--full"] if how == "flip a bit" else []  # a flipped bit shows only when the chunk is decoded
    code, out, err = cli_in_process(["verify", "s.zarr", *full], capsys)
    one_line(err, 1, code, "recompute")
    assert "gradcam/" in out
    # audit and render refuse a damaged store with the way to repair it, not a decoder's error
    if not full:
        code, _, err = cli_in_process(["audit", "s.zarr", "--quality", "none"], capsys)
        one_line(err, 1, code, "is damaged")
    code, out, err = cli_in_process([*run, "--out", "s.zarr", "--resume", *(["--verify-full"] if full else [])],
                                    capsys)
    assert code == 0, err
    assert "resume:" in err and "recomputing" in err and "recomputed" in out
    assert cli_in_process(["verify", "s.zarr", "--full"], capsys)[0] == 0
    assert_same_arrays(arrays_of(home / "ref.zarr"), arrays_of(home / "s.zarr"))


def test_resume_refuses_data_replaced_under_the_same_names(home, capsys, monkeypatch):
    from PIL import Image
    monkeypatch.chdir(home)
    run = ["run", *TINY, "--data", "holiday", "--out", "s.zarr", "--chunk", "1", "--no-progress"]
    assert cli_in_process(run, capsys)[0] == 0
    # Replaced contents under the same name (same size, too).
    Image.fromarray(np.full((40, 48, 3), 7, np.uint8)).save(home / "holiday" / "p1.png")
    code, _, err = cli_in_process([*run, "--resume"], capsys)
    one_line(err, 1, code, "the data changed")
    assert "p1.png" in err and "--overwrite" in err


# ---------------------------------------------------------------- crashes (cases 6-9)

def test_ctrl_c_ends_cleanly_and_leaves_the_store_resumable(home):
    # Many small chunks of a cheap method: the run lasts long enough to be interrupted
    # without a long compile.
    rng = np.random.default_rng(1)
    np.save(home / "many.npy", rng.integers(0, 255, (300, 32, 32, 3), dtype=np.uint8))
    args = ["run", *TINY, "--data", "many.npy", "--out", "s.zarr", "--no-progress", "-m", "gradcam",
            "--batch-size", "1", "--chunk", "1"]
    p = subprocess.Popen([sys.executable, "-c", CLI_FROM_A_TERMINAL, *args], cwd=home, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            import zarr
            if (zarr.open_group(str(home / "s.zarr"), mode="r")["status"][:] != 0).sum() >= 4:
                break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    for bad in ("Traceback", "terminate called", "FATAL", "Fatal Python error"):
        assert bad not in err, err
    assert not (home / "s.zarr" / ownership.LOCK_NAME).exists()
    r = convlens(*args, "--resume", cwd=home)
    assert r.code == 0 and "300 done" in r.out and "chunks already done" in r.out, r.err


def test_a_file_with_a_non_utf8_name_does_not_stop_the_run(home, capsys, monkeypatch):
    import shutil
    monkeypatch.chdir(home)
    odd = os.fsdecode(b"holiday/caf\xe9.png")
    shutil.copy(home / "holiday" / "p0.png", odd)
    code, out, err = cli_in_process(["run", *TINY, "--data", "holiday", "--out", "s.zarr", "--no-progress"], capsys)
    assert code == 0, err
    ids = list(store.open_store(home / "s.zarr")["ids"][:])
    assert any("caf\\xe9.png" in i for i in ids) and "4 done" in out


@pytest.mark.parametrize("argv, code, text", [
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "--no-top"], 1, "has no classifier"),
    (["explain", *TINY, "holiday/p0.png", "--no-top"], 1, "has no classifier"),
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "-o", "noise=nan", "-m", "smoothgrad"], 2,
     "noise=nan is not a finite number"),
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "-m", "lime", "-o", "kernel_width=nan"], 2,
     "kernel_width=nan is not a finite number"),
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "-m", "integrated_gradients", "-o", "baseline=nan"],
     2, "baseline"),
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "-m", "occlusion", "-o", "baseline=nan"], 2,
     "baseline nan: a pixel value must be a finite number"),
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "-m", "occlusion", "-o", "window=64"], 2,
     "window 64x64 is larger than the model's 32x32 input"),
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "--chunk", "-3"], 2, "chunk=-3 is out of range"),
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "--input-size", "-5x-5"], 2, "--input-size"),
    (["run", *TINY, "--data", "imgs.npy", "--out", "o.zarr", "-m", ""], 2, "no method given"),
    (["run", *TINY, "--data", "scalar.npy", "--out", "o.zarr"], 1, "has shape []"),
    (["report", "nope.zarr", "--out", "r.html", "--per-page", "0"], 2, "per_page=0 is out of range"),
    (["render", "nope.zarr", "--out", "pics", "--alpha", "5"], 2, "alpha=5.0 is out of range"),
    (["render", "nope.zarr", "--out", "pics", "--limit", "-1"], 2, "limit=-1 is out of range"),
    (["explain", *TINY, "holiday/p0.png", "--target", "label"], 2, "needs labelled data"),
])
def test_bad_input_is_a_one_line_error(home, capsys, monkeypatch, argv, code, text):
    monkeypatch.chdir(home)
    np.save(home / "scalar.npy", np.float32(3))
    got, _, err = cli_in_process(argv, capsys)
    one_line(err, code, got, text)
    assert not (home / "o.zarr").exists()


def test_a_run_where_every_item_failed_exits_1(home, capsys, monkeypatch):
    monkeypatch.chdir(home)
    bad = home / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_bytes(b"not a png at all")
    code, out, err = cli_in_process(["run", *TINY, "--data", "bad", "--out", "s.zarr", "--no-progress"], capsys)
    one_line(err, 1, code, "every item failed (3 of 3)")
    assert "0 done, 3 failed" in out


def test_sixteen_bit_images_are_scaled_by_their_declared_depth():
    from PIL import Image
    import io

    from convlens.pixels import decode
    dark = (np.arange(40 * 48).reshape(40, 48) % 200).astype(np.uint16)  # 0..199 of 65535: near black
    buf = io.BytesIO()
    Image.fromarray(dark).save(buf, format="PNG")
    img = decode(buf.getvalue())
    assert img.max() <= 1  # not mid-grey: 199 is 0.3% of a 16-bit range


# ---------------------------------------------------------------- model files (cases 9-12, 17, 19)

def _tiny_h5(path: Path, mutate=None) -> Path:
    """vgg_tiny as a legacy full-model .h5 (its Keras config and weights); ``mutate(config)``
    edits the config first."""
    from convlens.models.keras_io import save_h5_model
    from convlens.models.registry import load_model
    from convlens.models.vgg import vgg_config
    model, params = load_model("vgg_tiny", random_init=0)
    config = vgg_config((2, 2, 3, 3, 3), (4, 8, 16, 32, 32), hidden=32, name="vgg_tiny", input_shape=(32, 32, 3))
    if mutate is not None:
        mutate(config)
    save_h5_model(model, params, path, config)
    return path


def _layer(config, name):
    return next(e for e in config["config"]["layers"] if e["name"] == name)["config"]


@pytest.mark.parametrize("mutation, text", [
    (lambda c: _layer(c, "block1_conv1").update(strides=[0, 0]), "strides 0 is out of range"),
    (lambda c: _layer(c, "block1_conv1").update(kernel_size=[0, 0]), "kernel_size 0 is out of range"),
    (lambda c: _layer(c, "fc1").update(units="abc"), "units 'abc' is not a whole number"),
    (lambda c: _layer(c, "block1_conv1").update(filters=-4), "filters -4 is out of range"),
    (lambda c: c["config"]["layers"].insert(1, {"class_name": "ZeroPadding2D", "name": "pad", "config": {
        "name": "pad", "padding": 100000}, "inbound_nodes": [[["input_layer", 0, 0, {}]]]}) or
     _set_inbound(c, "block1_conv1", "pad"), "padding 100000 is out of range"),
])
def test_invalid_layer_configs_are_refused_naming_the_layer(tmp_path, capsys, mutation, text):
    path = _tiny_h5(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        mutation(config)
        f.attrs["model_config"] = json.dumps(config)
    for cmd in (["summary", str(path)], ["run", str(path), "--data", "x.npy", "--out", str(tmp_path / "o.zarr")]):
        np.save(tmp_path / "x.npy", np.zeros((2, 32, 32, 3), np.uint8))
        cmd = [a if a != "x.npy" else str(tmp_path / "x.npy") for a in cmd]
        code, _, err = cli_in_process(cmd, capsys)
        one_line(err, 1, code, text)


def _set_inbound(config, name, src):
    next(e for e in config["config"]["layers"] if e["name"] == name)["inbound_nodes"] = [[[src, 0, 0, {}]]]


def test_deeply_nested_config_is_a_one_line_error(tmp_path, capsys):
    path = _tiny_h5(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["model_config"] = "[" * 100000 + "]" * 100000
    code, _, err = cli_in_process(["summary", str(path)], capsys)
    one_line(err, 1, code, "nested too deeply")


def test_absurd_sizes_are_refused_before_compiling(tmp_path, capsys):
    """A padding within the per-layer bound but whose outputs cannot fit in memory: refused
    from the shapes alone, before XLA sees it."""
    def pad(c):
        c["config"]["layers"].insert(1, {"class_name": "ZeroPadding2D", "name": "pad", "config": {
            "name": "pad", "padding": 30000}, "inbound_nodes": [[["input_layer", 0, 0, {}]]]})
        _set_inbound(c, "block1_conv1", "pad")
        c["config"]["layers"] = [e for e in c["config"]["layers"] if e["name"] not in ("flatten", "fc1", "fc2",
                                                                                       "predictions")]
        c["config"]["layers"].append({"class_name": "GlobalAveragePooling2D", "name": "gap", "config": {"name": "gap"},
                                      "inbound_nodes": [[["block5_pool", 0, 0, {}]]]})
        c["config"]["output_layers"] = [["gap", 0, 0]]
    from convlens.models.keras_graph import graph_from_config
    from convlens.models.network import Model
    from convlens.models.vgg import vgg_config
    config = vgg_config((2, 2, 3, 3, 3), (4, 8, 16, 32, 32), hidden=32, name="vgg_tiny", input_shape=(32, 32, 3))
    pad(config)
    model = Model(graph_from_config(config))
    params = model.init(0)
    with pytest.raises(ConvlensError, match="GiB for the layer outputs|no real convnet"):
        import convlens
        convlens.explain(model, params, np.zeros((1, 32, 32, 3), np.uint8), "gradcam")


def test_hdf5_external_storage_is_refused(tmp_path, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4 * 3 * 3 * 3, dtype=np.float32).tobytes())
    path = _tiny_h5(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        g = f["model_weights/block1_conv1"]
        name = [n.decode() for n in g.attrs["weight_names"]][0]
        del g[name]
        g.create_dataset(name, shape=(3, 3, 3, 4), dtype="f4", external=[(str(secret), 0, secret.stat().st_size)])
    code, _, err = cli_in_process(["summary", str(path)], capsys)
    one_line(err, 1, code, "keeps its data in other files")


def test_resource_exhaustion_from_small_files_is_refused_in_bounded_memory(tmp_path):
    """A 3 GiB dataset declared by a small .h5, a 200 MB config.json in a small .keras, and
    four 13000x13000 PNGs: each refused (or each item failed) with its reason, the process's
    peak memory staying under 1 GiB."""
    from PIL import Image
    big = _tiny_h5(tmp_path / "big.h5")
    with h5py.File(big, "r+") as f:
        g = f["model_weights/block1_conv1"]
        name = [n.decode() for n in g.attrs["weight_names"]][0]
        del g[name]
        g.create_dataset(name, shape=(3 * 2 ** 28,), dtype="f4", chunks=(1 << 20,), compression="gzip")
    assert big.stat().st_size < 10 << 20
    t0 = time.perf_counter()
    r = convlens("summary", big)
    one_line(r.err, 1, r.code, "file shape (805306368,)")
    elapsed = time.perf_counter() - t0
    assert elapsed < 120 and r.rss < GIB, (elapsed, r.rss)

    keras_file = tmp_path / "bomb.keras"
    with zipfile.ZipFile(keras_file, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("config.json", "w", force_zip64=True) as f:
            f.write(b'{"class_name": "Sequential", "config": {"name": "x", "layers": [], "pad": "')
            block = b" " * (1 << 20)
            for _ in range(200):
                f.write(block)
            f.write(b'"}}')
        z.writestr("model.weights.h5", b"")
    assert keras_file.stat().st_size < 2 << 20
    r = convlens("summary", keras_file)
    one_line(r.err, 1, r.code, "config.json declares")
    assert r.rss < GIB, r.rss

    folder = tmp_path / "huge"
    folder.mkdir()
    for i in range(4):
        Image.new("1", (13000, 13000)).save(folder / f"h{i}.png")
    assert all(p.stat().st_size < 200_000 for p in folder.iterdir())
    r = convlens("run", *TINY, "--data", folder, "--out", tmp_path / "h.zarr", "--no-progress")
    one_line(r.err, 1, r.code, "every item failed (4 of 4)")
    assert "image too large: 13000x13000" in r.out and r.rss < GIB, r.rss
    assert "DecompressionBomb" not in r.err + r.out


# ---------------------------------------------------------------- fuzzing

def _keras_file(tmp_path) -> Path:
    keras = pytest.importorskip("keras")
    L = keras.layers
    m = keras.Sequential([keras.Input((16, 16, 3)), L.Conv2D(4, 3, activation="relu", name="c1"),
                          L.MaxPooling2D(name="p1"), L.BatchNormalization(name="bn"), L.Flatten(name="f"),
                          L.Dense(3, activation="softmax", name="out")], name="fuzzy")
    path = tmp_path / "ok.keras"
    m.save(path)
    return path


BAD_VALUES = [0, -1, -7, "abc", 1e12, None, [], {}, 1.5, True, [0, 0], [1, 2, 3], "same", 2 ** 40]


def _mutations(cfg, rng, n):
    """``n`` configs, each with one value of one layer config replaced by a hostile one."""
    out = []
    for _ in range(n):
        c = json.loads(json.dumps(cfg))
        layers = c["config"]["layers"]
        entry = layers[rng.integers(len(layers))]
        keys = [k for k in entry.get("config", {}) if k != "name"]
        if not keys:
            continue
        k = keys[rng.integers(len(keys))]
        entry["config"][k] = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        out.append(c)
    return out


def test_fuzzed_model_files_never_crash(tmp_path, capsys):
    """Mutated configs, flipped bytes and truncations of a valid .keras and .h5: every
    `summary` ends with exit 0 or a one-line error, never a traceback."""
    rng = np.random.default_rng(16)
    ok = _keras_file(tmp_path)
    with zipfile.ZipFile(ok) as z:
        members = {n: z.read(n) for n in z.namelist()}
    cfg = json.loads(members["config.json"])
    cases = []
    for i, c in enumerate(_mutations(cfg, rng, 40)):
        p = tmp_path / f"cfg{i}.keras"
        with zipfile.ZipFile(p, "w") as z:
            for n, data in members.items():
                z.writestr(n, json.dumps(c) if n == "config.json" else data)
        cases.append(p)
    h5 = _tiny_h5(tmp_path / "ok.h5")
    for src in (ok, h5):
        data = src.read_bytes()
        for i in range(15):
            b = bytearray(data)
            for _ in range(rng.integers(1, 8)):
                b[rng.integers(len(b))] ^= 1 << int(rng.integers(8))
            p = tmp_path / f"flip{i}{src.suffix}"
            p.write_bytes(bytes(b))
            cases.append(p)
            p = tmp_path / f"cut{i}{src.suffix}"
            p.write_bytes(data[:rng.integers(1, len(data))])
            cases.append(p)
    codes = []
    for p in cases:
        code, out, err = cli_in_process(["summary", str(p)], capsys)
        codes.append(code)
        if code == 0:
            assert "Total params" in out
        else:
            one_line(err, 1, code)
    assert codes.count(1) > len(cases) // 2  # most of them are damage, and said so


def test_damaged_store_chunks_are_all_found_and_repaired(home, capsys, monkeypatch):
    """Ten random chunks of a finished store truncated or bit-flipped: `verify --full` names
    every one, and `--resume --verify-full` repairs them to the uninterrupted run's bytes."""
    monkeypatch.chdir(home)
    run = ["run", *TINY, "--data", "imgs.npy", "-m", "gradcam,gradient", "--chunk", "4", "--no-progress"]
    assert cli_in_process([*run, "--out", "ref.zarr"], capsys)[0] == 0
    assert cli_in_process([*run, "--out", "s.zarr"], capsys)[0] == 0
    rng = np.random.default_rng(4)
    chunk_files = sorted(p for p in (home / "s.zarr").rglob("*") if p.is_file() and "c" in p.parts
                         and not {"timing", "pipeline", "ids", "source"} & set(p.parts))
    chosen = [chunk_files[i] for i in rng.choice(len(chunk_files), 10, replace=False)]
    for k, f in enumerate(chosen):
        b = bytearray(f.read_bytes())
        if k % 2:
            b = b[:max(1, len(b) // 3)]
        else:
            b[rng.integers(8, len(b))] ^= 0x40
        f.write_bytes(bytes(b))
    code, out, err = cli_in_process(["verify", "s.zarr", "--full"], capsys)
    one_line(err, 1, code)
    for f in chosen:
        parts = f.relative_to(home / "s.zarr").parts
        array = "/".join(parts[:parts.index("c")])
        assert f"{array}: chunk(s)" in out, (array, out)
    code, out, err = cli_in_process([*run, "--out", "s.zarr", "--resume", "--verify-full"], capsys)
    assert code == 0, err
    assert cli_in_process(["verify", "s.zarr", "--full"], capsys)[0] == 0
    assert_same_arrays(arrays_of(home / "ref.zarr"), arrays_of(home / "s.zarr"))


def test_live_skips_damaged_packets(tmp_path, capsys):
    av = pytest.importorskip("av")
    from tests.engine.test_video import make_video
    clip = make_video(tmp_path / "clip.ts", n=36)
    data = bytearray(clip.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2000] = bytes(2000)  # one damaged stretch in the middle
    bad = tmp_path / "bad.ts"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    code, stdout, err = cli_in_process(["live", *TINY, str(bad), "--out", str(out), "--pace", "none",
                                        "--quiet"], capsys)
    assert code == 0, err
    assert out.exists() and out.stat().st_size > 0
    with av.open(str(out)) as c:
        n = sum(1 for _ in c.decode(video=0))
    assert 0 < n < 36


# ---------------------------------------------------------------- fault injection

FAULT = """
import os, signal, sys
from convlens.engine import store
kind, at = sys.argv[1], int(sys.argv[2])
count = [0]
original = store.writable


class Faulty:
    # Every chunk write of the run passes here; the at-th one is where the fault strikes.
    def __init__(self, arr):
        self.arr = arr

    def __setitem__(self, key, value):
        count[0] += 1
        if count[0] == at:
            if kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("a fault injected into the writer thread")
        self.arr[key] = value

    def __getattr__(self, name):
        return getattr(self.arr, name)


store.writable = lambda group, name: Faulty(original(group, name))
from convlens.cli import main
main(sys.argv[3:])
"""

FAULT_RUN = ["run", *TINY, "--data", "imgs.npy", "-m", "gradcam,smoothgrad", "-o", "samples=3", "--batch-size", "2",
             "--chunk", "2", "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("kind, code", [("sigkill", -signal.SIGKILL), ("sigint", 130), ("raise", 1)])
def test_interrupted_runs_resume_to_the_uninterrupted_store_byte_for_byte(home, kind, code):
    """SIGKILL, Ctrl-C and an exception inside the writer thread, each at 10 random points
    of a run (between any two chunk writes): the run ends as it should (killed; 130; 1,
    every thread closed), and --resume completes a store equal to an uninterrupted run's."""
    ref = convlens(*FAULT_RUN, "--out", "ref.zarr", cwd=home)
    assert ref.code == 0, ref.err
    reference = arrays_of(home / "ref.zarr")
    writes = 10 * 14 + 1  # chunks x arrays written per chunk, and the timing row
    points = np.random.default_rng({"sigkill": 1, "sigint": 2, "raise": 3}[kind]).choice(
        np.arange(1, writes), 10, replace=False)
    for at in points:
        out = home / f"{kind}{at}.zarr"
        p = subprocess.run([sys.executable, "-c", AS_FROM_A_TERMINAL + FAULT, kind, str(at), *FAULT_RUN, "--out",
                            str(out)], cwd=home, capture_output=True, text=True, timeout=600)
        assert p.returncode == code, (at, p.returncode, p.stderr[-2000:])
        for bad in ("Traceback", "terminate called", "Fatal Python error", "FATAL"):
            assert bad not in p.stderr, (at, p.stderr[-2000:])
        if kind != "sigkill":
            assert not (out / ownership.LOCK_NAME).exists(), at  # released on the way out
        r = convlens(*FAULT_RUN, "--out", out, "--resume", cwd=home)
        assert r.code == 0 and "20 done" in r.out, (at, r.err)
        assert_same_arrays(reference, arrays_of(out))
