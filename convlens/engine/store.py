"""The convlens Zarr store. This docstring is the schema.

A store is a Zarr v3 group (a local ``*.zarr`` directory, or any fsspec URL such as
``s3://bucket/run.zarr``) that ``xarray.open_zarr`` opens: every array carries
``dimension_names``, chunks are compressed (Zarr's default zstd), and metadata is
consolidated when the run finishes.

Root attributes:
  ``schema_version`` (int), ``convlens_version``, ``model`` (name), ``model_source``
  (weights file or ``random-init:SEED``), ``weights_sha256`` (or null),
  ``preprocessing``, ``input_size`` ([H, W]), ``model_load_args`` (how to load the model
  again: ``convlens.load_model`` keywords, or null for a model built in Python),
  ``created`` (ISO time), ``command``,
  ``methods``: ``{method: {"config": {...}, "outputs": {name: dims}}}``, and for
  data-set runs ``source`` (what was read), ``resize`` (squash/crop/pad), ``target``
  (the target spec), ``class_names`` (or null), ``chunk`` (items per chunk),
  ``video`` (video runs: ``{"files", "fps", "frames", "every", "duration", "size"}``),
  ``fingerprint`` (what must match for ``--resume``) and, once finished, ``run``:
  ``{"items", "done", "failed", "seconds", "items_per_second",
  "method_seconds_per_item": {method: s}, "processes", "finished"}``.

Arrays (``N`` items; every array with a ``sample`` axis is chunked ``chunk`` items
along it, and each chunk is written whole by exactly one process):
  ``ids`` [N] str                        the item's name (file path, ``name/split/i``, index)
  ``labels`` [N] i4                      ground-truth class, -1 where unknown
  ``status`` [N] u1                      0 pending, 1 done, 2 failed
  ``errors`` [N] str                     why an item failed ("" otherwise)
  ``predictions/topk_index`` [N, k] i4   top classes, best first (-1 for failed items)
  ``predictions/topk_prob`` [N, k] f4    their probabilities (softmax/sigmoid output)
  ``<method>/<output>``                   each output the method registry declares,
                                          e.g. ``gradcam/heatmap`` [N, T, H, W] f4;
                                          NaN (float) or -1 (int) for failed items
  ``inputs`` [N, H, W, 3] u1             the resized images (``--keep-inputs``)
  ``masks`` [N, H, W] bool               object masks, where the source has them
  ``video/file``, ``video/frame`` [N] i4  video runs: the item's file (index into the root
                                          attribute ``video.files``) and frame number
  ``video/time`` [N] f8                  video runs: the frame's time in seconds from the
                                          file's first frame
  ``timing/method_seconds`` [P, M] f8    per process, seconds spent in each method
                                          (``timing`` attrs: ``methods``), for ``compare``
  ``activations/<layer>`` [N, ...] f4    from ``convlens activations``
  ``weights/<layer>/kernel``, ``weights/<layer>/filters``   from ``convlens weights``
                                          (no sample axis)

Resume rule: an item's ``status`` chunk is written after every other array's chunk of
the same items, so a chunk whose status is all non-zero is complete; anything else is
recomputed. Local stores are written atomically per chunk file (Zarr writes a temporary
file and renames it), so ``kill -9`` leaves at worst a stray ``*.partial`` file, which
resuming removes. A store is never replaced unless asked (``overwrite=True``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from convlens.errors import ConvlensError

SCHEMA_VERSION = 2
SAMPLE_CHUNK = 16
PENDING, DONE, FAILED = 0, 1, 2


def is_url(path) -> bool:
    return isinstance(path, (str, Path)) and "://" in str(path) and not str(path).startswith("file://")


def _is_store_object(path) -> bool:
    return not isinstance(path, (str, Path))  # a zarr Store instance (e.g. MemoryStore)


def _local(path) -> Path | None:
    if _is_store_object(path):
        return None
    s = str(path)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return None if is_url(s) else Path(s)


def exists(path, storage_options=None) -> bool:
    if _is_store_object(path):
        return bool(getattr(path, "_store_dict", None))
    local = _local(path)
    if local is not None:
        return local.exists()
    import fsspec
    fs, p = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    return fs.exists(p)


def remove(path, storage_options=None) -> None:
    if _is_store_object(path):
        return
    local = _local(path)
    if local is not None:
        if local.is_dir():
            shutil.rmtree(local)
        elif local.exists():
            local.unlink()
        return
    import fsspec
    fs, p = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    if fs.exists(p):
        fs.rm(p, recursive=True)


def _store_arg(path):
    if _is_store_object(path):
        return path
    local = _local(path)
    return str(local) if local is not None else str(path)


def create(path, *, overwrite: bool = False, attrs: dict | None = None, storage_options=None) -> zarr.Group:
    """A new, empty store at ``path`` with the root attributes."""
    if exists(path, storage_options):
        if not overwrite:
            raise ConvlensError(f"{path} already exists; pass --overwrite to replace it, --resume to continue "
                                "it, or choose another --out")
        remove(path, storage_options)
    from convlens import __version__
    kw = {"storage_options": storage_options} if is_url(path) else {}
    root = zarr.open_group(_store_arg(path), mode="w-", **kw)
    base = {"schema_version": SCHEMA_VERSION, "convlens_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "methods": {}}
    root.attrs.update(jsonable({**base, **(attrs or {})}))
    return root


def open_store(path, mode: str = "r", storage_options=None) -> zarr.Group:
    """An existing store (``mode`` ``r`` or ``r+``), or a clear error."""
    if not _is_store_object(path) and not exists(path, storage_options):
        raise ConvlensError(f"{path}: no such store")
    kw = {"storage_options": storage_options} if is_url(path) else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            root = zarr.open_group(_store_arg(path), mode=mode, **kw)
    except Exception as e:  # noqa: BLE001 - zarr raises several types for a non-store
        raise ConvlensError(f"{path} is not a convlens Zarr store ({type(e).__name__}: {e})") from None
    if "schema_version" not in root.attrs:
        raise ConvlensError(f"{path} is a Zarr group but not a convlens store (no schema_version attribute)")
    return root


def model_attrs(model) -> dict:
    return {"model": model.name, "model_source": model.source, "weights_sha256": model.weights_sha256,
            "preprocessing": model.preprocess_spec.describe(), "input_size": list(model.input_size),
            "model_load_args": getattr(model, "load_args", None)}


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


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype, dims: tuple[str, ...],
                 chunk: int = SAMPLE_CHUNK, fill=None) -> zarr.Array:
    """An empty array chunked ``chunk`` items along a leading ``sample`` axis (whole
    otherwise), filled with `fill_value` until written."""
    if len(dims) != len(shape):
        raise ValueError(f"{name}: {len(shape)}-D shape for dims {dims}")
    chunks = tuple(max(1, min(chunk, s) if d == "sample" else s) for d, s in zip(dims, shape))
    kind = str if (dtype is str or np.dtype(dtype).kind in "UO") else np.dtype(dtype)
    return group.create_array(name, shape=shape, dtype=kind, chunks=chunks, dimension_names=dims,
                              fill_value=fill_value(kind) if fill is None else fill)


def write(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...],
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
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def method_entry(cfg, dims: dict[str, tuple[str, ...]]) -> dict:
    return {"config": jsonable(cfg), "outputs": {k: list(v) for k, v in dims.items()}}


def add_method(root: zarr.Group, method: str, cfg, outputs: dict[str, np.ndarray],
               dims: dict[str, tuple[str, ...]]) -> None:
    """Writes a method's whole outputs under ``/<method>/`` and records its config."""
    for name, data in outputs.items():
        write(root, f"{method}/{name}", data, dims[name])
    methods = dict(root.attrs.get("methods", {}))
    methods[method] = method_entry(cfg, {k: dims[k] for k in outputs})
    root.attrs["methods"] = methods


