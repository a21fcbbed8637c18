"""Checking option values: one clear EngineError naming the option, before any work is done."""
from __future__ import annotations

import math
from collections.abc import Iterable

from engine.errors import EngineError


def is_count(value, least: int = 1) -> bool:
    """An integer (not a bool) >= least."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_finite(value) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(option: str, value, ok: bool, want: str) -> None:
    """Raise `--option must be WANT, got VALUE` unless ok; `option` is the field name (snake_case)."""
    if not ok:
        raise EngineError(f"--{option.replace('_', '-')} must be {want}, got {value!r}")


def require_choice(option: str, value, choices: Iterable[str]) -> None:
    """Raise unless value is one of choices."""
    choices = tuple(choices)
    require(option, value, value in choices, "one of " + ", ".join(choices))
