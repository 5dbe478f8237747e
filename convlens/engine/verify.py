"""Is a store what it says it is? ``convlens verify STORE`` and the check every run ends with.

A chunk of items marked complete (its ``status`` values all non-zero) promises that every
array with that item axis holds that chunk. `verify` checks the promise:

* **cheap** (the default, and what every run and every ``--resume`` does): every such
  chunk file exists and is a well-formed zstd frame of the right length (the frame and
  block headers are walked, no data decoded), which catches deleted, truncated and
  extended chunk files and deleted arrays without reading the data;
* **full** (``--full``): every chunk of every array is decoded (zstd checksums catch
  flipped bits) and the method outputs of completed items are finite.

`repair` marks the items of every broken chunk pending again (their status chunk is
rewritten), so a resumed run recomputes exactly what was lost.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np

from convlens.engine import schema, store
from convlens.errors import ConvlensError

ZSTD_MAGIC = 0xFD2FB528


class _Bytes:
    """Random access to a chunk's bytes: in memory, or a local file read header by header."""

    def __init__(self, data: bytes | None = None, f=None, size: int = 0):
        self.data, self.f, self.size = data, f, (len(data) if data is not None else size)

    def __len__(self):
        return self.size

    def __getitem__(self, sl: slice) -> bytes:
        if self.data is not None:
            return self.data[sl]
        self.f.seek(sl.start)
        return self.f.read(sl.stop - sl.start)


