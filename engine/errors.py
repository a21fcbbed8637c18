"""The one error type users see: a one-line message naming the file and the problem."""
from __future__ import annotations

from pathlib import Path

# The command's exit codes: usage errors are click's 2; these are the others.
EXIT_INPUT = 1  # bad input or state (an EngineError): one line on stderr, nothing half-written
EXIT_BUG = 70  # the engine's own bug (sysexits' EX_SOFTWARE): a traceback with --debug, one line without
EXIT_INTERRUPTED = 130


class EngineError(Exception):
    """Bad input or state: the CLI prints `error: <message>` on one line and exits non-zero."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
