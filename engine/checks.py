"""Checks of plain values passed to library functions: one wording and one rule for each, called from everywhere."""
from __future__ import annotations

import math
import numbers
from pathlib import Path

from .errors import EngineError


def check_int(value, name: str, minimum: int = 1, note: str = "", path: str | Path | None = None) -> int:
    """`value` as an int if it is an integer (a bool is not) >= minimum; else EngineError naming `name` (and `path`).

    note: what a special value means, added to the message (e.g. "0 = all cores").
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise EngineError(f"{name} must be {what}{f' ({note})' if note else ''}, got {value!r}", path)
    return int(value)


def float_problem(value, minimum: float | None = None, maximum: float | None = None, open_min: bool = False,
                  open_max: bool = False) -> str | None:
    """None if `value` is a finite real number (not a bool) within the bounds, else what it must be
    ("must be a finite number in (0, 1)"). minimum / maximum: None for no bound; open_* exclude the bound."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if open_min else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if open_max else value <= maximum
    return None if ok else f"must be a finite number{_range(minimum, maximum, open_min, open_max)}"


def check_float(value, name: str, minimum: float | None = None, maximum: float | None = None, open_min: bool = False,
                open_max: bool = False, path: str | Path | None = None) -> float:
    """`value` as a float if `float_problem` finds none; else EngineError naming `name` (and `path`)."""
    problem = float_problem(value, minimum, maximum, open_min, open_max)
    if problem:
        raise EngineError(f"{name} {problem}, got {value!r}", path)
    return float(value)


def _range(minimum: float | None, maximum: float | None, open_min: bool, open_max: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if open_min else '['}{minimum:g}, {maximum:g}{')' if open_max else ']'}"
    if minimum is not None:
        return f" {'>' if open_min else '>='} {minimum:g}"
    if maximum is not None:
        return f" {'<' if open_max else '<='} {maximum:g}"
    return ""
