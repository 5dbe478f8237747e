"""The convlens Zarr store. This module is the schema: `SCHEMA` declares every array any
command writes, and every writer takes its dims from it.

A store is a Zarr v3 group (a local ``*.zarr`` directory, or any fsspec URL such as
``s3://bucket/run.zarr``) that ``xarray.open_zarr`` opens: every array carries
``dimension_names``, chunks are compressed (Zarr's default zstd), and metadata is
consolidated when a command finishes.

Root attributes:
  ``schema_version`` (int), ``convlens_version``, ``model`` (name), ``model_source``
  (weights file or ``random-init:SEED``), ``weights_sha256`` (or null),
  ``preprocessing``, ``input_size`` ([H, W]), ``precision``, ``model_load_args`` (how to
  load the model again: ``convlens.load_model`` keywords, or null for a model built in
  Python), ``created`` (ISO time), ``command``,
  ``methods``: ``{method: {"config": {...}, "outputs": {name: dims}, "heatmap": name or
  null, "family": ...}}``, and for data-set runs ``source`` (what was read), ``resize``
  (squash/crop/pad), ``target`` (the target spec), ``class_names`` (or null), ``chunk``
  (items per chunk), ``video`` (video runs: ``{"files", "fps", "frames", "every",
  "duration", "size"}``), ``fingerprint`` (what must match for ``--resume``),
  ``data_fingerprint`` (the items' sizes, times and sampled contents) and, once
  finished, ``run``: ``{"items", "done", "failed", "seconds", "items_per_second",
  "method_seconds_per_item": {method: s}, "processes", "finished", "verified"}``;
  atlases ``atlas``; training stores ``training``; audits ``audit``.

Arrays (``N`` items; every array with a ``sample`` axis is chunked ``chunk`` items along
it, and each chunk is written whole by exactly one process): see `SCHEMA` (the README's
table is generated from the same declarations, and `validate` checks a store against it).

Resume rule: an item's ``status`` chunk is written after every other array's chunk of
the same items, so a chunk whose status is all non-zero was complete when written;
`convlens.engine.verify` checks that its data chunks still exist and decode before a
resume trusts it. Local stores are written atomically per chunk file (Zarr writes a
temporary file and renames it), so ``kill -9`` leaves at worst a stray ``*.partial``
file, which resuming removes.

Ownership: convlens replaces or deletes only what is recognisably a convlens store (a
Zarr group whose root attributes carry ``schema_version`` and ``convlens_version``),
and only when asked (``overwrite``); a store being written is locked (`StoreLock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import json
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from convlens.errors import ConvlensError

SCHEMA_VERSION = 3
SAMPLE_CHUNK = 16
PENDING, DONE, FAILED = 0, 1, 2
LOCK_NAME = ".convlens-lock"


# ---------------------------------------------------------------- the schema

@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array (or family of arrays, by a glob ``pattern``) a store may hold.

    Attributes:
      pattern: the array's path (``*`` for one path segment, e.g. ``atlas/*/patterns``).
      dims: dimension names, by the array's rank (``{rank: dims}``); ``None`` for
        method outputs, whose dims the method registry declares.
      dtype: the numpy dtype string (``str`` for strings, ``any`` where it varies).
      doc: what it holds.
      layout: which command writes it (``run``, ``activations``, ``weights``, ``atlas``,
        ``training``, ``audit``, ``video``, ``pipeline``).
    """

    pattern: str
    dims: dict[int, tuple[str, ...]] | None
    dtype: str
    doc: str
    layout: str


def _d(*dims):
    return {len(dims): tuple(dims)}


