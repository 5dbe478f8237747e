"""Overlays as video: annotated frames and the writers for MP4, GIF and PNG folders.

Used by ``convlens render`` (stores of video runs: one video per file and method, with
the frames' original times) and by ``convlens live`` (frames as they are explained).
Frames keep their timestamps: an MP4 gets them as presentation times (variable frame
rate when frames were dropped), a GIF as per-frame durations (in its 10 ms steps).
No JAX here.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from convlens.errors import ConvlensError
from convlens.models.labels import name_of
from convlens.render import images as im

VIDEO_FORMATS = ("mp4", "webm", "gif", "png")
BLOCK = 64  # frames read from the store at once
CODECS = {"mp4": ("libx264", {"crf": "20", "preset": "veryfast"}),
          # VP9 in WebM plays in every browser (the HTML report), H.264 not in all Chromium builds.
          "webm": ("libvpx-vp9", {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"})}


def scaled(frame: np.ndarray, long_side: int | None) -> np.ndarray:
    """``frame`` resized (bilinear) so its longer side is ``long_side`` (``None``: kept),
    and even in both sides (H.264 in yuv420p needs even sizes)."""
    from PIL import Image
    h, w = frame.shape[:2]
    s = long_side / max(h, w) if long_side else 1.0
    nh, nw = max(2, round(h * s) // 2 * 2), max(2, round(w * s) // 2 * 2)
    return frame if (nh, nw) == (h, w) else np.asarray(Image.fromarray(frame).resize((nw, nh), Image.BILINEAR))


def annotate(frame: np.ndarray, heat: np.ndarray | None, title: str, *, cmap: str = "jet", alpha: float = 0.5,
             style: str = "blend", long_side: int | None = 640) -> np.ndarray:
    """One output frame: ``frame`` (RGB uint8, any size) scaled to ``long_side``, the map
    ``heat [h, w]`` laid over it, and a title bar (top label, time ...) above; even sides."""
    img = scaled(frame, long_side)
    if heat is not None:
        img = im.overlay(img, heat, cmap=cmap, alpha=alpha, style=style)
    out = im.titled(img, title, height=22)
    if out.shape[0] % 2:
        out = np.concatenate([out, np.full((1, *out.shape[1:]), im.BG, np.uint8)])
    return out


SIGNATURE = "written by convlens"
FRAMES_MARKER = ".convlens-frames"


def written_by_us(path: Path) -> bool:
    """Whether a video or GIF file carries convlens's signature (its comment metadata)."""
    try:
        if path.suffix.lower() == ".gif":
            from PIL import Image
            with Image.open(path) as g:
                return SIGNATURE.encode() in (g.info.get("comment") or b"")
        from convlens.engine.video import av_module
        with av_module().open(str(path)) as c:
            return SIGNATURE in (c.metadata.get("comment") or "")
    except Exception:  # noqa: BLE001 - unreadable: not ours
        return False


