"""The convlens Zarr store: how a store is written, from creating it to consolidating it.

A store is a Zarr v3 group (a local ``*.zarr`` directory, or any fsspec URL such as
``s3://bucket/run.zarr``) that ``xarray.open_zarr`` opens: every array carries
``dimension_names``, chunks are compressed (zstd with a checksum), and metadata is
consolidated when a command finishes. Its arrays are declared in `convlens.engine.schema`
(`create_layout` makes a layout's arrays from there); who may replace what is in
`convlens.engine.ownership`; one writer at a time is `convlens.engine.lock`.

Every command that writes a store goes through one lifecycle, `open_for_write`: refuse
a path that is not ours, refuse an existing store unless told to overwrite or resume,
take the lock, then create, replace, or (resume) check the fingerprint, clean the
partial files a killed write leaves and verify every chunk it would trust.

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
  ``data_sample`` (sampled content hashes of the data) and, once finished, ``run``:
  ``{"items", "done", "failed", "seconds", "items_per_second",
  "method_seconds_per_item": {method: s}, "processes", "finished", "verified"}``;
  atlases ``atlas``; training stores ``training``; audits ``audit``.

Local stores are written atomically per chunk file (Zarr writes a temporary file and
renames it), so ``kill -9`` leaves at worst a stray ``*.partial`` file, which resuming
removes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import numpy as np
import zarr

from convlens.engine.lock import StoreLock, lock_info
from convlens.engine.ownership import (_is_store_object, _kw, _store_arg, check_replaceable, exists, local_path,
                                       only_lock, quiet, remove)
from convlens.engine.schema import SAMPLE_CHUNK, SCHEMA_VERSION, allowed_dims, dims_for, spec_for
from convlens.errors import ConvlensError


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
    # Chunked along the axes whose slices different writers own: items (runs), filters
    # (atlases), epochs (training), processes (each process's own timing row).
    per = {"sample": chunk, "filter": chunk, "epoch": chunk, "process": 1}
    chunks = tuple(max(1, min(per[d], s) if d in per else max(s, 1)) for d, s in zip(dims, shape))
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


def dumps(obj) -> str:
    return json.dumps(jsonable(obj), default=str)


def fingerprint(*parts) -> str:
    """sha256 of ``parts`` as JSON: what must match for ``--resume`` to continue a store."""
    import hashlib
    return hashlib.sha256(dumps(list(parts)).encode("utf-8", "surrogateescape")).hexdigest()


def create_layout(root: zarr.Group, layout: str, sizes: dict[str, int], *, chunk: int = SAMPLE_CHUNK,
                  values: dict | None = None, include=(), name: str | None = None) -> None:
    """Creates the arrays the schema declares for ``layout`` (`convlens.engine.schema.SCHEMA`):
    each shaped from ``sizes`` (a size per dimension name) and filled with ``values`` where
    given, else left at its fill value until written. Optional arrays are made where their
    values are given or ``include`` names them; a family's ``*`` is ``name`` (an atlas's
    layer)."""
    from convlens.engine.schema import SCHEMA
    values = dict(values or {})
    for spec in SCHEMA:
        if spec.layout != layout or spec.dims is None:
            continue
        path = spec.pattern.replace("*", name) if "*" in spec.pattern and name else spec.pattern
        if "*" in path or (spec.optional and path not in values and path not in include):
            continue
        (ndim, dims), = [(k, v) for k, v in spec.dims.items()][:1]
        dims = dims[0] if isinstance(dims[0], tuple) else dims
        if path in values:
            data = np.asarray(values.pop(path))
            write(root, path, data, dims, chunk)
            continue
        shape = tuple(sizes[d] for d in dims)
        create_array(root, path, shape, str if spec.dtype == "str" else np.dtype(spec.dtype), dims, chunk,
                     fill=spec.fill)
    if values:
        raise ValueError(f"values for arrays the {layout} layout does not declare: {', '.join(values)}")


MODES = ("new", "overwrite", "resume")


def preflight(path, mode: str = "new", storage_options=None, what: str = "--out") -> None:
    """Refuses at once (before a model or data set is loaded) what `open_for_write` would
    refuse for ``path``: anything that is not a convlens store, and an existing store
    without ``overwrite`` or ``resume``."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    if exists(path, storage_options) and not only_lock(path):
        check_replaceable(path, storage_options, what)
        if mode == "new":
            raise ConvlensError(f"{path} already exists; pass --overwrite to replace it, --resume to continue it, "
                                f"or choose another {what}")


@dataclasses.dataclass
class Writing:
    """A store open for writing (`open_for_write`): its root group, the lock this command
    holds (released by `close`, or by leaving a ``with`` block), whether it was resumed,
    and what resuming found damaged (``{array: chunks}``, recomputed by the caller)."""

    root: zarr.Group
    lock: StoreLock | None
    resumed: bool = False
    damaged: dict = dataclasses.field(default_factory=dict)
    report: Any = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_for_write(path, mode: str, *, fingerprint: str | None = None, attrs: dict | None = None,
                   storage_options=None, command: str = "", note=None, lock: StoreLock | None = None,
                   verify_full: bool = False, what: str = "--out",
                   differs: str = "a different run (model, weights, data, methods, options or chunking differ)"
                   ) -> Writing:
    """The one way a command opens a store to write it.

    Args:
      path: the store (a local path, an fsspec URL or a zarr store object).
      mode: ``new`` (refuse an existing store), ``overwrite`` (replace a convlens store,
        never anything else, never one in use) or ``resume`` (continue the store there if
        its ``fingerprint`` matches, else refuse; create it if there is none).
      fingerprint: what must match for a resume (recorded in the root attributes).
      attrs: root attributes of a new store.
      lock: a lock the caller already holds (a multi-process run's process 0), else one is
        taken here and released by `Writing.close`.
      verify_full: on resume, decode every chunk (not only check its files).
      differs: what the refusal of a resume says wrote the store instead.

    Returns:
      A `Writing`; on resume its ``damaged`` chunks are to be recomputed.
    """
    preflight(path, mode, storage_options, what)
    own = lock is None and not _is_store_object(path)
    if own:
        lock = StoreLock(path, storage_options, command, note=note).acquire()
    try:
        note = note or (lambda msg: None)
        if mode == "resume" and exists(path, storage_options) and not only_lock(path):
            root = open_store(path, "r+", storage_options)
            if fingerprint is not None and root.attrs.get("fingerprint") != fingerprint:
                raise ConvlensError(f"{path} was written by {differs}, so --resume cannot continue it; use "
                                    f"--overwrite or another {what}")
            clean_partials(path)
            from convlens.engine.verify import repair
            report = repair(root, full=verify_full)
            if report.problems:
                note(f"resume: {report.summary()}; recomputing those chunks")
            return Writing(root, lock if own else None, True, dict(report.broken), report)
        full = dict(attrs or {})
        if fingerprint is not None:
            full["fingerprint"] = fingerprint
        root = create(path, overwrite=mode == "overwrite", attrs=full, storage_options=storage_options, lock=lock)
        return Writing(root, lock if own else None)
    except BaseException:
        if own and lock is not None:
            lock.release()
        raise


def layout_of(path: str) -> str:
    """The layout of the schema an array path belongs to (``video/time`` -> ``video``)."""
    from convlens.engine.schema import spec_for
    spec = spec_for(path)
    if spec is None:
        raise ValueError(f"{path}: not in the store schema")
    return spec.layout
