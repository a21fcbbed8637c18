"""The one error type users see: a one-line message naming the file and the problem."""
from __future__ import annotations

from pathlib import Path


class EngineError(Exception):
    """Bad input or state: the CLI prints `error: <message>` on one line and exits non-zero."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
