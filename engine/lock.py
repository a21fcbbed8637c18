"""One writer at a time: an exclusive, non-blocking flock on a lock file inside the folder being written.

The kernel drops a flock when its holder dies, so a lock file left by a killed writer blocks nobody:
the next writer simply takes it. The holder writes who it is (pid, host, command, start time) into the
file, so a refused writer can say who holds it. Readers never lock: they rely on the atomic manifest.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import EngineError

LOCK_NAME = ".lock"


def _holder_text(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        h = json.loads(raw)
        return f"pid {h['pid']} on {h['host']} since {h['started']} ({h['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a writer that has not yet said who it is"


def _refusal(folder: Path, holder: str) -> EngineError:
    return EngineError(f"store is being written by {holder}: wait for it to finish (one writer at a time)", folder)


def refuse_if_held(folder: Path) -> None:
    """Raise the EngineError a second writer gets if a writer holds `folder` now; creates nothing."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody has ever written here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(Path(folder), _holder_text(fd)) from None
    finally:
        os.close(fd)  # also drops the shared lock just taken


class WriteLock:
    """An exclusive write lock on `folder` (which must exist); `release()` or process exit frees it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise EngineError(f"cannot create the write lock ({e.strerror})", self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise _refusal(self.folder, holder) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv)[:500],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Free the lock (the file stays: unlinking it would race with a writer that just opened it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()
