"""Writing files into place and hashing them: the one home for both.

Every file the engine writes goes through `writing`: the bytes go to a temporary name beside the target
(unique per process and thread, so two writers never share one), are flushed and fsynced, and the
temporary file is renamed over the target; the folder is fsynced so the rename survives a crash. A reader
sees the old file or the new one, never a part. On any failure the temporary file is removed and the
target is left as it was.
"""
from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import EngineError

HASH_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def temp_name(path: Path) -> Path:
    """The temporary name a write into `path` goes to: beside it, unique to this process and thread."""
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems refuse to open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_error(e: OSError, path: Path) -> EngineError | None:
    """A full disk or a file-size limit is the user's to fix: one clear line, not a traceback."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return EngineError(f"cannot write: {os.strerror(e.errno).lower()} (nothing was replaced)", path)
    return None


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`, atomically and durably."""
    with writing(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8), atomically and durably."""
    write_bytes(path, text.encode("utf-8"))


def save_npy(path: str | Path, array: np.ndarray) -> str:
    """Write `array` as a plain .npy (never pickled objects) into place; returns the file's sha256."""
    h = hashlib.sha256()

    class _Hashing:  # hash while writing: no second read of a shard that may be gigabytes
        def __init__(self, f):
            self.f = f

        def write(self, b):
            h.update(b)
            return self.f.write(b)

    with writing(path) as f:
        np.save(_Hashing(f), np.ascontiguousarray(array), allow_pickle=False)
    return h.hexdigest()


@contextmanager
def written_by(path: str | Path) -> Iterator[Path]:
    """For writers that need a file name (pyarrow, safetensors, torch.onnx.export): yields a temporary path that
    replaces `path` whole when the block ends (fsynced, then renamed), and is removed if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (err := _disk_error(e, path)) is not None:
            raise err from None
        raise
    _fsync_dir(path.parent)


@contextmanager
def writing(path: str | Path) -> Iterator[BinaryIO]:
    """`with writing(path) as f: f.write(...)`: a binary file that replaces `path` whole when the block ends.

    The parent folder is created. If the block raises, `path` is untouched and the temporary file removed;
    a full disk or file-size limit becomes an EngineError naming `path`.
    """
    with written_by(path) as tmp, open(tmp, "wb") as f:
        yield f