class VideoWriter:
    """Writes frames with their times (seconds) to ``path``: ``.mp4`` (H.264), ``.webm``
    (VP9), ``.gif``, or a folder of numbered PNG files (any other path). MP4 and WebM
    frames are resized to the first frame's size.

    Use as a context manager, or call `close`: a video file is playable only once closed.
    """

    def __init__(self, path, fps: float = 25.0):
        self.path = Path(path)
        self.kind = {".mp4": "mp4", ".webm": "webm", ".gif": "gif"}.get(self.path.suffix.lower(), "png")
        self.fps = fps
        self.count = 0
        self.t0 = None
        self._gif: list = []
        self._mp4 = None
        self._last_pts = -1
        if self.kind == "png":
            from convlens.engine.ownership import claim_folder
            claim_folder(self.path, FRAMES_MARKER, "the frames folder")
        else:
            if self.path.is_symlink() or self.path.is_dir() or (self.path.exists() and not written_by_us(self.path)):
                raise ConvlensError(f"{self.path} exists and is not a video convlens wrote; convlens replaces only "
                                    "its own files: choose another path")
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, frame: np.ndarray, t: float) -> None:
        """Appends ``frame`` (RGB uint8 ``[H, W, 3]``) shown from time ``t`` (seconds)."""
        if self.t0 is None:
            self.t0 = t
        rel = max(0.0, t - self.t0)
        if self.kind == "png":
            im.save_png(frame, self.path / f"{self.count:06d}_{rel:09.3f}s.png")
        elif self.kind == "gif":
            self._gif.append((frame, rel))
        else:
            self._encode(frame, rel)
        self.count += 1

    def _encode(self, frame, rel):
        from convlens.engine.video import av_module
        av = av_module()
        if self._mp4 is None:
            h, w = frame.shape[:2]
            codec, options = CODECS[self.kind]
            c = av.open(str(self.path), "w")
            c.metadata["comment"] = SIGNATURE  # so a later --overwrite knows the file is ours
            st = c.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.codec_context.time_base = Fraction(1, 1000)  # millisecond timestamps: any frame timing
            st.options = dict(options)
            self._mp4 = (c, st)
        c, st = self._mp4
        if frame.shape[:2] != (st.height, st.width):  # a stream that changed resolution
            from PIL import Image
            frame = np.asarray(Image.fromarray(frame).resize((st.width, st.height), Image.BILINEAR))
        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        f.pts = max(round(rel * 1000), self._last_pts + 1)  # strictly increasing, as the muxer needs
        f.time_base = Fraction(1, 1000)
        self._last_pts = f.pts
        for p in st.encode(f):
            c.mux(p)

    def close(self) -> Path:
        if self.kind == "gif" and self._gif:
            from PIL import Image
            frames = [Image.fromarray(f) for f, _ in self._gif]
            times = [t for _, t in self._gif]
            step = 1.0 / self.fps
            durs = [max(20, round(1000 * (b - a))) for a, b in zip(times, times[1:])] + [round(1000 * step)]
            frames[0].save(self.path, save_all=True, append_images=frames[1:], duration=durs, loop=0,
                           optimize=False, comment=SIGNATURE.encode())
            self._gif = []
        if self._mp4 is not None:
            c, st = self._mp4
            for p in st.encode():
                c.mux(p)
            c.close()
            self._mp4 = None
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def output_path(out_dir: Path, stem: str, method: str, fmt: str) -> Path:
    if fmt not in VIDEO_FORMATS:
        raise ConvlensError(f"unknown video format {fmt!r}: {', '.join(VIDEO_FORMATS)}")
    base = out_dir / "video" / f"{stem}_{method}"
    return base if fmt == "png" else base.with_suffix(f".{fmt}")


def render_videos(root, out: Path, *, fmt: str = "mp4", cmap: str = "jet", alpha: float = 0.5,
                  style: str = "blend") -> list[Path]:
    """One video per file and heatmap method of a video run's store: each explained frame
    (stored input) with its first target's map, the top label and the time, at the
    frames' own times. Failed frames are left out."""
    from convlens.engine import schema
    from convlens.render.render import class_names_of, heat_path, heatmap_methods

    v = root.attrs.get("video")
    methods = heatmap_methods(root)
    if not v or not methods or "inputs" not in root or fmt == "none":
        return []
    names = class_names_of(root)
    status = np.asarray(root["status"][:])
    files_of = np.asarray(root["video/file"][:])
    times = np.asarray(root["video/time"][:])
    frames_of = np.asarray(root["video/frame"][:])
    top = np.asarray(root["predictions/topk_index"][:, 0])
    prob = np.asarray(root["predictions/topk_prob"][:, 0])
    written = []
    for f, path in enumerate(v["files"]):
        items = np.flatnonzero((files_of == f) & (status == schema.DONE))
        if not len(items):
            continue
        items = items[np.argsort(times[items], kind="stable")]
        fps = v["fps"][f] / max(1, v.get("every", 1))
        dests = {m: output_path(out, Path(path).stem, m, fmt) for m in methods}
        writers = {m: VideoWriter(d, fps) for m, d in dests.items()}
        try:
            # Blocks of frames: each stored chunk is decompressed once, for every method.
            for start in range(0, len(items), BLOCK):
                blk = items[start:start + BLOCK]
                inputs = root["inputs"].get_orthogonal_selection((blk,))
                heats = {m: root[heat_path(root, m)].get_orthogonal_selection((blk, slice(0, 1)))[:, 0] for m in methods}
                for j, i in enumerate(blk):
                    c = int(top[i])
                    label = name_of(c, names)
                    # Stored inputs are model-sized: enlarged (pixels kept sharp) for viewing.
                    img = im.upscale(np.asarray(inputs[j]), 240)
                    for m, w in writers.items():
                        title = f"{label} {prob[i]:.2f}  |  {m}  |  t={times[i]:.2f}s (frame {int(frames_of[i])})"
                        w.write(annotate(img, heats[m][j], title, cmap=cmap, alpha=alpha, style=style,
                                         long_side=None), float(times[i]))
        finally:
            for w in writers.values():
                w.close()
        written += list(dests.values())
    return written
