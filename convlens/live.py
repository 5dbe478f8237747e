"""``convlens live``: explain a video stream as it comes, at the highest frame rate the
machine allows.

A reader thread decodes the stream (a camera, a network URL, or a file played at its
own speed) into a one-frame slot: a new frame replaces one not yet taken, and is
counted as dropped, so nothing queues up however slow the model is. The main loop takes
the newest frame, dispatches the compiled method on it (batch 1, compiled once), and
while the device works draws the previous frame's overlay (the map over the frame at
its own resolution, scaled to ``long_side``, with the top label) and hands it to the
outputs: a video file (MP4 keeps the frames' stream times, so playback shows what was
explained when), a GIF, a folder of PNG files, and/or a window. At most three frames
are held at once: the one in the slot, the one on the device, the one being drawn.
"""

from __future__ import annotations

import dataclasses
import resource
import threading
import time
from collections.abc import Callable

import numpy as np

from convlens.config import Config, option
from convlens.errors import ConvlensError, OptionError


@dataclasses.dataclass
class LiveStats:
    """What a live session did.

    Attributes:
      read: frames decoded from the stream; processed: frames explained and written;
      dropped: frames replaced in the slot before the model could take them;
      seconds: wall time from the first frame; fps: processed / seconds;
      compute_ms: mean time from dispatch to the map on the host (model + transfer);
      max_held: the most frames held at once (slot, device, drawing);
      peak_rss_mb: the process's peak resident memory.
    """

    read: int = 0
    processed: int = 0
    dropped: int = 0
    seconds: float = 0.0
    compute_ms: float = 0.0
    max_held: int = 0
    peak_rss_mb: float = 0.0
    stopped_by: str = ""
    damaged: int = 0

    @property
    def fps(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.processed} frames explained in {self.seconds:.1f} s ({self.fps:.1f} fps), {self.dropped} of "
                f"{self.read} read dropped; {self.compute_ms:.0f} ms per frame on the model; "
                f"at most {self.max_held} frames held; peak memory {self.peak_rss_mb:.0f} MB"
                + (f"; {self.damaged} damaged packet(s) skipped" if self.damaged else ""))


@dataclasses.dataclass
class Frame:
    image: np.ndarray  # RGB uint8 [h, w, 3], upright
    time: float  # stream time in seconds, from the first frame
    index: int  # decoded frame number


class LatestFrame:
    """A one-frame slot between the reader and the model: `put` replaces a frame not yet
    taken (counted in ``dropped``); `get` waits for the next one, ``None`` once closed."""

    def __init__(self):
        self.cond = threading.Condition()
        self.frame: Frame | None = None
        self.closed = False
        self.dropped = 0
        self.error: BaseException | None = None

    def put(self, frame: Frame) -> None:
        with self.cond:
            if self.frame is not None:
                self.dropped += 1
            self.frame = frame
            self.cond.notify()

    def close(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.closed = True
            self.error = error
            self.cond.notify_all()

    def get(self) -> Frame | None:
        with self.cond:
            while self.frame is None and not self.closed:
                self.cond.wait(0.5)
            f, self.frame = self.frame, None
            return f

    @property
    def held(self) -> int:
        return int(self.frame is not None)


class Reader(threading.Thread):
    """Decodes ``stream`` into ``slot``; a file is paced to its timestamps (``pace``)."""

    def __init__(self, container, stream, slot: LatestFrame, pace: bool):
        super().__init__(daemon=True, name="convlens-live-reader")
        self.container, self.stream, self.slot, self.pace = container, stream, slot, pace
        self.stop = threading.Event()
        self.read = 0
        self.damaged = 0

    def run(self):
        from convlens.engine.video import av_module, upright
        av = av_module()
        t0 = wall0 = None
        try:
            for packet in self.container.demux(self.stream):
                if self.stop.is_set():
                    break
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    self.damaged += 1  # a damaged packet: its frames are skipped, as a run skips them
                    continue
                for fr in frames:
                    t = float(fr.time) if fr.time is not None else self.read / 30.0
                    if t0 is None:
                        t0, wall0 = t, time.perf_counter()
                    if self.pace:  # play a file as a camera would deliver it
                        wait = (t - t0) - (time.perf_counter() - wall0)
                        if wait > 0 and self.stop.wait(wait):
                            self.slot.close()
                            return
                    self.slot.put(Frame(upright(fr), t - t0, self.read))
                    self.read += 1
            self.slot.close()
        except av.FFmpegError as e:
            # The container itself broke: after frames were read that is where the readable
            # stream ends; before any, the stream cannot be read at all.
            self.damaged += 1
            self.slot.close(None if self.read else e)
        except Exception as e:  # noqa: BLE001 - reported by the main loop
            self.slot.close(e)


class Window:
    """Shows frames in a Matplotlib window (needs a display)."""

    def __init__(self, title: str):
        import os
        import sys
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform in ("darwin", "win32")):
            raise ConvlensError("--show needs a display (none found: DISPLAY is not set); write the overlays with "
                                "--out FILE.mp4 instead")
        import matplotlib.pyplot as plt
        self.plt = plt
        plt.ion()
        self.fig, self.ax = plt.subplots(num=title)
        self.ax.axis("off")
        self.art = None

    def show(self, frame: np.ndarray) -> bool:
        """Draws ``frame``; False once the window was closed."""
        if not self.plt.fignum_exists(self.fig.number):
            return False
        if self.art is None:
            self.art = self.ax.imshow(frame)
        else:
            self.art.set_data(frame)
        self.plt.pause(0.001)
        return True

    def close(self):
        self.plt.close(self.fig)


