"""One writer per store: `StoreLock`, a lock file inside the store with its holder's host,
pid, process start time, command and a heartbeat."""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from convlens.engine.ownership import LOCK_NAME, _fs, local_path
from convlens.errors import ConvlensError


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


def unlock(path, storage_options=None, force: bool = False) -> dict | None:
    """Removes a store's lock file (``convlens unlock``) when its holder is gone; returns
    what it said (``None``: not locked). A holder alive on this host is never unlocked (its
    run would go on writing into a store another run may then replace); one on another
    host cannot be checked from here and needs ``force``."""
    lock = StoreLock(path, storage_options)
    info = lock.read()
    if info is None:
        return None
    if info:
        pid, host = info.get("pid"), info.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and _alive(pid, info.get("start")):
            raise ConvlensError(f"{path} is in use by {lock.describe(info)}, which is still running: unlock refuses "
                                "to free a live run's store (stop that run first)")
        if host != socket.gethostname() and not force:
            raise ConvlensError(f"{path} is locked by {lock.describe(info)} on another host, which cannot be checked "
                                "from here: if that run is gone, `convlens unlock --force` clears the lock (if it is "
                                "not, its store may then be written by two runs at once)")
    lock._remove_file()
    return info


def lock_info(path, storage_options=None) -> dict | None:
    return StoreLock(path, storage_options).read()
