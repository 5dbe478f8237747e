"""The convlens Zarr store. This docstring is the schema.

A store is a Zarr v3 directory (``*.zarr``) that ``xarray.open_zarr`` opens: every array
carries ``dimension_names``, and metadata is consolidated when the writer finishes.

Root attributes:
  ``schema_version`` (int), ``convlens_version``, ``model`` (name), ``model_source``
  (weights file or ``random-init:SEED``), ``weights_sha256`` (or null),
  ``preprocessing``, ``input_size`` ([H, W]), ``created`` (ISO time), ``command``, and
  ``methods``: ``{method: {"config": {...}, "outputs": {name: dims}}}``.

Arrays (``N`` = items, chunked along ``sample``):
  ``ids`` [N] str                       the item's name (file path, or index)
  ``predictions/topk_index`` [N, k] i4  top classes, best first
  ``predictions/topk_prob`` [N, k] f4   their probabilities (softmax/sigmoid output)
  ``<method>/<output>``                  each output the method registry declares,
                                         e.g. ``gradcam/heatmap`` [N, T, H, W] f4
  ``activations/<layer>`` [N, ...] f4   from ``convlens activations``
  ``weights/<layer>/kernel``, ``weights/<layer>/filters``   from ``convlens weights``
                                         (no sample axis: dims ``kh, kw, c_in, c_out``
                                         and ``filter, ...``)

A store is never overwritten unless asked (``overwrite=True``).
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

SCHEMA_VERSION = 1
SAMPLE_CHUNK = 16


def create(path: str | Path, *, overwrite: bool = False, attrs: dict | None = None) -> zarr.Group:
    """A new, empty store at ``path`` with the root attributes."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise ConvlensError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    from convlens import __version__
    root = zarr.open_group(str(path), mode="w-")
    base = {"schema_version": SCHEMA_VERSION, "convlens_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "methods": {}}
    root.attrs.update({**base, **(attrs or {})})
    return root


def model_attrs(model) -> dict:
    return {"model": model.name, "model_source": model.source, "weights_sha256": model.weights_sha256,
            "preprocessing": model.preprocess_spec.describe(), "input_size": list(model.input_size)}


def write(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...]) -> zarr.Array:
    """One array, chunked along its first (sample) axis when it has ``sample`` first."""
    data = np.asarray(data)
    if len(dims) != data.ndim:
        raise ValueError(f"{name}: {data.ndim}-D data for dims {dims}")
    chunks = tuple(min(SAMPLE_CHUNK, s) if d == "sample" else s for d, s in zip(dims, data.shape))
    chunks = tuple(max(c, 1) for c in chunks)
    dtype = str if data.dtype.kind in "UO" else data.dtype
    arr = group.create_array(name, shape=data.shape, dtype=dtype, chunks=chunks, dimension_names=dims)
    arr[...] = data
    return arr


def _jsonable(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return {k: v for k, v in dataclasses.asdict(cfg).items()}
    return dict(cfg or {})


def add_method(root: zarr.Group, method: str, cfg, outputs: dict[str, np.ndarray],
               dims: dict[str, tuple[str, ...]]) -> None:
    """Writes a method's outputs under ``/<method>/`` and records its config."""
    for name, data in outputs.items():
        write(root, f"{method}/{name}", data, dims[name])
    methods = dict(root.attrs.get("methods", {}))
    methods[method] = {"config": _jsonable(cfg), "outputs": {k: list(dims[k]) for k in outputs}}
    root.attrs["methods"] = methods


def finish(path: str | Path) -> None:
    """Consolidates metadata (one read opens the whole store)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path))


def open_store(path: str | Path) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise ConvlensError(f"{path}: no such store")
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises several types for a non-store
        raise ConvlensError(f"{path} is not a convlens Zarr store ({e})") from None


def describe(root: zarr.Group) -> dict[str, Any]:
    """Every array's shape, dtype and dims (for `convlens info` and tests)."""
    out = {}

    def walk(g, prefix=""):
        for name, member in g.members():
            full = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                walk(member, full + "/")
            else:
                out[full] = {"shape": tuple(member.shape), "dtype": str(member.dtype),
                             "dims": tuple(member.metadata.dimension_names or ())}
    walk(root)
    return out


def dumps(obj) -> str:
    return json.dumps(obj, default=str)