def clean_partials(path) -> int:
    """Removes the temporary files an interrupted chunk write leaves (local stores)."""
    local = _local(path)
    if local is None or not local.is_dir():
        return 0
    n = 0
    for p in local.rglob("*.partial"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def finish(path, storage_options=None) -> None:
    """Consolidates metadata (one read opens the whole store)."""
    kw = {"storage_options": storage_options} if is_url(path) else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(_store_arg(path), **kw)


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
    walk(root)
    return out


def validate(root: zarr.Group) -> list[str]:
    """Problems with a store against this schema and the method registry (empty = fine)."""
    from convlens.kernels.registry import METHODS, all_outputs

    problems = []
    attrs = dict(root.attrs)
    for key in ("schema_version", "convlens_version", "model", "created", "methods"):
        if key not in attrs:
            problems.append(f"root attribute {key!r} missing")
    arrays = describe(root)
    for name, a in arrays.items():
        if len(a["dims"]) != len(a["shape"]):
            problems.append(f"{name}: dimension_names {a['dims']} do not match shape {a['shape']}")
    n = arrays.get("ids", {}).get("shape", (None,))[0]
    fixed = {"ids": ("sample",), "labels": ("sample",), "status": ("sample",), "errors": ("sample",),
             "predictions/topk_index": ("sample", "rank"), "predictions/topk_prob": ("sample", "rank"),
             "inputs": ("sample", "y", "x", "rgb"), "masks": ("sample", "y", "x")}
    for name, dims in fixed.items():
        if name in arrays and arrays[name]["dims"] != dims:
            problems.append(f"{name}: dims {arrays[name]['dims']}, schema says {dims}")
    for method, entry in attrs.get("methods", {}).items():
        spec = METHODS.get(method)
        if spec is None:
            continue  # written by a newer convlens
        declared = {o.name: o.dims for o in all_outputs(spec)}
        for out, dims in entry.get("outputs", {}).items():
            key = f"{method}/{out}"
            if key not in arrays:
                problems.append(f"{key}: declared in attrs but missing")
                continue
            if out in declared and arrays[key]["dims"] != declared[out]:
                problems.append(f"{key}: dims {arrays[key]['dims']}, registry declares {declared[out]}")
            if n is not None and arrays[key]["shape"][0] != n:
                problems.append(f"{key}: {arrays[key]['shape'][0]} items, ids has {n}")
        for out in declared:
            if f"{method}/{out}" not in arrays:
                problems.append(f"{method}/{out}: declared by the registry but not in the store")
    return problems


def dumps(obj) -> str:
    return json.dumps(jsonable(obj), default=str)
