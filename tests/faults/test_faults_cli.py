"""A fuzz of the command line's numeric arguments: every numeric option of every command, fed values at and past
its edges. Each run ends in 0, a one-line input error (1) or a usage error (2): never an internal error (70)
and never an exception. The inputs point at files that do not exist, so a value that passes its check fails
at the first file, before any encoding or training.
"""
import random
import typing

import pytest

from engine.cli import all_params
from engine.errors import EXIT_INPUT

pytestmark = pytest.mark.faults

VALUES = ["0", "-1", "nan", "inf", "-inf", "1e309", str(2**63), "abc", ""]
PER_OPTION = 5  # values tried per option (seeded), to bound the run


def base_args(command: str, tmp) -> list[str] | None:
    """Arguments that make each command fail at its first input file (nothing here exists)."""
    missing = tmp / "missing"
    return {
        "engine encode": ["encode", "--model", missing / "m.safetensors", "--images", missing, "--out", tmp / "s"],
        "engine search": ["search", missing, "--queries", missing / "q.npy", "--out", tmp / "r.npz"],
        "engine train": ["train", "--out", tmp / "run", "--teacher-store", missing, "--train-set", missing / "db.pkl"],
        "engine export": ["export", "--model", missing / "m.safetensors", "--out", tmp / "m.onnx"],
        "engine whiten": ["whiten", "--model", missing / "m.safetensors", "--pairs", missing / "p.pkl", "--out", tmp / "w.safetensors"],
        "engine demo": ["demo", "--out", tmp / "demo", "--photos", missing],
        "engine report": ["report", "--gnd", missing / "gnd.pkl", "--results", missing / "r.npz", "--out", tmp / "rep"],
        "engine store import": ["store", "import", missing / "v.npy", "--out", tmp / "s"],
        "engine data views": ["data", "views", "--out", tmp / "v", "--photos", missing],
        "engine data convert-train": ["data", "convert-train", missing / "i.csv", "--out", tmp / "db.pkl"],
    }.get(command)


def is_numeric(annotation) -> bool:
    """int, float, or Optional of one."""
    kinds = set(typing.get_args(annotation) or (annotation,)) - {type(None)}
    return bool(kinds) and kinds <= {int, float}


def numeric_options():
    return [(command, p.opts[0]) for command, p in all_params()
            if p.opts and p.opts[0].startswith("-") and (is_numeric(p.type_descriptor.annotation) or p.name == "scales")]


def test_every_numeric_option_has_a_fuzz_case(tmp_path):
    options = numeric_options()
    assert len(options) >= 30
    assert not [c for c, _ in options if base_args(c, tmp_path) is None]  # a new command needs its failing inputs


@pytest.mark.parametrize("command, option", numeric_options())
def test_numeric_option_fuzz(run_cli, tmp_path, command, option):
    rng = random.Random(f"{command} {option}")
    for value in rng.sample(VALUES, PER_OPTION):
        code, out, err = run_cli(*base_args(command, tmp_path), option, value)
        assert code in (0, EXIT_INPUT, 2), (option, value, code, err)
        if code == EXIT_INPUT:
            assert err.startswith("error: ") and err.count("\n") == 1, (option, value, err)
        if code == 2:
            assert "Error" in err and "Traceback" not in err, (option, value, err)
        assert not list(tmp_path.rglob("*.tmp")), (option, value)