SCHEMA: tuple[ArraySpec, ...] = (
    ArraySpec("ids", _d("sample"), "str", "the item's name (file path, name/split/i, index)", "run"),
    ArraySpec("labels", _d("sample"), "int32", "ground-truth class, -1 where unknown", "run"),
    ArraySpec("status", _d("sample"), "uint8", "0 pending, 1 done, 2 failed", "run"),
    ArraySpec("errors", _d("sample"), "str", "why an item failed (\"\" otherwise)", "run"),
    ArraySpec("predictions/topk_index", _d("sample", "rank"), "int32",
              "top classes, best first (-1 for failed items)", "run"),
    ArraySpec("predictions/topk_prob", _d("sample", "rank"), "float32",
              "their probabilities (softmax/sigmoid output)", "run"),
    ArraySpec("source/digest", _d("sample"), "uint64",
              "each item's file size and modification time, hashed (what --resume checks)", "run"),
    ArraySpec("inputs", _d("sample", "y", "x", "rgb"), "uint8", "the resized images (--keep-inputs)", "run"),
    ArraySpec("masks", _d("sample", "y", "x"), "bool", "object masks, where the source has them", "run"),
    ArraySpec("timing/method_seconds", _d("process", "method"), "float64",
              "per process, seconds spent in each method (attrs: methods)", "run"),
    ArraySpec("video/file", _d("sample"), "int32", "the item's file (index into the video.files attribute)", "video"),
    ArraySpec("video/frame", _d("sample"), "int32", "the item's frame number in its file", "video"),
    ArraySpec("video/time", _d("sample"), "float64", "the frame's time in seconds from the file's first frame",
              "video"),
    ArraySpec("pipeline/raw/*", _d("y", "x", "rgb"), "uint8", "the first items as read (at most 256 px a side)",
              "pipeline"),
    ArraySpec("pipeline/resized", _d("item", "y", "x", "rgb"), "uint8", "... as resized for the model", "pipeline"),
    ArraySpec("pipeline/preprocessed", _d("item", "y", "x", "channel"), "float32", "... as the model sees them",
              "pipeline"),
    ArraySpec("activations/*", {4: ("sample", "y", "x", "channel"), 2: ("sample", "unit")}, "float32",
              "a layer's output (convlens activations)", "activations"),
    ArraySpec("weights/*/kernel", _d("kh", "kw", "c_in", "c_out"), "float32", "a conv layer's kernel (HWIO)",
              "weights"),
    ArraySpec("weights/*/filters", {4: (("filter", "kh", "kw", "rgb"), ("filter", "c_in", "kh", "kw"))}, "float32",
              "kernels as images normalised per layer: [filter, kh, kw, rgb] on RGB input, else [filter, c_in, "
              "kh, kw]", "weights"),
    ArraySpec("atlas/*/patterns", _d("filter", "y", "x", "rgb"), "uint8", "the optimised image of each filter",
              "atlas"),
    ArraySpec("atlas/*/filters", _d("filter"), "int32", "which filter each row is", "atlas"),
    ArraySpec("atlas/*/scores", _d("filter"), "float32", "the objective on the final image", "atlas"),
    ArraySpec("atlas/*/start_scores", _d("filter"), "float32", "... on the starting image", "atlas"),
    ArraySpec("atlas/*/status", _d("filter"), "uint8", "0 pending, 1 done (written last per chunk)", "atlas"),
    ArraySpec("epoch", _d("epoch"), "int32", "the recorded epochs (training stores)", "training"),
    ArraySpec("metrics/*", _d("epoch"), "float64", "a logged metric per recorded epoch (NaN when not logged)",
              "training"),
    ArraySpec("audit/*/grid_mass", _d("sample", "grid_y", "grid_x"), "float32", "map mass per grid cell", "audit"),
    ArraySpec("audit/*/peak", _d("sample", "yx"), "float32", "the map's peak, y and x in [0, 1]", "audit"),
    ArraySpec("audit/*/class_mean*", _d("class", "y", "x"), "float32",
              "mean map mass per class (_correct, _wrong: over correct / misclassified items)", "audit"),
    ArraySpec("audit/*/deletion", _d("sample", "fraction"), "float32", "deletion curve", "audit"),
    ArraySpec("audit/*/insertion", _d("sample", "fraction"), "float32", "insertion curve", "audit"),
    ArraySpec("audit/*/metrics/*_curve", _d("sample", "step"), "float32",
              "a catalogue metric's curve per item (NaN: not rated), e.g. road_morf_curve", "audit"),
    ArraySpec("audit/*/metrics/*", _d("sample"), "float32",
              "a catalogue metric's score per item (NaN: not rated); audit/control_random and "
              "audit/control_sobel hold the controls'", "audit"),
    ArraySpec("audit/*/*", _d("sample"), "any",
              "per-item statistics: center_share, entropy, concentration, suspicion, empty, object_share, "
              "pointing_hit, deletion_auc, insertion_auc, drop, increase", "audit"),
)
# Method outputs: ``<method>/<output>`` with dims from the method registry (``sample``
# first); training stores put ``epoch`` before them.
METHOD_OUTPUT = ArraySpec("<method>/<output>", None, "any",
                          "each output the method declares, e.g. gradcam/heatmap [N, T, H, W] f4; NaN (float) or "
                          "-1 (int) for failed items", "run")


