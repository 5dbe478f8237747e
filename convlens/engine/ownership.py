"""What convlens may replace or delete: paths, and what is at them.

convlens replaces or deletes only what is recognisably its own: a store is a Zarr group
whose root attributes carry ``schema_version`` and ``convlens_version`` (`is_convlens_store`),
a folder of pictures carries a marker file of the command that made it (`claim_folder`);
anything else at a path is the user's and is refused with a line saying what is there
(`describe_path`). Also: path handling shared by the store modules (local paths, fsspec
URLs, zarr store objects).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

from convlens.errors import ConvlensError

LOCK_NAME = ".convlens-lock"


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


def claim_folder(out: Path, marker: str, what: str) -> None:
    """Makes ``out`` a folder this command may write into: new, empty, or marked as made by
    the same command before (``marker``); anything else is refused (it is the user's)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConvlensError(f"{what} {out} is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise ConvlensError(f"{what} {out} is a folder convlens did not make ({sum(1 for _ in out.iterdir())} "
                            "entries): convlens writes only into new, empty or its own folders; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text("written by convlens; it may replace the files in this folder\n")
