"""Video Grad-CAM: frames per second through the engine (`convlens run` on a video file)
and live (`convlens live`), for the small convnet (150x150) and VGG16 (224x224), each
against the Grad-CAM kernel alone on frames already in memory, measured in the same run.

    python benchmarks/video_throughput.py            # 300 frames of 640x360 at 30 fps (~6 min)
    python benchmarks/video_throughput.py --frames 90 --quick

The video is made here: a camera-like pan over scikit-image's photos with a moving
object, H.264 in MP4 (the common case). Rows:
* decode: frames decoded, converted to RGB and resized to the model (the engine's source);
* kernel: Grad-CAM on batches of 8 frames in memory (batch 1 for the live ceiling);
* engine: the whole run over the file, batch 8 (decoding, store writes, consolidation);
* live, unpaced: the file decoded as fast as it goes, the model taking the newest frame,
  every explained frame drawn (overlay at 640 px) and written to an MP4: the most frames
  per second the loop gives;
* live at 30 fps: the file played at its own speed, as a camera: frames explained and
  dropped per second.
Timing: compilation excluded (a warm-up call or run first), wall clock, block_until_ready.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_time, load_arrays, machine, explain_fn, keys_for  # noqa: E402

from convlens.engine import runner, sources  # noqa: E402
from convlens.engine.video import VideoSource, av_module  # noqa: E402
from convlens.live import live  # noqa: E402
from convlens.models.registry import build_model  # noqa: E402


def make_video(path: Path, frames: int, fps: int = 30, size=(360, 640)) -> Path:
    """A pan across a scikit-image photo with a red disc crossing it, H.264 (yuv420p)."""
    from PIL import Image
    from skimage import data
    av = av_module()
    h, w = size
    scene = np.asarray(Image.fromarray(data.astronaut()).resize((2 * w, 2 * h), Image.BILINEAR))
    yy, xx = np.mgrid[:h, :w]
    c = av.open(str(path), "w")
    st = c.add_stream("libx264", rate=fps)
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    st.options = {"crf": "23", "preset": "veryfast"}
    for k in range(frames):
        x0 = int((w * k) / max(frames - 1, 1))
        img = scene[h // 2:h // 2 + h, x0:x0 + w].copy()
        cx, cy = int(w * 0.1 + 0.8 * w * k / max(frames - 1, 1)), h // 2
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < (h // 8) ** 2] = (220, 30, 30)
        for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in st.encode():
        c.mux(p)
    c.close()
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="the small convnet only")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="convlens-video-"))
    res = {"machine": machine(), "frames": a.frames, "video": "640x360 H.264, 30 fps", "models": {}}
    out_file = HERE / "results" / ("video_throughput_quick.json" if a.quick else "video_throughput.json")
    try:
        clip = make_video(tmp / "pan.mp4", a.frames)
        warm = make_video(tmp / "warm.mp4", a.batch * 2)
        for name in (("smallcnn",) if a.quick else ("smallcnn", "vgg16")):
            model = build_model(name)
            params = jax.tree.map(jnp.asarray, load_arrays(name))
            size = model.input_size
            row = res["models"][name] = {"input": list(size)}
            src = VideoSource([str(clip)])
            t = time.perf_counter()
            frames = [sources.fit(src.read(i).image, size) for i in range(len(src))]
            row["decode_fps"] = len(frames) / (time.perf_counter() - t)
            fn = explain_fn(model, "gradcam", {}, 1)
            for b, key in ((a.batch, "kernel_fps"), (1, "kernel_fps_batch1")):
                x = jnp.asarray(np.stack(frames[:b]).astype(np.float32))
                keys = keys_for(b)
                row[key] = b / best_time(lambda: jax.block_until_ready(fn(params, x, None, keys)), 3)
            runner.run(model, params, VideoSource([str(warm)]), ["gradcam"], tmp / "warm.zarr",
                       batch_size=a.batch, progress=False, overwrite=True)
            t = time.perf_counter()
            s = runner.run(model, params, VideoSource([str(clip)]), ["gradcam"], tmp / f"{name}.zarr",
                           batch_size=a.batch, progress=False)
            row["engine_fps"] = s.done / (time.perf_counter() - t)
            row["engine_fraction_of_kernel"] = row["engine_fps"] / row["kernel_fps"]
            live(model, params, str(warm), out=tmp / "warm_live.mp4", pace="none")  # compiles batch 1
            st = live(model, params, str(clip), out=tmp / f"{name}_live.mp4", pace="none")
            row["live_unpaced"] = {"fps": st.fps, "processed": st.processed, "dropped": st.dropped,
                                   "compute_ms": st.compute_ms, "max_held": st.max_held,
                                   "fraction_of_batch1_kernel": st.fps / row["kernel_fps_batch1"]}
            st = live(model, params, str(clip), out=tmp / f"{name}_live30.mp4", pace="native")
            row["live_30fps"] = {"fps": st.fps, "processed": st.processed, "dropped": st.dropped,
                                 "kept_share": st.processed / max(st.read, 1), "max_held": st.max_held,
                                 "peak_rss_mb": st.peak_rss_mb}
            out_file.write_text(json.dumps(res, indent=1))
            print(f"{name} {size[0]}x{size[1]}: decode {row['decode_fps']:.0f} fps; Grad-CAM kernel "
                  f"{row['kernel_fps']:.1f} fps (batch {a.batch}), {row['kernel_fps_batch1']:.1f} (batch 1); engine "
                  f"{row['engine_fps']:.1f} fps = {row['engine_fraction_of_kernel']:.2f} of the kernel; live unpaced "
                  f"{row['live_unpaced']['fps']:.1f} fps = {row['live_unpaced']['fraction_of_batch1_kernel']:.2f} "
                  f"of the batch-1 kernel; live at 30 fps: {row['live_30fps']['fps']:.1f} fps explained, "
                  f"{100 * row['live_30fps']['kept_share']:.0f}% of frames kept", flush=True)
        print(f"wrote {out_file}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