def schema_table() -> str:
    """The schema as a Markdown table (the README's, written from these declarations)."""
    rows = ["| array | dtype | dims | holds | written by |", "|---|---|---|---|---|"]
    for s in (*SCHEMA[:9], METHOD_OUTPUT, *SCHEMA[9:]):
        dims = " / ".join(", ".join(d) for ds in (s.dims or {}).values()
                          for d in (ds if isinstance(ds[0], tuple) else (ds,))) or "as the method declares"
        rows.append(f"| `{s.pattern}` | {s.dtype} | {dims} | {s.doc} | {s.layout} |")
    return "\n".join(rows)


def spec_for(path: str) -> ArraySpec | None:
    """The schema entry of an array path (first match), or ``None`` (a method output)."""
    for s in SCHEMA:
        if fnmatch.fnmatchcase(path, s.pattern) and path.count("/") == s.pattern.count("/"):
            return s
    return None


def allowed_dims(spec: ArraySpec, ndim: int) -> tuple[tuple[str, ...], ...]:
    """Every dims tuple the schema allows for ``spec`` at rank ``ndim`` (some layouts have two)."""
    d = spec.dims.get(ndim, ())
    return d if d and isinstance(d[0], tuple) else (d,)


def dims_for(path: str, ndim: int) -> tuple[str, ...]:
    """Declared dims of the array at ``path`` with ``ndim`` axes."""
    s = spec_for(path)
    if s is None or s.dims is None:
        raise ValueError(f"{path}: not in the store schema (method outputs take their dims from the registry)")
    if ndim in s.dims:
        d = s.dims[ndim]
        return d[0] if isinstance(d[0], tuple) else d
    if s.pattern.startswith("activations/"):
        return ("sample",) + tuple(f"d{i}" for i in range(1, ndim))
    raise ValueError(f"{path}: {ndim}-D, the schema declares {sorted(s.dims)}-D")


# ---------------------------------------------------------------- paths

def is_url(path) -> bool:
    return isinstance(path, (str, Path)) and "://" in str(path) and not str(path).startswith("file://")


def _is_store_object(path) -> bool:
    return not isinstance(path, (str, Path))  # a zarr Store instance (e.g. MemoryStore)


def local_path(path) -> Path | None:
    if _is_store_object(path):
        return None
    s = str(path)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return None if is_url(s) else Path(s)


def _fs(path, storage_options=None):
    import fsspec
    return fsspec.core.url_to_fs(str(path), **(storage_options or {}))


def exists(path, storage_options=None) -> bool:
    """Whether anything (a store or not) is at ``path``."""
    if _is_store_object(path):
        return bool(getattr(path, "_store_dict", None))
    local = local_path(path)
    if local is not None:
        return local.exists() or local.is_symlink()
    fs, p = _fs(path, storage_options)
    return fs.exists(p)