def _peak_rss_mb() -> float:
    import sys
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


PACES = ("auto", "native", "none")


@dataclasses.dataclass(frozen=True)
class LiveOptions(Config):
    """How a live session runs (see the module docstring).

    Attributes:
      target: top1, topk:N (the first is drawn), or class indices.
      out: write the overlays: FILE.mp4, FILE.webm, FILE.gif, or a folder of PNG frames.
      overwrite: replace an earlier --out convlens wrote.
      show: show the overlays in a window (needs a display).
      max_frames: stop after this many explained frames.
      duration: stop after this many seconds.
      pace: files: auto/native play at their own speed (like a camera); none decodes as fast as it can.
      resize: fit frames to the model: squash, crop or pad.
      long_side: longer side of the output frames in pixels.
      seed: PRNG seed (stochastic methods; every frame draws as item 0).
      timeout: seconds to wait for a stream to open.
    """

    target: str = "top1"
    out: str | None = None
    overwrite: bool = False
    show: bool = False
    max_frames: int | None = option(None, min=1)
    duration: float | None = option(None, above=0)
    pace: str = option("auto", choices=PACES)
    resize: str = option("squash", choices=("squash", "crop", "pad"))
    long_side: int = option(640, min=16, max=8192)
    seed: int = option(0, min=0, max=2**63 - 1)
    timeout: float = option(10.0, above=0)

    _owner = "live"


def writable(opts: LiveOptions, on_frame=None) -> None:
    """Refuses (one line) a session with nowhere to put its overlays, or an --out that
    exists without --overwrite."""
    if opts.out is None and not opts.show and on_frame is None:
        raise OptionError("live needs somewhere to put the overlays: --out FILE.mp4|FILE.gif|FOLDER or --show")
    from convlens.engine.ownership import exists
    if opts.out is not None and exists(opts.out) and not opts.overwrite:
        raise ConvlensError(f"{opts.out} already exists; pass --overwrite to replace it or choose another --out")


