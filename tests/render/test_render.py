"""The renderer draws real pixels in the right places, never imports JAX, and the HTML
report opens in a browser with every image."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convlens.engine import store
from convlens.render import images as im
from convlens.render.render import render_store

TITLE = 20  # height of a page title bar


def tile_origin(i, per_row, h, w, labels=True):
    lh = 14 if labels else 0
    r, c = divmod(i, per_row)
    return TITLE + im.MARGIN + r * (h + im.MARGIN + lh), im.MARGIN + c * (w + im.MARGIN)


def test_render_never_imports_jax():
    code = ("import sys, convlens.render.render, convlens.render.report, convlens.render.video, "
            "convlens.engine.video, convlens.cli; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_feature_map_grid_puts_each_channel_in_its_tile(tmp_path):
    act = np.zeros((1, 8, 8, 20), np.float32)
    act[0, 3, 5, 13] = 10.0  # channel 13: one bright pixel at (3, 5)
    act[0, :, :, 4] = np.arange(8)[None, :]  # channel 4: a left-to-right ramp
    root = store.create(tmp_path / "a.zarr", attrs={"model": "x"})
    store.write(root, "ids", np.asarray(["img"]), ("sample",))
    store.write(root, "activations/conv", act, ("sample", "y", "x", "channel"))
    files = render_store(tmp_path / "a.zarr", tmp_path / "out", per_row=16)["activations"]
    page = np.asarray(Image.open(files[0]))
    y0, x0 = tile_origin(13, 16, 32, 32)
    tile = page[y0:y0 + 32, x0:x0 + 32, 0].astype(int)
    ys, xs = np.nonzero(tile == tile.max())
    assert ys.min() == 12 and ys.max() == 15 and xs.min() == 20 and xs.max() == 23  # (3, 5) x4, nearest
    assert tile.max() == 255 and np.median(tile) < 128
    y0, x0 = tile_origin(4, 16, 32, 32)
    ramp = page[y0 + 16, x0:x0 + 32, 0].astype(int)
    assert (np.diff(ramp) >= 0).all() and ramp[-1] > ramp[0]
    blank = page[tile_origin(0, 16, 32, 32)[0] + 10, tile_origin(0, 16, 32, 32)[1] + 10]
    assert (blank == 128).all()  # a constant channel shows mid-grey


def heat_from_overlay(ov, alpha, grey=128, cmap="jet"):
    """Reads a blended overlay on a uniform grey image back into map values (the colour
    map inverted by nearest colour)."""
    col = (ov.astype(np.float64) - (1 - alpha) * grey) / alpha
    lut = im.colour(np.linspace(0, 1, 256), cmap).astype(np.float64)
    d = ((col[..., None, :] - lut[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def test_overlay_peak_lands_where_the_heatmap_peaks(tmp_path):
    n, h, w = 2, 48, 40
    root = store.create(tmp_path / "r.zarr", attrs={"model": "x", "methods": {
        "gradcam": {"config": {}, "outputs": {"heatmap": ["sample", "target", "y", "x"],
                                              "targets": ["sample", "target"]}}}})
    store.write(root, "ids", np.asarray(["a.png", "b.png"]), ("sample",))
    store.write(root, "status", np.ones(n, np.uint8), ("sample",))
    store.write(root, "inputs", np.full((n, h, w, 3), 128, np.uint8), ("sample", "y", "x", "rgb"))
    heat = np.zeros((n, 1, h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    heat[0, 0] = np.exp(-((yy - 10) ** 2 + (xx - 30) ** 2) / 20.0)
    heat[1, 0] = np.exp(-((yy - 40) ** 2 + (xx - 5) ** 2) / 20.0)
    store.write(root, "gradcam/heatmap", heat, ("sample", "target", "y", "x"))
    store.write(root, "gradcam/targets", np.zeros((n, 1), np.int32), ("sample", "target"))
    ov = im.overlay(np.full((h, w, 3), 128, np.uint8), heat[0, 0], cmap="jet", alpha=0.6)
    back = heat_from_overlay(ov, 0.6)
    assert np.unravel_index(np.argmax(back), back.shape) == (10, 30) and back.max() >= 254
    cs = im.overlay(np.full((h, w, 3), 128, np.uint8), heat[0, 0], style="camshow")
    assert (cs[0, 0] == 64).all()  # below threshold: darkened grey
    files = render_store(tmp_path / "r.zarr", tmp_path / "out")["overlays"]
    panel = np.asarray(Image.open(tmp_path / "out" / "overlays" / "1.png"))
    tile = 160 // 40 * 40  # the panel enlarges 40-wide images to tiles of at least 160 pixels
    y0, x0 = tile_origin(1, 2, 4 * h, 4 * w)
    back = heat_from_overlay(panel[y0:y0 + 4 * h, x0:x0 + 4 * w], 0.5)
    py, px = np.unravel_index(np.argmax(back), back.shape)
    assert (py // 4, px // 4) == (40, 5)
    assert any(p.name == "gradcam_contact.png" for p in files) and tile == 160


def test_atlas_pages(tmp_path):
    f = 70
    root = store.create(tmp_path / "atlas.zarr", attrs={"model": "x", "atlas": {"layers": ["c1"], "recipe": "classic",
                                                                                 "size": 16, "steps": 40}})
    pats = np.zeros((f, 16, 16, 3), np.uint8)
    pats[65, 2, 3] = 255  # filter 65: one white pixel
    store.write(root, "atlas/c1/patterns", pats, ("filter", "y", "x", "rgb"))
    store.write(root, "atlas/c1/filters", np.arange(f, dtype=np.int32), ("filter",))
    store.write(root, "atlas/c1/status", np.ones(f, np.uint8), ("filter",))
    files = render_store(tmp_path / "atlas.zarr", tmp_path / "out")["atlas"]
    names = sorted(p.name for p in files)
    assert names == ["c1_p1.png", "c1_p2.png", "contact.png"]  # 64 a page
    page2 = np.asarray(Image.open(tmp_path / "out" / "atlas" / "c1_p2.png"))
    y0, x0 = tile_origin(65 - 64, 8, 16, 16)
    assert (page2[y0 + 2, x0 + 3] == 255).all() and page2[y0 + 2, x0 + 4].max() == 0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from convlens.demo import run_demo
    return run_demo(tmp_path_factory.mktemp("demo") / "demo", log=lambda s: None)


@pytest.mark.slow
def test_demo_finds_the_planted_shortcut_and_reports_it(demo_run):
    flags = [f for _, f in demo_run["flags"] if f["kind"] == "class_location"]
    assert flags and all(f["class_name"] == "stamped" and f["cell"] == [0, 3] for f in flags)
    html = demo_run["report"].read_text()
    assert "class_location" in html and "top-right corner" in html and "stamped" in html
    assert "Input pipeline" in html and "Galleries" in html


@pytest.mark.slow
def test_demo_ranks_methods_above_both_controls_on_informative_metrics(demo_run):
    """The README demo's comparison: a faithfulness metric separates the methods from the
    random map (non-overlapping intervals), and the controls rank last."""
    q = demo_run["quality"]
    faithful = [m for m in q["metrics"] if m in ("road_gain", "faithfulness_estimate")
                and q["informative"][m]["informative"]]
    assert faithful, q["informative"]
    order = [r["source"] for r in q["ranking"]]
    assert set(order[-2:]) == {"control_random", "control_sobel"}, q["ranking"]
    assert "informative" in demo_run["text"] and "Ranking" in demo_run["text"]
    html = demo_run["report"].read_text()
    assert "quality_intervals" in html and "uninformative here" in html or "informative" in html


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (CI installs Debian's chromium; apt-get install chromium)")


@pytest.mark.slow
def test_report_opens_in_headless_chromium(demo_run, tmp_path):
    exe = chromium()
    page = demo_run["report"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--disable-quic", f"--user-data-dir={tmp_path / 'u'}"]
    dom = subprocess.run([exe, *flags, "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    import re
    m = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert m, "the page's image check did not run"
    ok, total = int(m.group(1)), int(m.group(2))
    assert total > 5 and ok == total, f"{total - ok} images failed to load"
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("Error" in line or
                                                                                         "Uncaught" in line)]
    assert not console_errors, console_errors
    shot = tmp_path / "shot.png"
    subprocess.run([exe, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 10 and (pixels < 200).mean() > 0.02  # text and pictures, not a blank page
    gallery = demo_run["report"].with_name("report-items-1.html")
    assert gallery.exists() and os.path.getsize(gallery) > 1000