def _root_attrs(path, storage_options=None) -> dict | None:
    """The root attributes of a Zarr v3 group at ``path``, read as JSON (no Zarr), or None."""
    try:
        local = local_path(path)
        if local is not None:
            if not (local / "zarr.json").is_file():
                return None
            text = (local / "zarr.json").read_text()
        else:
            fs, p = _fs(path, storage_options)
            text = fs.cat_file(p.rstrip("/") + "/zarr.json").decode()
        meta = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError, FileNotFoundError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes")
    return attrs if isinstance(attrs, dict) else None


def is_convlens_store(path, storage_options=None) -> bool:
    """Whether ``path`` is recognisably a convlens store (its root attributes say so)."""
    a = _root_attrs(path, storage_options)
    return a is not None and "schema_version" in a and "convlens_version" in a


def describe_path(path) -> str:
    """What is at ``path``, in a few words (for refusals)."""
    local = local_path(path)
    if local is None:
        return "something that is not a convlens store"
    if local.is_symlink():
        return "a symbolic link"
    if local.is_file():
        return f"a file of {local.stat().st_size:,} bytes"
    if local.is_dir():
        try:
            entries = list(local.iterdir())
        except OSError:
            return "a folder convlens cannot list"
        if (local / "zarr.json").is_file():
            return "a Zarr store that convlens did not write"
        files = sum(1 for _ in local.rglob("*") if _.is_file())
        return f"a folder of {files} file(s) ({', '.join(sorted(e.name for e in entries)[:3])}" + \
            (", ..." if len(entries) > 3 else "") + ")"
    return "something that is not a convlens store"


def check_replaceable(path, storage_options=None, what: str = "--out") -> None:
    """Refuses (one line) to replace ``path`` unless it is a convlens store."""
    if exists(path, storage_options) and not is_convlens_store(path, storage_options):
        raise ConvlensError(f"{what} {path} is {describe_path(path)}, not a convlens store: convlens replaces only "
                            "its own stores; choose another path")


def only_lock(path) -> bool:
    """Whether ``path`` is a folder holding nothing but a convlens lock (a store being started)."""
    local = local_path(path)
    if local is None or not local.is_dir() or local.is_symlink():
        return False
    return [p.name for p in local.iterdir()] == [LOCK_NAME]


def remove(path, storage_options=None) -> None:
    """Deletes the convlens store at ``path`` (refusing anything else), keeping a lock
    file this process holds."""
    if _is_store_object(path):
        path.clear() if hasattr(path, "clear") else None
        return
    check_replaceable(path, storage_options)
    local = local_path(path)
    if local is not None:
        if local.is_dir():
            for child in local.iterdir():
                if child.name == LOCK_NAME:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return
    fs, p = _fs(path, storage_options)
    for child in fs.ls(p, detail=False):
        if child.rstrip("/").endswith(LOCK_NAME):
            continue
        fs.rm(child, recursive=True)