def zstd_frames_ok(data) -> str | None:
    """``None`` if ``data`` (bytes, or `_Bytes`) is a sequence of complete zstd frames, else
    what is wrong (walks the frame and block headers only: a few bytes per 128 KiB block)."""
    if isinstance(data, (bytes, bytearray)):
        data = _Bytes(bytes(data))
    pos, n = 0, len(data)
    if n == 0:
        return "empty file"
    while pos < n:
        if n - pos < 4:
            return "truncated (partial frame header)"
        magic = int.from_bytes(data[pos:pos + 4], "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame
            if n - pos < 8:
                return "truncated (skippable frame header)"
            pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "little")
            continue
        if magic != ZSTD_MAGIC:
            return "not a zstd frame (bad magic number)"
        pos += 4
        if pos >= n:
            return "truncated (no frame header)"
        fhd = data[pos:pos + 1][0]
        pos += 1
        fcs_flag, single, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
        if (fhd >> 3) & 1:
            return "corrupt frame header (reserved bit set)"
        pos += (0 if single else 1) + (0, 1, 2, 4)[did_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
        while True:
            if n - pos < 3:
                return "truncated (inside a block header)"
            bh = int.from_bytes(data[pos:pos + 3], "little")
            pos += 3
            last, btype, size = bh & 1, (bh >> 1) & 3, bh >> 3
            if btype == 3:
                return "corrupt block (reserved type)"
            pos += 1 if btype == 1 else size
            if pos > n:
                return "truncated (a block runs past the end of the file)"
            if last:
                break
        if checksum:
            pos += 4
            if pos > n:
                return "truncated (checksum missing)"
    return None


@dataclasses.dataclass
class Report:
    """What `verify` found: ``problems`` as ``(array, chunk index along the item axis or
    None, what)``, per item group the item ranges to recompute, and counts."""

    problems: list[tuple[str, int | None, str]] = dataclasses.field(default_factory=list)
    broken: dict[str, set[int]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    arrays: int = 0
    chunks: int = 0
    full: bool = False

    def lines(self) -> list[str]:
        by_array: dict[str, list[tuple[int | None, str]]] = defaultdict(list)
        for name, c, what in self.problems:
            by_array[name].append((c, what))
        out = []
        for name, items in sorted(by_array.items()):
            chunks = [c for c, _ in items if c is not None]
            whats = sorted({w for _, w in items})
            where = f"chunk(s) {', '.join(map(str, chunks[:8]))}" + (" ..." if len(chunks) > 8 else "") \
                if chunks else "whole array"
            out.append(f"{name}: {where}: {'; '.join(whats)}")
        return out

    def summary(self) -> str:
        if not self.problems:
            return f"{self.arrays} arrays, {self.chunks} chunks checked ({'full' if self.full else 'cheap'}): no problem"
        n_chunks = sum(len(v) for v in self.broken.values())
        return (f"{len(self.problems)} problem(s) in {len({p[0] for p in self.problems})} array(s): "
                f"{n_chunks} chunk(s) of items to recompute")


def _item_groups(root) -> dict[str, str]:
    """Groups whose arrays share an item axis, each with its status array: the store's
    root (``sample``) and each atlas layer (``filter``)."""
    out = {}
    if "status" in root:
        out[""] = "status"
    if "atlas" in root:
        for layer in root["atlas"].group_keys():
            if "status" in root[f"atlas/{layer}"]:
                out[f"atlas/{layer}/"] = f"atlas/{layer}/status"
    return out


UNKNOWN = 255  # a status value that could not be read: the chunk is broken


def _read_status(root, name: str, group: str, rep: Report) -> np.ndarray:
    """A status array read chunk by chunk; a chunk that does not decode reads as `UNKNOWN`
    and is reported broken (its items are recomputed)."""
    arr = root[name]
    out = np.full(arr.shape[0], UNKNOWN, np.uint8)
    size = arr.chunks[0]
    for c in range(-(-arr.shape[0] // size)):
        lo, hi = c * size, min(arr.shape[0], (c + 1) * size)
        try:
            out[lo:hi] = np.asarray(arr[lo:hi])
        except Exception as e:  # noqa: BLE001 - any decode failure: the chunk's state is unknown
            rep.problems.append((name, c, f"does not decode ({type(e).__name__})"))
            rep.broken[group].add(c)
    return out


def _chunk_keys(arr, c: int):
    """Every chunk key of ``arr`` for chunk ``c`` along its first axis."""
    grid = [-(-s // k) for s, k in zip(arr.shape, arr.chunks)]
    for rest in itertools.product(*[range(g) for g in grid[1:]]):
        yield arr.metadata.encode_chunk_key((c, *rest))


def _local_root(root):
    r = getattr(root.store, "root", None)
    return None if r is None else Path(str(r))


def _chunk_ok(root, arr, key: str) -> str | None:
    """What is wrong with one chunk file (missing, truncated, not zstd), or ``None``."""
    local = _local_root(root)
    if local is not None:
        path = local / arr.path / key
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "chunk file missing"
        with open(path, "rb") as f:
            return zstd_frames_ok(_Bytes(f=f, size=size))
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    buf = sync(root.store.get(f"{arr.path}/{key}", prototype=default_buffer_prototype()))
    return "chunk file missing" if buf is None else zstd_frames_ok(buf.to_bytes())


def _metadata_exists(root, arr) -> bool:
    local = _local_root(root)
    if local is not None:
        return (local / arr.path / "zarr.json").is_file()
    from zarr.core.sync import sync
    return bool(sync(root.store.exists(f"{arr.path}/zarr.json")))


def verify(root, full: bool = False) -> Report:
    """Checks a store's completed chunks (see the module docstring)."""
    rep = Report(full=full)
    arrays = schema.describe(root)
    groups = _item_groups(root)
    status = {}
    for g, s in groups.items():
        if s in arrays:
            status[g] = _read_status(root, s, g, rep)
    for name, info in arrays.items():
        rep.arrays += 1
        try:
            arr = root[name]
        except Exception as e:  # noqa: BLE001 - unreadable metadata
            rep.problems.append((name, None, f"metadata unreadable ({type(e).__name__})"))
            continue
        if not _metadata_exists(root, arr):
            rep.problems.append((name, None, "array missing"))
            continue
        group = next((g for g in sorted(groups, key=len, reverse=True) if name.startswith(g)), None)
        st = status.get(group) if group is not None else None
        itemwise = st is not None and len(info["shape"]) > 0 and info["shape"][0] == len(st) and \
            info["dims"][:1] in (("sample",), ("filter",))
        if not itemwise:
            if full:
                try:
                    np.asarray(arr[...])
                except Exception as e:  # noqa: BLE001 - any decode failure is a problem
                    rep.problems.append((name, None, f"does not decode ({type(e).__name__})"))
            continue
        size = arr.chunks[0]
        n_chunks = -(-len(st) // size)
        for c in range(n_chunks):
            if (st[c * size:(c + 1) * size] == schema.PENDING).any():
                continue  # not promised yet
            rep.chunks += 1
            why = _check_chunk(root, arr, c, full, st)
            if why:
                rep.problems.append((name, c, why))
                rep.broken[group].add(c)
    # Arrays the store's attributes declare that are gone entirely.
    for method, entry in (dict(root.attrs).get("methods") or {}).items():
        for out in (entry.get("outputs") or {}):
            if f"{method}/{out}" not in arrays:
                rep.problems.append((f"{method}/{out}", None, "array missing"))
    if any(what == "array missing" for _, _, what in rep.problems) and "" in groups:
        st = status.get("")
        if st is not None:  # every completed chunk lost that array's values
            size = int(dict(root.attrs).get("chunk") or schema.SAMPLE_CHUNK)
            rep.broken[""].update(c for c in range(-(-len(st) // size))
                                  if not (st[c * size:(c + 1) * size] == schema.PENDING).any())
    return rep


def _check_chunk(root, arr, c: int, full: bool, st: np.ndarray | None) -> str | None:
    for key in _chunk_keys(arr, c):
        try:
            why = _chunk_ok(root, arr, key)
        except Exception as e:  # noqa: BLE001 - an unreadable file is a broken chunk
            return f"unreadable ({type(e).__name__})"
        if why:
            return why
    if full:
        lo, hi = c * arr.chunks[0], min(arr.shape[0], (c + 1) * arr.chunks[0])
        try:
            values = np.asarray(arr[lo:hi])
        except Exception as e:  # noqa: BLE001 - zstd checksum or codec errors
            return f"does not decode ({type(e).__name__})"
        if values.dtype.kind == "f" and not arr.path.startswith(("audit/", "timing/")):
            if st is not None and arr.path.split("/")[0] in (dict(root.attrs).get("methods") or {}):
                done = st[lo:hi] == schema.DONE
                if done.any() and not np.isfinite(values[done].reshape(int(done.sum()), -1)).all():
                    return "non-finite values for completed items"
    return None


def repair(root, full: bool = False) -> Report:
    """Verifies ``root`` and marks every broken chunk's items pending (a resumed run then
    recomputes them); recreates arrays that are missing entirely. Returns the report."""
    rep = verify(root, full)
    if not rep.problems:
        return rep
    _recreate_missing(root, rep)
    groups = _item_groups(root)
    for group, chunks in rep.broken.items():
        s_name = groups.get(group)
        if s_name is None:
            continue
        arr = store.writable(root, s_name)
        size = arr.chunks[0]
        for c in sorted(chunks):
            lo, hi = c * size, min(arr.shape[0], (c + 1) * size)
            try:
                arr[lo:hi] = schema.PENDING
            except Exception:  # noqa: BLE001 - a damaged status chunk: delete and rewrite it
                for key in _chunk_keys(arr, c):
                    from zarr.core.sync import sync
                    sync(root.store.delete(f"{arr.path}/{key}"))
                arr[lo:hi] = schema.PENDING
    return rep


def _recreate_missing(root, rep: Report) -> None:
    """Arrays the store's attributes declare but that are gone, created empty again from
    their declared dims, per-item shapes and dtypes."""
    methods = dict(root.attrs).get("methods") or {}
    n = root["ids"].shape[0] if "ids" in root else None
    chunk = int(dict(root.attrs).get("chunk") or schema.SAMPLE_CHUNK)
    for name, c, what in rep.problems:
        if c is not None or what != "array missing" or n is None:
            continue
        method, out = name.split("/", 1)
        entry = methods.get(method, {})
        dims = tuple(entry.get("outputs", {}).get(out, ()))
        shape = (entry.get("shapes") or {}).get(out)
        dtype = (entry.get("dtypes") or {}).get(out)
        if shape is None or dtype is None or len(dims) != len(shape) + 1:
            continue
        store.create_array(root, name, (n, *shape), np.dtype(dtype), dims, chunk)


def require_sound(root, path) -> None:
    """Refuses (one line) to read a store with damaged or missing chunks, saying how to
    repair it (audits and renders would otherwise fail deep inside a decoder)."""
    rep = verify(root)
    if rep.problems:
        first = rep.lines()[0]
        raise ConvlensError(f"{path} is damaged ({first}{' ...' if len(rep.lines()) > 1 else ''}): repair it with "
                            f"`convlens run ... --resume` (the command that wrote it), or see `convlens verify {path}`")
