"""Video files as data sources, and video streams (cameras, URLs) as frames.

`VideoSource` makes every ``every``-th frame of one or more video files an item of a
data set, so every method runs over video through the engine like over images. Frames
are decoded by FFmpeg through PyAV, upright (the stream's rotation applied) and RGB.
Opening a file reads its packet timestamps only (no decoding), so the frame count and
each frame's presentation time are exact before anything is decoded; items are then
decoded in order with one decoder per file, seeking only when the engine jumps (a
resumed run, another process's chunks). The store records each item's file, frame
index and time (``video/file``, ``video/frame``, ``video/time``) and the files' frame
rates (root attribute ``video``), from which the renderer writes the overlays back as a
video with the original timing.

`open_stream` opens a live stream for `convlens.live`: a camera (``camera:0``,
``/dev/video0``), a network URL (``rtsp://``, ``http://`` ...) or a file.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np

from convlens.engine.sources import Item, ItemError, Source
from convlens.errors import ConvlensError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
                  ".3gp", ".ogv", ".mts", ".m2ts")
FORWARD = 300  # decoding on up to this many frames is cheaper than a seek (a GOP is ~250 at most)
CACHE = 16  # decoded frames kept for requests that arrive out of order (the engine's decode threads)
# FFmpeg's frame threading ("AUTO") deadlocks when a decoder is dropped mid-stream (a seek,
# a stopped live session): seen with PyAV 18 on H.264 in MPEG-TS. Slice threading does
# not, and decoded 720p H.264 faster here (582 frames/s against 336).
THREADING = "SLICE"


def is_video(path) -> bool:
    return Path(str(path)).suffix.lower() in VIDEO_SUFFIXES


def av_module():
    try:
        import av
    except ImportError:  # pragma: no cover - PyAV is a dependency
        raise ConvlensError("reading video needs PyAV (pip install av)") from None
    # FFmpeg logs to the terminal by itself; its errors reach convlens as exceptions, which say
    # what failed per frame or file, so nothing but a fatal line is let through raw.
    av.logging.set_level(av.logging.PANIC)
    return av


def upright(frame) -> np.ndarray:
    """A decoded PyAV frame as RGB uint8 ``[h, w, 3]``, the stream's rotation applied."""
    rgb = frame.to_ndarray(format="rgb24")
    rot = int(getattr(frame, "rotation", 0) or 0) % 360
    # FFmpeg's display matrix angle is counter-clockwise; np.rot90 turns counter-clockwise.
    return np.ascontiguousarray(np.rot90(rgb, rot // 90)) if rot in (90, 180, 270) else rgb


class VideoFile:
    """One video file: its frames' timestamps (read without decoding) and a decoder
    that returns frame ``k`` (thread-safe, sequential reads cost one decode each).

    Attributes:
      path: the file.
      times: ``[F]`` presentation time of every frame in seconds, from the first frame.
      fps: average frame rate; width, height: decoded frame size (before rotation);
      codec: the codec's name.
    """

    def __init__(self, path):
        av = av_module()
        self.path = Path(path)
        if not self.path.is_file():
            raise ConvlensError(f"{self.path}: no such video file")
        try:
            with av.open(str(self.path)) as c:
                if not c.streams.video:
                    raise ConvlensError(f"{self.path} has no video stream (or is truncated or damaged: an MP4 "
                                        "cut short loses its index)")
                st = c.streams.video[0]
                pts = [p.pts if p.pts is not None else p.dts for p in c.demux(st) if p.size]
                self.time_base = st.time_base
                self.width, self.height = st.codec_context.width, st.codec_context.height
                self.codec = st.codec_context.name
                rate = st.average_rate or st.guessed_rate
        except av.FFmpegError as e:
            raise ConvlensError(f"{self.path} is not a video file FFmpeg can read ({e.strerror or e})") from None
        if not pts:
            raise ConvlensError(f"{self.path} holds no video frames")
        if any(p is None for p in pts):
            raise ConvlensError(f"{self.path} has frames without timestamps; remux it (ffmpeg -i IN -c copy OUT.mp4)")
        self.pts = np.unique(np.asarray(pts, np.int64))  # presentation order (B-frames come out of order)
        self.times = (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)
        self.fps = float(rate) if rate else (len(self.pts) - 1) / max(self.times[-1], 1e-9)
        self.index = {int(p): k for k, p in enumerate(self.pts)}
        self.lock = threading.Lock()
        self.container = None
        self.frames = None
        self.pos = -1  # index of the last frame decoded
        self.cache: dict[int, np.ndarray] = {}
        self.wanted = None  # predicate: frames worth caching when decoded on the way

    def __len__(self) -> int:
        return len(self.pts)

    def _open(self, at: int | None):
        """Positions the decoder before frame ``at`` (a seek to the keyframe at or before
        it), or at the very start (``None``: a fresh container, no seek)."""
        av = av_module()
        if self.container is not None and at is None:
            self.container.close()
            self.container = None
        if self.container is None:
            self.container = av.open(str(self.path))
            self.container.streams.video[0].thread_type = THREADING
        elif at is not None:
            st = self.container.streams.video[0]
            self.container.seek(int(self.pts[at]), stream=st, backward=True)
        self.frames = self.container.decode(self.container.streams.video[0])
        self.pos = -1

    def frame(self, k: int) -> np.ndarray:
        """Frame ``k`` (presentation order) as upright RGB uint8 ``[h, w, 3]``; `ItemError`
        if it cannot be decoded."""
        with self.lock:
            if k in self.cache:
                return self.cache.pop(k)
            try:
                if self.frames is not None and self.pos < k <= self.pos + FORWARD:
                    got = self._decode_to(k)
                else:
                    self._open(k if self.container is not None else None)
                    got = self._decode_to(k)
                    if got is None and self.pos > k:  # the seek overshot (imprecise in some formats)
                        self._open(None)
                        got = self._decode_to(k)
            except Exception as e:  # noqa: BLE001 - FFmpeg errors: this frame fails, the run goes on
                self.frames = None
                raise ItemError(f"cannot decode frame {k} of {self.path.name}: {e}") from None
            if got is None:
                self.frames = None
                raise ItemError(f"frame {k} of {self.path.name} could not be decoded (damaged or truncated file)")
            return got

    def _decode_to(self, k: int) -> np.ndarray | None:
        """Decodes on to frame ``k``; ``None`` if the decoder passes it or the file ends."""
        for fr in self.frames:
            at = self.index.get(int(fr.pts)) if fr.pts is not None else self.pos + 1
            if at is None:
                continue
            self.pos = at
            if at == k:
                return upright(fr)
            if at > k:
                return None
            if self.wanted is not None and self.wanted(at):
                self.cache[at] = upright(fr)
                while len(self.cache) > CACHE:
                    self.cache.pop(min(self.cache))
        return None

    def close(self):
        with self.lock:
            if self.container is not None:
                self.container.close()
            self.container, self.frames = None, None


class VideoSource(Source):
    """Every ``every``-th frame of one or more video files, in order.

    Args:
      paths: video files.
      every: keep frames ``0, every, 2 * every, ...`` of each file.

    Items are named ``<path>#frame<k>``; `store_arrays` gives each item's file, frame
    index and time, `store_attrs` the files' frame rates.
    """

    def __init__(self, paths, every: int = 1):
        if every < 1:
            raise ConvlensError(f"--every must be at least 1, got {every}")
        self.every = int(every)
        self.files = [VideoFile(p) for p in paths]
        self.items = [(f, k) for f, v in enumerate(self.files) for k in range(0, len(v), self.every)]
        for v in self.files:
            v.wanted = lambda k: k % self.every == 0
        from convlens.engine.sources import safe_id
        self.ids = [safe_id(f"{self.files[f].path}#frame{k}") for f, k in self.items]
        self.labels = np.full(len(self.items), -1, np.int32)
        self.class_names = None
        parts = [f"{v.path} ({len(v)} frames, {v.fps:.3g} fps, {v.width}x{v.height} {v.codec})" for v in self.files]
        self.description = (f"video {', '.join(parts)}; every {self.every} frame(s): {len(self.items)} items"
                            if self.every > 1 else f"video {', '.join(parts)}: {len(self.items)} frames")

    def read(self, i: int) -> Item:
        f, k = self.items[i]
        return Item(self.files[f].frame(k))

    def store_arrays(self) -> dict:
        f = np.asarray([f for f, _ in self.items], np.int32)
        k = np.asarray([k for _, k in self.items], np.int32)
        t = np.asarray([self.files[a].times[b] for a, b in self.items], np.float64)
        return {"video/file": (f, ("sample",)), "video/frame": (k, ("sample",)), "video/time": (t, ("sample",))}

    def store_attrs(self) -> dict:
        return {"video": {"files": [str(v.path) for v in self.files], "fps": [v.fps for v in self.files],
                          "frames": [len(v) for v in self.files], "every": self.every,
                          "duration": [float(v.times[-1]) + 1.0 / max(v.fps, 1e-9) for v in self.files],
                          "size": [[v.width, v.height] for v in self.files]}}

    def close(self):
        for v in self.files:
            v.close()

    def fingerprint(self):
        from convlens.engine.sources import _digest, file_sample_hash
        per_file = []
        for v in self.files:
            try:
                st = v.path.stat()
                per_file.append(_digest(st.st_size, st.st_mtime_ns, len(v)))
            except OSError:
                per_file.append(_digest("missing"))
        digests = np.asarray([per_file[f] for f, _ in self.items], np.uint64)
        return digests, {str(v.path): file_sample_hash(v.path) for v in self.files[:32]}


# ---------------------------------------------------------------- live streams

def stream_input(spec: str) -> tuple[str, dict, bool]:
    """``(what av.open takes, its keyword arguments, whether it is a file to pace)`` for
    a stream spec: ``camera:N`` (or ``camera:NAME`` on Windows), ``/dev/videoN``, a URL
    (``rtsp://``, ``http://`` ...), or a video file."""
    if spec.startswith("camera:"):
        dev = spec[len("camera:"):] or "0"
        if sys.platform.startswith("linux"):
            return (dev if dev.startswith("/dev/") else f"/dev/video{dev}"), {"format": "v4l2"}, False
        if sys.platform == "darwin":
            return dev, {"format": "avfoundation", "options": {"framerate": "30"}}, False
        if sys.platform == "win32":
            return f"video={dev}", {"format": "dshow"}, False
        raise ConvlensError(f"cameras are not supported on {sys.platform}; give a stream URL or a file")
    if spec.startswith("/dev/video"):
        return spec, {"format": "v4l2"}, False
    if "://" in spec and not spec.startswith("file://"):
        return spec, {}, False
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    if not Path(path).is_file():
        raise ConvlensError(f"{spec}: no such file, camera (camera:0, /dev/video0) or stream URL (rtsp://...)")
    return path, {}, True


def open_stream(spec: str, timeout: float = 10.0):
    """``(container, video stream, is_file)`` for a live stream spec (see `stream_input`);
    a clear error if it cannot be opened within ``timeout`` seconds."""
    av = av_module()
    target, kw, is_file = stream_input(spec)
    try:
        c = av.open(target, timeout=timeout, **kw)
    except av.FFmpegError as e:
        raise ConvlensError(f"cannot open the stream {spec}: {e.strerror or e}") from None
    if not c.streams.video:
        c.close()
        raise ConvlensError(f"{spec} has no video stream")
    st = c.streams.video[0]
    st.thread_type = THREADING
    return c, st, is_file
