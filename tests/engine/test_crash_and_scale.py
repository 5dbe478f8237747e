"""The engine under kill -9, on 8 devices and in 2 processes: always the same store."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from convlens.engine import schema
from tests.engine.test_runner import arrays_of, assert_same_arrays


def cli(*args, env=None, **kw):
    e = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "convlens.cli", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(p, timeout=600):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def data_npy(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    imgs = np.random.default_rng(0).integers(0, 255, (64, 150, 150, 3), dtype=np.uint8)
    np.save(d / "images.npy", imgs)
    return d / "images.npy"


RUN = ["run", "smallcnn", "--random-init", "0", "-m", "gradcam,smoothgrad", "-o", "samples=12",
       "--batch-size", "4", "--chunk", "4", "--no-progress"]


def done_count(path):
    try:
        return int((zarr.open_group(str(path), mode="r")["status"][:] != schema.PENDING).sum())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted_run(data_npy, tmp_path):
    ref, crashed = tmp_path / "ref.zarr", tmp_path / "crashed.zarr"
    finish(cli(*RUN, "--data", str(data_npy), "--out", str(ref)))
    n = 64
    p = cli(*RUN, "--data", str(data_npy), "--out", str(crashed))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and done_count(crashed) < 12:
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
    got = done_count(crashed)
    assert 12 <= got < n
    out = finish(cli(*RUN, "--data", str(data_npy), "--out", str(crashed), "--resume"))
    assert "chunks already done" in out
    assert not list(crashed.rglob("*.partial"))
    assert_same_arrays(arrays_of(ref), arrays_of(crashed))
    assert zarr.open_group(str(crashed), mode="r").attrs["run"]["done"] == n


@pytest.mark.slow
def test_eight_devices_match_one(data_npy, tmp_path):
    one, eight = tmp_path / "one.zarr", tmp_path / "eight.zarr"
    args = ["run", "smallcnn", "--random-init", "0", "-m", "gradcam,integrated_gradients", "-o", "steps=4",
            "--batch-size", "8", "--no-progress", "--data", str(data_npy)]
    # XLA's own settings in both: the tuned settings of a sharded and an unsharded program may
    # differ, and with them the rounding of sums; this compares the sharding alone.
    finish(cli(*args, "--out", str(one), env={"CONVLENS_XLA": "default"}))
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    finish(cli(*args, "--out", str(eight), env={"XLA_FLAGS": flags, "CONVLENS_XLA": "default"}))
    a, b = arrays_of(one), arrays_of(eight)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
        else:
            assert (a[k] == b[k]).all(), k


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_same_store(data_npy, tmp_path):
    single, multi = tmp_path / "single.zarr", tmp_path / "multi.zarr"
    args = ["run", "smallcnn", "--random-init", "0", "-m", "gradcam", "--batch-size", "4", "--chunk", "8",
            "--no-progress", "--data", str(data_npy)]
    finish(cli(*args, "--out", str(single)))
    port = free_port()
    procs = [cli(*args, "--out", str(multi), "--num-processes", "2", "--process-id", str(i),
                 "--coordinator", f"localhost:{port}") for i in range(2)]
    outs = [finish(p) for p in procs]
    assert "wrote" in outs[0]
    root = zarr.open_group(str(multi), mode="r")
    assert root.attrs["run"]["processes"] == 2 and root["timing/method_seconds"].shape == (2, 1)
    assert (root["timing/method_seconds"][:] > 0).all()  # both processes did work
    assert_same_arrays(arrays_of(single), arrays_of(multi))