@contextlib.contextmanager
def quiet():
    """Zarr's warnings about convlens's own files (the lock) and consolidated metadata,
    silenced: they say nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        yield


def _store_arg(path):
    if _is_store_object(path):
        return path
    local = local_path(path)
    return str(local) if local is not None else str(path)


def _kw(path, storage_options):
    return {"storage_options": storage_options} if is_url(path) else {}


# ---------------------------------------------------------------- locks

def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start  # a reused pid has another start time


class StoreLock:
    """One run at a time per store: a lock file ``.convlens-lock`` inside the store,
    created atomically (``O_EXCL`` locally; on object stores written then read back),
    holding the holder's host, pid, process start time, command and a heartbeat that
    `refresh` renews (a background thread does it every ``HEARTBEAT`` seconds).

    A lock whose holder is provably gone (same host, pid no longer running) is stale and
    taken over with a note; any other held lock is refused with who holds it and the
    command that clears it (``convlens unlock STORE``). A lock older than ``STALE``
    seconds without a heartbeat is reported as probably stale (another host's crash).
    """

    HEARTBEAT = 30.0
    STALE = 600.0

    def __init__(self, path, storage_options=None, command: str = "", note=None):
        self.path, self.storage_options, self.command = path, storage_options, command
        self.token = uuid.uuid4().hex
        self.note = note or (lambda msg: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self.created_dir = False

    @property
    def file(self) -> str:
        local = local_path(self.path)
        return str(local / LOCK_NAME) if local is not None else str(self.path).rstrip("/") + "/" + LOCK_NAME

    def _content(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
                "command": self.command[:500], "token": self.token,
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "heartbeat": time.time()}

    def read(self) -> dict | None:
        try:
            local = local_path(self.path)
            if local is not None:
                text = Path(self.file).read_text()
            else:
                fs, _ = _fs(self.path, self.storage_options)
                text = fs.cat_file(self.file).decode()
            info = json.loads(text)
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            return {}  # a damaged lock file still means: someone locked it

    def _write_exclusive(self) -> bool:
        data = json.dumps(self._content()).encode()
        local = local_path(self.path)
        if local is not None:
            if not local.exists():
                local.mkdir(parents=True)
                self.created_dir = True  # removed again on release if nothing else was written
            try:
                fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        fs, _ = _fs(self.path, self.storage_options)
        if fs.exists(self.file):
            return False
        fs.pipe_file(self.file, data)
        got = self.read()  # object stores have no O_EXCL: the last writer wins, so check
        return bool(got) and got.get("token") == self.token

    def describe(self, info: dict) -> str:
        if not info:
            return "an unreadable lock"
        beat = float(info.get("heartbeat", 0) or 0)
        when = f"last heartbeat {time.time() - beat:.0f} s ago" if beat > 0 else "no heartbeat"
        since = f"since {info['since']}, " if info.get("since") else ""
        return (f"{info.get('command') or 'a convlens command'} (host {info.get('host')}, pid {info.get('pid')}, "
                f"{since}{when})")

    def acquire(self) -> StoreLock:
        for _ in range(3):
            if self._write_exclusive():
                self.held = True
                self._start_heartbeat()
                return self
            info = self.read()
            if info is None:
                continue  # released meanwhile: try again
            if info.get("token") == self.token:
                self.held = True
                self._start_heartbeat()
                return self
            same_host = info.get("host") == socket.gethostname()
            pid = info.get("pid")
            if same_host and isinstance(pid, int) and not _alive(pid, info.get("start")):
                self.note(f"taking over the stale lock of {self.describe(info)}: that process is no longer running")
                self._remove_file()
                continue
            age = time.time() - float(info.get("heartbeat", 0) or 0) if info else float("inf")
            stale = " It looks stale (no heartbeat for over 10 minutes)." if age > self.STALE else ""
            raise ConvlensError(f"{self.path} is in use by {self.describe(info)}.{stale} Wait for that run to "
                                f"finish; if it is gone, clear the lock with `convlens unlock {self.path}`")
        raise ConvlensError(f"cannot lock {self.path}: another run keeps taking it")

    def _remove_file(self) -> None:
        try:
            local = local_path(self.path)
            if local is not None:
                Path(self.file).unlink(missing_ok=True)
            else:
                fs, _ = _fs(self.path, self.storage_options)
                if fs.exists(self.file):
                    fs.rm(self.file)
        except OSError:
            pass

    def refresh(self) -> None:
        if not self.held:
            return
        info = self.read()
        if info and info.get("token") != self.token:
            return  # someone cleared and took it: never overwrite their lock
        data = {**(info or self._content()), "heartbeat": time.time()}
        try:
            local = local_path(self.path)
            if local is not None:
                tmp = self.file + f".{self.token}.tmp"
                Path(tmp).write_text(json.dumps(data))
                os.replace(tmp, self.file)
            else:
                fs, _ = _fs(self.path, self.storage_options)
                fs.pipe_file(self.file, json.dumps(data).encode())
        except OSError:
            pass

    def _start_heartbeat(self):
        def beat():
            while not self._stop.wait(self.HEARTBEAT):
                self.refresh()
        self._thread = threading.Thread(target=beat, daemon=True, name="convlens-lock-heartbeat")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.held:
            info = self.read()
            if info is not None and info.get("token") in (self.token, None):
                self._remove_file()
            self.held = False
            local = local_path(self.path)
            if self.created_dir and local is not None:
                try:
                    local.rmdir()  # only if empty: a run that failed before writing leaves nothing
                except OSError:
                    pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def unlock(path, storage_options=None) -> dict | None:
    """Removes a store's lock file (``convlens unlock``); returns what it said."""
    lock = StoreLock(path, storage_options)
    info = lock.read()
    if info is None:
        return None
    lock._remove_file()
    return info


def lock_info(path, storage_options=None) -> dict | None:
    return StoreLock(path, storage_options).read()


# ---------------------------------------------------------------- groups and arrays

def create(path, *, overwrite: bool = False, attrs: dict | None = None, storage_options=None,
           lock: StoreLock | None = None) -> zarr.Group:
    """A new, empty store at ``path`` with the root attributes.

    An existing path is replaced only if ``overwrite`` and it is a convlens store (and
    not locked by another run); anything else is refused with what is there."""
    if exists(path, storage_options) and not (lock is not None and lock.held and only_lock(path)):
        if not _is_store_object(path):
            check_replaceable(path, storage_options)
        if not overwrite:
            raise ConvlensError(f"{path} already exists; pass --overwrite to replace it, --resume to continue "
                                "it, or choose another --out")
        if not _is_store_object(path) and (lock is None or not lock.held):
            info = lock_info(path, storage_options)
            if info is not None:
                StoreLock(path, storage_options).acquire().release()  # refuses if a live run holds it
        remove(path, storage_options)
    from convlens import __version__
    with quiet():
        # A held lock file is the only thing in the folder: "a" keeps it ("w" would delete it).
        root = zarr.open_group(_store_arg(path), mode="a" if lock is not None and lock.held else "w-",
                               **_kw(path, storage_options))
    base = {"schema_version": SCHEMA_VERSION, "convlens_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "methods": {}}
    root.attrs.update(jsonable({**base, **(attrs or {})}))
    return root


def open_store(path, mode: str = "r", storage_options=None, consolidated: bool | None = None) -> zarr.Group:
    """An existing store (``mode`` ``r`` or ``r+``), or a clear error. A store opened for
    writing never trusts its consolidated metadata (a snapshot of the last finish)."""
    if consolidated is None:
        consolidated = mode == "r"
    if not _is_store_object(path):
        if not exists(path, storage_options):
            raise ConvlensError(f"{path}: no such store")
        if local_path(path) is not None and local_path(path).is_file():
            raise ConvlensError(f"{path} is a file, not a convlens store (a .zarr folder)")
    try:
        with quiet():
            root = zarr.open_group(_store_arg(path), mode=mode, use_consolidated=None if consolidated else False,
                                   **_kw(path, storage_options))
            attrs = dict(root.attrs)
    except Exception as e:  # noqa: BLE001 - zarr raises several types for a non-store
        raise ConvlensError(f"{path} is not a readable convlens Zarr store ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if "schema_version" not in attrs:
        raise ConvlensError(f"{path} is a Zarr group but not a convlens store (no schema_version attribute)")
    return root


def model_attrs(model) -> dict:
    return {"model": model.name, "model_source": model.source, "weights_sha256": model.weights_sha256,
            "preprocessing": model.preprocess_spec.describe(), "input_size": list(model.input_size),
            "precision": PRECISION_NOTES.get(model.precision, model.precision), "model_load_args": model.load_args,
            "head": "binary" if model.binary else ("multilabel" if model.multilabel else "multiclass")}


PRECISION_NOTES = {"full": "full: float32 at full precision (no TF32 or bfloat16 passes on any backend)",
                   "fast": "fast: bfloat16 compute (params and activations), float32 results"}


def fill_value(dtype) -> Any:
    dtype = np.dtype(dtype) if dtype is not str else dtype
    if dtype is str:
        return ""
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    if dtype.kind == "u":
        return 0
    return -1


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype, dims: tuple[str, ...] | None = None,
                 chunk: int = SAMPLE_CHUNK, fill=None) -> zarr.Array:
    """An empty array chunked ``chunk`` items along a leading ``sample`` (or ``filter``,
    ``epoch``) axis (whole otherwise), filled with `fill_value` until written. ``dims``
    default to the schema's declaration for ``name`` (given dims must match it)."""
    full = _full_path(group, name)
    declared = spec_for(full)
    if dims is None:
        dims = dims_for(full, len(shape))
    elif declared is not None and declared.dims is not None and len(shape) in declared.dims \
            and tuple(dims) not in allowed_dims(declared, len(shape)):
        raise ValueError(f"{full}: dims {tuple(dims)}, the schema declares {declared.dims[len(shape)]}")
    if len(dims) != len(shape):
        raise ValueError(f"{name}: {len(shape)}-D shape for dims {dims}")
    chunks = tuple(max(1, min(chunk, s) if d in ("sample", "filter", "epoch") else max(s, 1))
                   for d, s in zip(dims, shape))
    kind = str if (dtype is str or np.dtype(dtype).kind in "UO") else np.dtype(dtype)
    from zarr.codecs import ZstdCodec
    arr = group.create_array(name, shape=shape, dtype=kind, chunks=chunks, dimension_names=tuple(dims),
                             fill_value=fill_value(kind) if fill is None else fill,
                             compressors=ZstdCodec(level=0, checksum=True))
    return arr.with_config(WRITE_CONFIG)


# Every chunk written is a file, even one equal to the fill value (NaN maps of failed
# items), so a missing chunk file always means a lost one (see `convlens.engine.verify`);
# zstd frames carry a checksum, so a flipped bit fails to decode.
WRITE_CONFIG = {"write_empty_chunks": True}


def writable(group: zarr.Group, name: str) -> zarr.Array:
    """The array at ``name``, set to write every chunk (see `WRITE_CONFIG`)."""
    return group[name].with_config(WRITE_CONFIG)


def _full_path(group: zarr.Group, name: str) -> str:
    base = (group.path or "").strip("/")
    return f"{base}/{name}" if base else name


def write(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...] | None = None,
          chunk: int = SAMPLE_CHUNK) -> zarr.Array:
    """A whole array at once (small stores: ``explain``, ``activations``, ``weights``)."""
    data = np.asarray(data)
    arr = create_array(group, name, data.shape, str if data.dtype.kind in "UO" else data.dtype, dims, chunk)
    if data.size:
        arr[...] = data
    return arr


def jsonable(obj):
    """Configs and numpy values as plain JSON types."""
    if hasattr(obj, "__json__"):
        return obj.__json__()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def method_entry(spec, cfg, dims: dict[str, tuple[str, ...]] | None = None) -> dict:
    """A method's root-attribute entry: its config, outputs with dims, and its heatmap."""
    entry = {"config": jsonable(cfg), **spec.store_entry()}
    if dims is not None:
        entry["outputs"] = {k: list(v) for k, v in dims.items()}
    return entry


def add_method(root: zarr.Group, spec, cfg, outputs: dict[str, np.ndarray]) -> None:
    """Writes a method's whole outputs under ``/<method>/`` and records its config."""
    dims = spec.dims
    for name, data in outputs.items():
        write(root, f"{spec.name}/{name}", data, dims[name])
    methods = dict(root.attrs.get("methods", {}))
    methods[spec.name] = method_entry(spec, cfg, {k: dims[k] for k in outputs})
    root.attrs["methods"] = methods


def clean_partials(path) -> int:
    """Removes the temporary files an interrupted chunk write leaves (local stores)."""
    local = local_path(path)
    if local is None or not local.is_dir():
        return 0
    n = 0
    for p in local.rglob("*.partial"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def finish(path, storage_options=None) -> None:
    """Consolidates metadata (one read opens the whole store)."""
    with quiet():
        zarr.consolidate_metadata(_store_arg(path), **_kw(path, storage_options))


def describe(root: zarr.Group) -> dict[str, Any]:
    """Every array's shape, dtype, dims and chunks."""
    out = {}

    def walk(g, prefix=""):
        for name, member in sorted(g.members(), key=lambda m: m[0]):
            full = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                walk(member, full + "/")
            else:
                out[full] = {"shape": tuple(member.shape), "dtype": str(member.dtype),
                             "dims": tuple(member.metadata.dimension_names or ()),
                             "chunks": tuple(member.chunks)}
    with quiet():
        walk(root)
    return out


def _dtype_ok(declared: str, actual: str) -> bool:
    if declared == "any":
        return True
    if declared == "str":
        return "str" in actual.lower() or actual.startswith("<U") or "string" in actual.lower()
    return np.dtype(declared) == np.dtype(actual) if not actual.lower().startswith(("str", "<u")) else False


def validate(root: zarr.Group) -> list[str]:
    """Problems with a store against `SCHEMA` and the method registry (empty = fine):
    every array of every layout is checked for its declared dims and dtype."""
    problems = []
    attrs = dict(root.attrs)
    for key in ("schema_version", "convlens_version", "model", "created", "methods"):
        if key not in attrs:
            problems.append(f"root attribute {key!r} missing")
    arrays = describe(root)
    methods = attrs.get("methods", {}) or {}
    training = "training" in attrs
    n = arrays.get("ids", {}).get("shape", (None,))[0]
    try:
        from convlens.kernels.registry import METHODS
    except Exception:  # noqa: BLE001 - validating without JAX: the store's own declarations only
        METHODS = {}
    for name, a in arrays.items():
        if len(a["dims"]) != len(a["shape"]):
            problems.append(f"{name}: dimension_names {a['dims']} do not match shape {a['shape']}")
            continue
        head = name.split("/", 1)[0]
        if head in methods and not name.startswith(("audit/", "atlas/")):
            out = name.split("/", 1)[1]
            declared = {o: tuple(d) for o, d in (methods[head].get("outputs") or {}).items()}
            if head in METHODS:
                declared.update(METHODS[head].dims)
            if out not in declared:
                problems.append(f"{name}: not an output of {head}")
                continue
            want = (("epoch",) if training else ()) + tuple(declared[out])
            if a["dims"] != want:
                problems.append(f"{name}: dims {a['dims']}, declared {want}")
            if n is not None and a["shape"][len(want) - len(declared[out])] != n:
                problems.append(f"{name}: {a['shape'][0]} items, ids has {n}")
            continue
        spec = spec_for(name)
        if spec is None:
            problems.append(f"{name}: not in the store schema")
            continue
        try:
            want = dims_for(name, len(a["shape"]))
        except ValueError as e:
            problems.append(str(e))
            continue
        if len(a["shape"]) in (spec.dims or {}) and a["dims"] in allowed_dims(spec, len(a["shape"])):
            want = a["dims"]
        if a["dims"] != want:
            problems.append(f"{name}: dims {a['dims']}, schema says {want}")
        if not _dtype_ok(spec.dtype, a["dtype"]):
            problems.append(f"{name}: dtype {a['dtype']}, schema says {spec.dtype}")
        if "sample" in want and n is not None and a["shape"][want.index("sample")] != n and not training:
            problems.append(f"{name}: {a['shape'][want.index('sample')]} items, ids has {n}")
    for method, entry in methods.items():
        for out in (entry.get("outputs") or {}):
            if f"{method}/{out}" not in arrays:
                problems.append(f"{method}/{out}: declared in attrs but missing")
        if method in METHODS and "training" not in attrs or method in METHODS and f"{method}/targets" in arrays:
            for out in METHODS[method].dims:
                if f"{method}/{out}" not in arrays:
                    problems.append(f"{method}/{out}: declared by the registry but not in the store")
    return problems


def dumps(obj) -> str:
    return json.dumps(jsonable(obj), default=str)


def fingerprint(*parts) -> str:
    """sha256 of ``parts`` as JSON: what must match for ``--resume`` to continue a store."""
    import hashlib
    return hashlib.sha256(dumps(list(parts)).encode("utf-8", "surrogateescape")).hexdigest()
