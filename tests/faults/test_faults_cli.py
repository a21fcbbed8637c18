"""A fuzz of the command line's numeric arguments: every numeric option of every command, fed values at and past
its edges. Each run ends in 0, a one-line input error (1) or a usage error (2): never an internal error (70)
and never an exception. Search and store import run for real on a tiny store (a value that passes the edge
reaches the library and the C++ kernel); the other commands' inputs do not exist, so a value that passes its
check fails at the first file, before any encoding or training.
"""
import random
import typing

import numpy as np
import pytest

from engine.cli import app
from engine.cli.options import all_params as params_of
from engine.errors import EXIT_INPUT

pytestmark = pytest.mark.faults

VALUES = ["0", "-1", "nan", "inf", "-inf", "1e309", str(2**63), "abc", ""]
PER_OPTION = len(VALUES)  # every value, in a seeded order (a smaller number bounds the run, should it grow)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A 6 x 4 store with an int8 copy (so --scan / --rescore have work to do) and 2 queries in its space."""
    from engine.store import add_copy, write_store

    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    np.save(root / "v.npy", rng.standard_normal((6, 4)).astype(np.float32))
    np.save(root / "q.npy", rng.standard_normal((2, 4)).astype(np.float32))
    add_copy(write_store(root / "s", np.load(root / "v.npy"), "fuzz:0", None, "float32", 4), "int8")
    return root


def base_args(command: str, tmp, real) -> list[str] | None:
    """Arguments for each command: real tiny inputs for search and store import, else files that do not exist."""
    missing = tmp / "missing"
    return {
        "engine search": ["search", real / "s", "--queries", real / "q.npy", "--out", tmp / "r.npz"],
        "engine store import": ["store", "import", real / "v.npy", "--out", tmp / "s", "--overwrite"],
        "engine encode": ["encode", "--model", missing / "m.safetensors", "--images", missing, "--out", tmp / "s"],
        "engine train": ["train", "--out", tmp / "run", "--teacher-store", missing, "--train-set", missing / "db.pkl"],
        "engine export": ["export", "--model", missing / "m.safetensors", "--out", tmp / "m.onnx"],
        "engine whiten": ["whiten", "--model", missing / "m.safetensors", "--pairs", missing / "p.pkl", "--out", tmp / "w.safetensors"],
        "engine demo": ["demo", "--out", tmp / "demo", "--photos", missing],
        "engine report": ["report", "--gnd", missing / "gnd.pkl", "--results", missing / "r.npz", "--out", tmp / "rep"],
        "engine data views": ["data", "views", "--out", tmp / "v", "--photos", missing],
        "engine data convert-train": ["data", "convert-train", missing / "i.csv", "--out", tmp / "db.pkl"],
        "engine serve": ["serve", missing / "s"],  # a missing store: refused before anything listens
        "engine store add": ["store", "add", missing / "s", "--images", missing],
    }.get(command)


def is_numeric(annotation) -> bool:
    """int, float, or Optional of one."""
    kinds = set(typing.get_args(annotation) or (annotation,)) - {type(None)}
    return bool(kinds) and kinds <= {int, float}


def numeric_options():
    return [(command, p.opts[0]) for command, p in params_of(app)
            if p.opts and p.opts[0].startswith("-") and (is_numeric(p.type_descriptor.annotation) or p.name == "scales")]


def test_every_numeric_option_has_a_fuzz_case(tmp_path):
    options = numeric_options()
    assert len(options) >= 30
    assert not [c for c, _ in options if base_args(c, tmp_path, tmp_path) is None]  # a new command needs its failing inputs


@pytest.mark.parametrize("command, option", numeric_options())
def test_numeric_option_fuzz(run_cli, tmp_path, tiny_store, command, option):
    rng = random.Random(f"{command} {option}")
    for value in rng.sample(VALUES, PER_OPTION):
        code, out, err = run_cli(*base_args(command, tmp_path, tiny_store), option, value)
        assert code in (0, EXIT_INPUT, 2), (option, value, code, err)
        if code == EXIT_INPUT:
            assert err.startswith("error: ") and err.count("\n") == 1, (option, value, err)
        if code == 2:
            assert "Error" in err and "Traceback" not in err, (option, value, err)
        if code == 0 and command == "engine search":
            from engine.results import load_results

            ids, _ = load_results(tmp_path / "r.npz")
            assert ids.max() < 6 and (np.sort(ids, axis=1)[:, 1:] != np.sort(ids, axis=1)[:, :-1]).all()  # real rows, once
        assert not list(tmp_path.rglob("*.tmp")), (option, value)
