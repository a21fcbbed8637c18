"""The command line's value types and checks at the edge: choices, number ranges, devices, output paths.

Choices are read from the library that owns each list; numbers have their ranges (typer's min/max; floats
also refuse NaN and infinities); an output path that cannot be written is refused in one line. The defaults
equal the library's own (EncodeOptions, TrainConfig; tests/test_cli.py holds them equal), written out so that
the command starts without importing torch.

One flag, one meaning: `--student` is always a student architecture (a registry name; a trained student is a
checkpoint, given with `--model` or `--init`), `--runner` the inference runner of encoding, `--backend` the
search backend, `--max-side` the longest side images are resized to (export's TensorRT profile bounds are
`--profile-*`), `--workers` decoding threads (-1: half the cores).

A bad value is a usage error (exit 2), before any work; what only the run can tell (no GPU, an output
path of the wrong kind) is an EngineError (exit 1) naming the option or file.
"""
from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import typer

from ..checks import float_problem
from ..errors import EngineError


def choice(what: str, load: Callable[[], Iterable[str]], metavar: str | None = None) -> dict:
    """typer.Option / Argument keywords for a value that must be one of `load()`: a usage error listing them otherwise.

    metavar: shown in the help instead of the list; give one when `load` is costly (it imports torch), so
    that the list is read only when a value is checked, not to start the command. Without it the list is
    read now and shown as [a|b|c].
    """
    names: list[str] = []

    def parse(value: str) -> str:
        if not names:
            names.extend(load())
        if value not in names:
            raise typer.BadParameter(f"unknown {what} {value!r}: expected one of {', '.join(names)}")
        return value

    if metavar is None:
        names.extend(load())
        metavar = f"[{'|'.join(names)}]"
    return {"parser": parse, "metavar": metavar}


def _names(module: str, name: str, keep: Callable[[str], bool] = lambda _: True) -> Callable[[], list[str]]:
    return lambda: [c for c in getattr(importlib.import_module(module), name) if keep(c)]


def _registry(role: str) -> list[str]:
    from ..models import STUDENTS, TEACHERS

    return list(STUDENTS) if role == "student" else [*STUDENTS, *TEACHERS]


def fixed(*values: str) -> dict:
    """A choice among the command line's own values (lists no library constant holds)."""
    return choice("value", lambda: values)


DTYPE = choice("dtype", _names("engine.quantize", "DTYPES"))
COPY_DTYPE = choice("dtype", _names("engine.quantize", "DTYPES", keep=lambda d: d != "float32"))
SEARCH_BACKEND = choice("backend", _names("engine.search", "BACKENDS"))
DIFFICULTY = choice("difficulty", _names("engine.datasets.views", "DIFFICULTIES"), "DIFFICULTY")  # views imports torch (images)
DATASET = choice("dataset", _names("engine.datasets.download", "DATASETS"), "NAME")  # download imports torch (cirtorch)
RUNNER = choice("runner", _names("engine.backends", "BACKENDS"), "RUNNER")  # engine.backends.BACKENDS
DECODE = choice("decoding place", _names("engine.encode", "DECODE_PLACES"), "WHERE")  # engine.encode.DECODE_PLACES
LOSS = choice("loss", _names("training.losses", "LOSSES"), "LOSS")  # training.losses.LOSSES
STUDENT = choice("student", lambda: _registry("student"), "ARCH")  # the registry's students (engine models)
STUDENT_OR_TEACHER = choice("student or teacher", lambda: _registry("any"), "NAME")  # a student architecture or a teacher name


def number(minimum: float | None = None, maximum: float | None = None, open_min: bool = False,
           open_max: bool = False) -> Callable:
    """A typer callback for a float option: a finite number within the bounds (`checks.float_problem`), else a
    usage error. (A plain min/max range lets NaN through: every comparison with NaN is false.)"""

    def check(value):
        problem = None if value is None else float_problem(value, minimum, maximum, open_min, open_max)
        if problem:
            raise typer.BadParameter(f"{problem}, got {value}")
        return value

    return check


MAX_SCALE = 4.0  # past 4x an image is upsampled to no new detail, and its memory grows with the square


def parse_scales(text: str) -> tuple[float, ...]:
    """'1,0.707,0.5' -> (1.0, 2**-0.5, 0.5): factors in (0, MAX_SCALE]; a usage error otherwise (a typer callback).

    A factor within 5e-4 of 1/sqrt(2) (0.707, 0.7071: how it is written) is the protocol's 1/sqrt(2) exactly
    (engine.multiscale.PROTOCOL_SCALES), as cirtorch computes it."""
    from ..multiscale import PROTOCOL_SCALES

    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"must be comma-separated numbers, got {text!r}") from None
    scales = tuple(PROTOCOL_SCALES[1] if abs(s - PROTOCOL_SCALES[1]) < 5e-4 else s for s in scales)
    problem = next((p for s in scales if (p := float_problem(s, 0, MAX_SCALE, open_min=True))), None)
    if not scales or problem:
        raise typer.BadParameter(f"each factor {problem or 'must be a number'}, got {text!r}")
    return scales


DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def device_name(value: str) -> str:
    """A typer callback: 'cpu', 'cuda' or 'cuda:N' (a usage error otherwise)."""
    if not DEVICE.fullmatch(value):
        raise typer.BadParameter(f"must be cpu, cuda or cuda:N, got {value!r}")
    return value


def require_device(device: str) -> None:
    """Refuse a device this machine does not have, in one line, before any work (search.torch_device's check;
    torch is imported only for a device other than the CPU)."""
    if device != "cpu":
        from ..search import torch_device

        torch_device(device)


def fit_search(count: int, k: int, rescore: int | None, threads: int, say: Callable[[str], None]) -> tuple[int, int | None, int]:
    """(k, rescore, threads) brought back to what can still change a search of `count` rows (the same results
    for less), each change said through `say`: k to the row count, k x rescore candidates to every row,
    threads to the cores. No size past the machine's then reaches the kernel."""
    if k > count > 0:
        say(f"note: -k {k} is more than the store's {count} rows: {count} results per query")
        k = count
    if rescore and count and k * rescore > count + k:
        whole = -(-count // k)  # k x this many candidates already cover every row
        say(f"note: --rescore {rescore} asks for more candidates than the store's {count} rows: using {whole}")
        rescore = whole
    if threads > (cores := os.cpu_count() or 1):
        say(f"note: --threads {threads} is more than this machine's {cores} cores: using {cores}")
        threads = cores
    return k, rescore, threads


def output_file(path: Path, option: str = "--out") -> Path:
    """An output that is one file: refused when it is an existing folder or its parent is a file."""
    if path.is_dir():
        raise EngineError(f"is a folder: {option} takes a file name", path)
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise EngineError(f"{option}: {parent} is a file, not a folder", path)
    return path


def output_folder(path: Path, option: str = "--out") -> Path:
    """An output that is a folder: refused when it is an existing file or inside one."""
    if path.exists() and not path.is_dir():
        raise EngineError(f"is a file: {option} takes a folder", path)
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise EngineError(f"{option}: {parent} is a file, not a folder", path)
    return path


def all_params(app: typer.Typer) -> list[tuple[str, object]]:
    """(command path, click parameter) for every parameter of every command of `app`, groups walked recursively
    (for the tests that hold every option to its help, its default and its range)."""

    def walk(cmd, path):
        for p in cmd.params:
            yield path, p
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    return list(walk(typer.main.get_command(app), "engine"))