def live(model, params, stream: str, *, method: str | None = None, options: dict | None = None,
         opts: LiveOptions = LiveOptions(), look=None,
         on_frame: Callable[[LiveStats, np.ndarray], None] | None = None, **kw) -> LiveStats:
    """Explains ``stream`` frame by frame (see the module docstring).

    Args:
      model, params: from `convlens.load_model`.
      stream: ``camera:N``, ``/dev/videoN``, a URL, or a video file.
      method, options: any method with a heatmap and its options (``layer`` ...); default
        the method `convlens.kernels.common.choose_method` picks for the model.
      opts: `LiveOptions` (keyword arguments ``**kw`` build one instead: ``out=``,
        ``max_frames=`` ...).
      look: `convlens.render.render.LookOptions` (colour map, style, opacity).
      on_frame: called with the stats and each output frame (tests, custom sinks).

    Returns:
      `LiveStats`.
    """
    from convlens.config import build
    from convlens.engine import targets as tg
    from convlens.engine.executor import Batch, Executor, Explain, Group
    from convlens.engine.sources import fit
    from convlens.engine.video import open_stream
    from convlens.kernels.common import choose_method
    from convlens.kernels.registry import METHODS, resolve
    from convlens.models.labels import class_probabilities, name_of
    from convlens.render.render import LookOptions
    from convlens.render.video import VideoWriter, annotate

    if kw:
        opts = build(LiveOptions, {**dataclasses.asdict(opts), **kw})
    look = look or LookOptions()
    method = method or choose_method(model, (options or {}).get("layer")).method
    if method not in METHODS or METHODS[method].heatmap is None:
        with_maps = ", ".join(sorted(m for m, spec in METHODS.items() if spec.heatmap))
        raise ConvlensError(f"live runs a method with a heatmap; {method!r} is not one ({with_maps})")
    writable(opts, on_frame)
    cfg = resolve(model, method, dict(options or {}))
    targets = tg.parse(opts.target, 1, tg.n_classes(model), labelled=False)
    comp = {method: Explain(model, method, cfg, targets.top_k)}
    fixed = targets.for_items(np.zeros(1, int))
    heat_name = METHODS[method].heatmap
    names = model.class_names
    window = Window(f"convlens live: {stream}") if opts.show else None

    container, st, is_file = open_stream(stream, opts.timeout)
    fps = float(st.average_rate or st.guessed_rate or 25)
    writer = VideoWriter(opts.out, fps) if opts.out is not None else None
    slot = LatestFrame()
    reader = Reader(container, st, slot, opts.pace == "native" or (opts.pace == "auto" and is_file))
    stats = LiveStats()
    compute = []
    clock = {"start": None, "sent": 0}

    def frames():
        """The newest frame each time the executor asks (it asks for frame n+1 before
        handing back frame n's map, so the device works while frame n is drawn)."""
        while True:
            if opts.max_frames is not None and clock["sent"] >= opts.max_frames:
                stats.stopped_by = "max frames"
                return
            if opts.duration is not None and clock["start"] is not None and \
                    time.perf_counter() - clock["start"] >= opts.duration:
                stats.stopped_by = "duration"
                return
            frame = slot.get()
            if frame is None:
                if slot.error is not None:
                    raise ConvlensError(f"the stream {stream} failed: {slot.error}")
                stats.stopped_by = "end of stream"
                return
            if clock["start"] is None:
                clock["start"] = time.perf_counter()
            inputs = {"images": fit(frame.image, model.input_size, opts.resize).astype(np.float32)[None]}
            if fixed is not None:
                inputs["targets"] = fixed
            stats.max_held = max(stats.max_held, 1 + slot.held + (clock["sent"] > stats.processed))
            clock["sent"] += 1
            # Every frame is item 0 (the same key).
            yield Group((frame, time.perf_counter()), comp, [Batch(inputs, np.zeros(1, np.int32))])

    def draw(frame, dispatched, host) -> bool:
        compute.append(time.perf_counter() - dispatched)
        heat = np.asarray(host[heat_name][0, 0])
        probs = class_probabilities(host["logits"][0:1], model.output_activation)[0]
        c = int(np.asarray(host["targets"])[0, 0])
        top = int(np.argmax(probs))
        what = "" if c == top else f" (map: {name_of(c, names)})"
        title = f"{name_of(top, names)} {float(probs[top]):.2f}{what}  |  {method}  |  t={frame.time:.2f}s  " \
                f"{stats.fps:.1f} fps"
        img = annotate(frame.image, heat, title, cmap=look.cmap, alpha=look.alpha, style=look.style,
                       long_side=opts.long_side)
        if writer is not None:
            writer.write(img, frame.time)
        stats.processed += 1
        stats.seconds = time.perf_counter() - clock["start"]
        if on_frame is not None:
            on_frame(stats, img)
        return window is None or window.show(img)

    reader.start()
    try:
        with Executor(params, batch=1, key=opts.seed) as ex:
            for (frame, dispatched), results in ex.stream(frames()):
                if not draw(frame, dispatched, results[0][method]):
                    stats.stopped_by = "window closed"
                    break
    except KeyboardInterrupt:
        stats.stopped_by = "interrupted"
    finally:
        reader.stop.set()
        reader.join(timeout=5)
        container.close()
        if writer is not None:
            writer.close()  # an interrupted session still leaves a playable file
        if window is not None:
            window.close()
        stats.read = reader.read
        stats.damaged = reader.damaged
        stats.dropped = slot.dropped + (1 if slot.frame is not None else 0)
        stats.compute_ms = 1000 * float(np.mean(compute)) if compute else 0.0
        stats.peak_rss_mb = _peak_rss_mb()
    return stats
