"""ImageNet weights the way Keras gets them.

``--weights imagenet`` resolves a built-in's published Keras weights exactly as
``keras.applications.X(weights="imagenet")`` does: the same file name, the same published
hash (md5 or sha256, told apart by length, as Keras's ``validate_file``), the same cache
folder (``$KERAS_HOME/models``, else ``~/.keras/models``, else ``/tmp/.keras/models`` where
the home folder is not writable) — so a user who ever loaded the model in Keras has the
file already, and a file convlens fetches serves Keras too.

A missing file is downloaded with a progress bar into a temporary file next to its
destination, its hash checked while it streams, and renamed into place only when whole
and correct: an interrupted or corrupted download never leaves a file that looks cached.
Without a network the error says where to put the file by hand. ``CONVLENS_WEIGHTS_URL``
replaces the host part of the published addresses (a mirror, or a test's local server).
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from convlens.errors import ConvlensError

KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
TIMEOUT = 30.0


def keras_home() -> Path:
    """Keras's own folder, found as Keras finds it."""
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"]).expanduser()
    base = os.path.expanduser("~")
    if not os.access(base, os.W_OK):
        base = "/tmp"
    return Path(base) / ".keras"


def cache_dir() -> Path:
    return keras_home() / "models"


def hash_of(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def algorithm_of(file_hash: str) -> str:
    """Keras's rule: a 64-character hash is sha256, anything else md5."""
    return "sha256" if len(file_hash) == 64 else "md5"


def address(url: str) -> str:
    """``url`` with its Keras host replaced by ``CONVLENS_WEIGHTS_URL`` where that is set."""
    mirror = os.environ.get("CONVLENS_WEIGHTS_URL")
    if mirror and url.startswith(KERAS_BASE):
        return mirror.rstrip("/") + "/" + url[len(KERAS_BASE):]
    return url


def fetch(fname: str, url: str, file_hash: str | None, *, progress: bool = True, note=None) -> Path:
    """The cached file ``fname``, downloaded from ``url`` if missing (or if a cached copy
    does not match ``file_hash``). Returns its path."""
    note = note or (lambda msg: None)
    path = cache_dir() / fname
    algorithm = algorithm_of(file_hash) if file_hash else None
    if path.is_file():
        if file_hash is None or hash_of(path, algorithm) == file_hash:
            return path
        note(f"{path} does not match its published {algorithm} hash (a damaged or partial copy): downloading it "
             "again")
    src = address(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvlensError(f"cannot create the weights cache {path.parent}: {e.strerror or e}; set KERAS_HOME "
                            "to a writable folder") from None
    tmp = path.with_name(f"{path.name}.part-{os.getpid()}")
    try:
        _download(src, tmp, fname, progress)
        if file_hash is not None:
            got = hash_of(tmp, algorithm)
            if got != file_hash:
                raise ConvlensError(f"the download of {fname} from {src} is corrupt ({algorithm} {got}, published "
                                    f"{file_hash}); try again, or put a good copy at {path}")
        os.replace(tmp, path)  # atomic: the cache never holds half a file under its real name
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise ConvlensError(f"cannot download {fname} from {src} ({reason}); without a network, download it "
                            f"elsewhere and put it at {path}"
                            + (f" ({algorithm} {file_hash})" if file_hash else "")) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _download(url: str, dest: Path, fname: str, progress: bool) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "convlens"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {fname}", dynamic_ncols=True)
        got = 0
        try:
            with open(dest, "wb") as f:
                while True:
                    block = r.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    got += len(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
        if total is not None and got != total:
            raise ConnectionError(f"the connection closed after {got:,} of {total:,} bytes")
