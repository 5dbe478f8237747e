"""Video: frames and their times from files, explanations that follow a moving object
through the engine, overlays written back with the right frame count and timing, and
`convlens live` holding a bounded number of frames however fast the stream is."""

import numpy as np
import pytest

import convlens
from convlens.engine import schema
from convlens.engine import runner, sources, store
from convlens.engine.video import VideoSource
from convlens.errors import ConvlensError
from convlens.live import live
from tests.kernels.nets import functional, layer

av = pytest.importorskip("av")

H, W = 64, 112  # frames; the object is a red 16x16 square moving 2 px a frame to the right


def object_col(k):
    return 2 * k + 8  # centre column in frame k


def make_video(path, n=48, fps=12, size=(H, W), noise=0, seed=0):
    rng = np.random.default_rng(seed)
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=fps)
    s.height, s.width = size
    s.pix_fmt = "yuv420p"
    s.options = {"crf": "8", "g": "12"}
    for k in range(n):
        img = np.full((*size, 3), 90, np.uint8)
        if noise:
            img = np.clip(img + rng.integers(-noise, noise + 1, img.shape), 0, 255).astype(np.uint8)
        x0 = (2 * k) % max(1, size[1] - 16)
        img[20:36, x0:x0 + 16] = (230, 20, 20)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def red_detector():
    """A convnet that detects red: one conv filter (red minus green and blue), ReLU, GAP,
    and a Dense layer whose class 0 ("red object") grows with the red area."""
    model = functional("red_detector", [
        layer("Conv2D", "red", "img", filters=1, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("GlobalAveragePooling2D", "gap", "red"),
        layer("Dense", "out", "gap", units=2, activation="softmax"),
    ], (64, 64, 3))
    k = np.zeros((3, 3, 3, 1), np.float32)
    k[..., 0, 0], k[..., 1, 0], k[..., 2, 0] = 1 / 9, -1 / 9, -1 / 9
    import jax.numpy as jnp
    params = {"red": {"kernel": jnp.asarray(k), "bias": jnp.asarray([-0.3])},
              "out": {"kernel": jnp.asarray([[20.0, -20.0]]), "bias": jnp.asarray([0.0, 0.0])}}
    return model, params


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_video_source_gives_every_nth_frame_with_its_time(clip):
    src = sources.open_source([str(clip)], every=3)
    assert isinstance(src, VideoSource) and len(src) == 16
    assert src.ids[:2] == [f"{clip}#frame0", f"{clip}#frame3"]
    arrays = src.store_arrays()
    np.testing.assert_allclose(arrays["video/time"][0], np.arange(0, 48, 3) / 12.0, atol=1e-9)
    np.testing.assert_array_equal(arrays["video/frame"][0], np.arange(0, 48, 3))
    attrs = src.store_attrs()["video"]
    assert attrs["fps"] == [12.0] and attrs["frames"] == [48] and attrs["every"] == 3
    seq = [src.read(i).image for i in range(len(src))]
    for i, img in enumerate(seq):
        k = 3 * i
        cols = np.flatnonzero((img[28, :, 0] > 170) & (img[28, :, 1] < 90))
        assert abs(cols.mean() - (object_col(k) - 0.5)) < 1.5, (k, cols)
    # Out-of-order reads (decode threads, resumed chunks) seek and give the same frames.
    for i in (15, 2, 9, 0, 14, 1):
        np.testing.assert_array_equal(src.read(i).image, seq[i])


def test_bad_video_input_is_a_clear_error(tmp_path, clip, folder):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01 not a video" * 50)
    with pytest.raises(ConvlensError, match="is not a video file FFmpeg can read"):
        sources.open_source([str(bad)])
    with pytest.raises(ConvlensError, match="no such video file"):
        sources.open_source([str(tmp_path / "missing.mp4")])
    with pytest.raises(ConvlensError, match="--every applies to video files"):
        sources.open_source(str(folder), every=2)
    with pytest.raises(ConvlensError, match="either video files or images"):
        sources.open_source([str(clip), str(next(folder.rglob("*.png")))])
    # An MP4 cut short loses its index (at the end): refused with the reason.
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ConvlensError, match="truncated or damaged"):
        VideoSource([str(cut)])
    # A streamed format cut short keeps its first frames: they are explained, a damaged
    # last frame fails alone.
    ts = make_video(tmp_path / "clip.ts", n=48)
    data = ts.read_bytes()
    ts.write_bytes(data[: len(data) * 2 // 3])
    src = VideoSource([str(ts)])
    assert 20 <= len(src) < 48
    model, params = red_detector()
    s = runner.run(model, params, src, ["gradcam"], tmp_path / "ts.zarr", progress=False)
    assert s.done + s.failed == len(src) and s.done >= len(src) - 2


def test_maps_follow_the_moving_object_through_the_engine(clip, tmp_path):
    model, params = red_detector()
    out = tmp_path / "video.zarr"
    src = VideoSource([str(clip)], every=2)
    s = runner.run(model, params, src, {"gradcam": {}, "cam": {}}, out, batch_size=4, chunk=8, progress=False)
    assert (s.done, s.failed) == (24, 0)
    root = store.open_store(out)
    assert schema.validate(root) == []
    frames = np.asarray(root["video/frame"][:])
    np.testing.assert_array_equal(frames, np.arange(0, 48, 2))
    np.testing.assert_allclose(root["video/time"][:], frames / 12.0)
    assert root.attrs["video"]["every"] == 2
    for m in ("gradcam", "cam"):
        heat = np.asarray(root[f"{m}/heatmap"][:, 0])  # [N, 64, 64]
        peak_cols = np.array([np.unravel_index(h.argmax(), h.shape)[1] for h in heat])
        col_profile = heat.sum(axis=1)  # where the map's mass sits along x
        centre = (col_profile * np.arange(64)).sum(1) / col_profile.sum(1)
        want = object_col(frames) * 64 / W  # squashed to the model's 64 columns
        assert np.abs(centre - want).max() < 2.0, (m, centre, want)
        assert np.abs(peak_cols - want).max() <= 6, (m, peak_cols, want)
        assert (np.diff(centre) > 0).all()  # the map moves with the object, frame after frame
    # The stored maps are the API's on the same decoded frames.
    x = np.stack([sources.fit(src.read(i).image, (64, 64)) for i in range(len(src))])
    e = convlens.explain(model, params, x, "gradcam")
    np.testing.assert_allclose(root["gradcam/heatmap"][:], e["heatmap"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def video_store(clip, tmp_path_factory):
    model, params = red_detector()
    out = tmp_path_factory.mktemp("vstore") / "v.zarr"
    runner.run(model, params, VideoSource([str(clip)], every=3), ["gradcam"], out, batch_size=8, progress=False)
    return out


def test_rendered_mp4_has_every_explained_frame_at_its_time(video_store, tmp_path):
    from convlens.render.render import render_store
    groups = render_store(video_store, tmp_path / "pics", video="mp4")
    (mp4,) = groups["video"]
    assert mp4.name == "clip_gradcam.mp4"
    with av.open(str(mp4)) as c:
        st = c.streams.video[0]
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(st)]
    assert len(frames) == 16
    np.testing.assert_allclose([t for t, _ in frames], np.arange(16) * 3 / 12.0, atol=1e-3)
    img = frames[5][1]
    assert img.shape[0] >= 240 and img[:22].mean() > 200  # the title bar (white) above the overlay


def test_rendered_gif_and_png_frames(video_store, tmp_path):
    from PIL import Image

    from convlens.render.render import render_store
    (gif,) = render_store(video_store, tmp_path / "g", video="gif")["video"]
    with Image.open(gif) as g:
        assert g.n_frames == 16
        durations = []
        for k in range(g.n_frames):
            g.seek(k)
            durations.append(g.info["duration"])
    assert all(abs(d - 250) <= 10 for d in durations), durations  # every 3rd frame of 12 fps
    (folder,) = render_store(video_store, tmp_path / "p", video="png")["video"]
    assert len(list(folder.glob("*.png"))) == 16
    assert "video" not in render_store(video_store, tmp_path / "n", video="none")


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


@pytest.mark.slow
def test_live_on_a_fast_stream_holds_a_bounded_number_of_frames(tmp_path):
    """A 640x480 file decoded as fast as possible (pace none) feeds the model far faster
    than it explains: frames are dropped, never queued, and memory stays flat."""
    clip = make_video(tmp_path / "big.mp4", n=240, fps=30, size=(480, 640), noise=20)
    model, params = red_detector()
    rss = []
    stats = live(model, params, str(clip), method="gradcam", out=tmp_path / "live.mp4", pace="none",
                 on_frame=lambda s, img: rss.append(_rss_mb()))
    assert stats.stopped_by == "end of stream" and stats.read == 240
    assert stats.max_held <= 3
    assert stats.processed + stats.dropped == stats.read and stats.dropped > 0, stats
    assert len(rss) == stats.processed and stats.processed >= 10
    k = len(rss) // 3
    assert max(rss[k:]) - rss[k] < 40, (rss[k], max(rss[k:]))  # 240 queued frames would be 220 MB
    with av.open(str(tmp_path / "live.mp4")) as c:
        times = [f.time for f in c.decode(c.streams.video[0])]
    assert len(times) == stats.processed and (np.diff(times) > 0).all()


@pytest.mark.slow
def test_live_paces_a_file_like_a_camera_and_stops_on_request(clip, tmp_path):
    import time
    model, params = red_detector()
    t = time.perf_counter()
    frames = []
    stats = live(model, params, str(clip), method="cam", on_frame=lambda s, img: frames.append(img))
    took = time.perf_counter() - t
    assert took >= 48 / 12 * 0.85  # played at its own 12 fps, not as fast as it decodes
    assert stats.processed == len(frames) and stats.processed > 24 and stats.read == 48
    assert frames[0].shape[1] == 640 and frames[0].shape[0] % 2 == 0  # --size's long side, even sides
    stats = live(model, params, str(clip), method="gradcam", out=tmp_path / "few.gif", max_frames=5)
    assert stats.processed == 5 and stats.stopped_by == "max frames"
    from PIL import Image
    with Image.open(tmp_path / "few.gif") as g:
        assert g.n_frames == 5
    with pytest.raises(ConvlensError, match="with a heatmap"):
        live(model, params, str(clip), method="integrated_gradients_nope", out=tmp_path / "x.mp4")
    with pytest.raises(ConvlensError, match="no such file, camera"):
        live(model, params, str(tmp_path / "nope.mp4"), out=tmp_path / "x.mp4")


def test_cli_video_run_render_and_live(clip, tmp_path, capsys):
    from tests.test_cli import run as cli

    out = tmp_path / "v.zarr"
    code, text, err = cli(["run", "vgg_tiny", "--random-init", "0", "--data", str(clip), "--every", "4", "-m",
                           "gradcam,eigencam", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "12 done, 0 failed of 12 items" in text
    code, text, err = cli(["info", str(out)], capsys)
    assert "every 4 frame(s): 12 items" in text and "video/time" in text
    code, text, err = cli(["render", str(out), "--out", str(tmp_path / "pics"), "--video", "gif"], capsys)
    assert code == 0, err
    assert (tmp_path / "pics" / "video" / "clip_gradcam.gif").is_file()
    assert (tmp_path / "pics" / "video" / "clip_eigencam.gif").is_file()
    live_out = tmp_path / "live.mp4"
    code, text, err = cli(["live", "vgg_tiny", "--random-init", "0", str(clip), "--out", str(live_out),
                           "--pace", "none", "--quiet", "-m", "hirescam"], capsys)
    assert code == 0, err
    assert "frames explained" in text and live_out.is_file()
    code, text, err = cli(["live", "vgg_tiny", "--random-init", "0", str(clip), "--out", str(live_out)], capsys)
    assert code == 1 and "already exists" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, code, text", [
    (["live", "vgg_tiny", "--random-init", "0", "CLIP"], 2, "needs somewhere to put the overlays"),
    (["live", "vgg_tiny", "--random-init", "0", "CLIP", "--out", "OUT", "-m", "nosuch"], 2, "'nosuch' is not a method"),
    (["live", "vgg_tiny", "--random-init", "0", "rtsp://127.0.0.1:9/none", "--out", "OUT", "--timeout", "1"], 1,
     "cannot open the stream rtsp://127.0.0.1:9/none"),
    (["run", "vgg_tiny", "--random-init", "0", "--data", "BAD", "--out", "OUT"], 1, "is not a video file FFmpeg"),
    (["run", "vgg_tiny", "--random-init", "0", "--data", "CLIP", "--every", "0", "--out", "OUT"], 2,
     "--every must be at least 1"),
])
def test_cli_video_errors_are_one_line(clip, tmp_path, capsys, argv, code, text):
    from tests.test_cli import run as cli
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 100)
    subst = {"CLIP": str(clip), "OUT": str(tmp_path / "o.mp4"), "BAD": str(bad)}
    c, out, err = cli([subst.get(a, a) for a in argv], capsys)
    assert c == code, err
    assert text in err and err.count("\n") == 1 and "Traceback" not in err


def test_report_embeds_the_overlay_videos(video_store, tmp_path):
    from convlens.render.report import report
    pages = report(video_store, tmp_path / "r.html")
    text = pages[0].read_text()
    assert "<h2>Video</h2>" in text and "r_files/video/clip_gradcam.webm" in text
    with av.open(str(tmp_path / "r_files" / "video" / "clip_gradcam.webm")) as c:
        st = c.streams.video[0]
        assert st.codec_context.name == "vp9"
        times = [f.time for f in c.decode(st)]
    np.testing.assert_allclose(times, np.arange(16) * 0.25, atol=1e-3)
