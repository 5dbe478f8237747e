"""Filter atlases: the store holds the kernel's patterns, and runs resume after kill -9."""

import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr

import convlens
from convlens.engine import schema
from convlens.engine import store
from convlens.engine.atlas import parse_filters, run_atlas
from convlens.errors import ConvlensError
from convlens.engine.executor import item_keys
from convlens.kernels import ascent as A
from tests.engine.test_crash_and_scale import cli, finish
from tests.engine.test_runner import arrays_of, assert_same_arrays

CFG = A.AscentConfig(size=16, steps=6)


@pytest.fixture(scope="module")
def tiny():
    return convlens.load_model("vgg_tiny", random_init=0)


def test_atlas_store_holds_the_kernels_patterns(tiny, tmp_path):
    model, params = tiny
    out = tmp_path / "atlas.zarr"
    s = run_atlas(model, params, out, layers="block1_conv2,block3_conv1", filters="::2", cfg=CFG, batch=3,
                  progress=False)
    assert (s.layers, s.filters) == (2, 2 + 8)
    root = store.open_store(out)
    assert schema.validate(root) == []
    g = root["atlas/block3_conv1"]
    assert g["patterns"].shape == (8, 16, 16, 3) and list(g["filters"][:]) == list(range(0, 16, 2))
    assert (g["status"][:] == schema.DONE).all()
    assert root.attrs["atlas"]["recipe"] == "classic" and root.attrs["atlas"]["steps"] == 6
    # Layer index 4 of vgg_tiny's conv layers; the same images as the kernel called directly.
    units = jnp.asarray(g["filters"][:])
    ref = jax.device_get(A.visualize(model, params, A.channel("block3_conv1"), units, CFG,
                                     item_keys(0, units, salt=model.conv_layer_names.index("block3_conv1"))))
    np.testing.assert_array_equal(g["patterns"][:], ref["patterns"])
    np.testing.assert_allclose(g["scores"][:], ref["scores"], rtol=1e-5)


def test_atlas_resume_and_refusals(tiny, tmp_path):
    model, params = tiny
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    run_atlas(model, params, full, layers="block1_conv1,block2_conv1", cfg=CFG, batch=2, progress=False)
    run_atlas(model, params, part, layers="block1_conv1,block2_conv1", cfg=CFG, batch=2, progress=False)
    root = zarr.open_group(str(part), mode="r+")
    root["atlas/block2_conv1/status"][2:6] = schema.PENDING  # two chunks lost in a crash
    root["atlas/block2_conv1/patterns"][2:6] = 0
    s = run_atlas(model, params, part, layers="block1_conv1,block2_conv1", cfg=CFG, batch=2, resume=True,
                  progress=False)
    assert (s.computed_chunks, s.filters) == (2, 4)
    assert_same_arrays(arrays_of(full), arrays_of(part))
    with pytest.raises(ConvlensError, match="already exists"):
        run_atlas(model, params, part, layers="block1_conv1", cfg=CFG, progress=False)
    with pytest.raises(ConvlensError, match="different atlas"):
        run_atlas(model, params, part, layers="block1_conv1", cfg=CFG, resume=True, progress=False)
    with pytest.raises(ConvlensError, match="not a conv layer"):
        run_atlas(model, params, tmp_path / "x.zarr", layers="fc1", cfg=CFG, progress=False)


def test_parse_filters():
    assert list(parse_filters("0:3", 10)) == [0, 1, 2]
    assert list(parse_filters("1,4", 10)) == [1, 4]
    assert list(parse_filters(None, 3)) == [0, 1, 2]
    with pytest.raises(ConvlensError, match="selects no valid filter"):
        parse_filters("12", 10)


@pytest.mark.slow
def test_atlas_kill9_then_resume(tmp_path):
    args = ["atlas", "vgg_tiny", "--random-init", "0", "--size", "32", "--steps", "20", "--batch", "2",
            "--loop", "host", "--no-progress"]
    ref, crashed = tmp_path / "ref.zarr", tmp_path / "crashed.zarr"
    finish(cli(*args, "--out", str(ref)))
    p = cli(*args, "--out", str(crashed))

    def done():
        try:
            root = zarr.open_group(str(crashed), mode="r")
            return sum(int((root[f"atlas/{n}/status"][:] == 1).sum()) for n in root["atlas"].group_keys())
        except Exception:  # noqa: BLE001 - not created yet
            return 0
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and done() < 20:
        time.sleep(0.05)
    assert p.poll() is None, "the atlas finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    out = finish(cli(*args, "--out", str(crashed), "--resume"))
    assert "chunks already done" in out
    a, b = arrays_of(ref), arrays_of(crashed)
    assert_same_arrays(a, b)
