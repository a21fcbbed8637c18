"""Malicious pickles at every entry point that reads one: the payload never runs, the command exits
EXIT_INPUT with one line naming the file. The payloads are first shown to run under plain pickle.load."""
import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.errors import EXIT_INPUT, EngineError
from engine.pickles import read_pickle
from engine.store import write_store

pytestmark = pytest.mark.faults


class System:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


class Eval(System):
    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.sentinel)!r}).touch()",)


class Popen(System):
    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.sentinel)],)


def gnd_around(payload):
    """A valid-looking ground truth with the payload where a list of names should be."""
    return {"imlist": ["a", payload], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 5, 5], "easy": [0]}]}


def persistent(sentinel) -> bytes:
    """A pickle whose data refers to a persistent id (resolved by whatever persistent_load the reader has)."""
    class WithIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "payload" if obj == "ref" else None
    buf = io.BytesIO()
    WithIds(buf, protocol=2).dump({"imlist": ["ref"], "qimlist": [], "gnd": []})
    return buf.getvalue()


def protocol0_system(sentinel) -> bytes:
    """Hand-written protocol 0: GLOBAL 'os system', as an attacker types it without Python's pickler."""
    return b"cos\nsystem\n(V" + f"touch {sentinel}".encode() + b"\ntR."


PAYLOADS = {
    "os.system": lambda s: pickle.dumps(System(s)),
    "builtins.eval": lambda s: pickle.dumps(Eval(s), protocol=2),
    "subprocess.Popen": lambda s: pickle.dumps(Popen(s), protocol=5),
    "nested in a list": lambda s: pickle.dumps(gnd_around([1, [System(s)]])),
    "numpy object array": lambda s: pickle.dumps({**gnd_around("b"), "gnd": [{"easy": np.array([System(s)], dtype=object)}]}),
    "protocol 0 text": protocol0_system,
    "persistent id": persistent,
}
# what the refusal names, per payload
REFUSED = {"os.system": "posix.system", "builtins.eval": "builtins.eval", "subprocess.Popen": "subprocess.Popen",
           "nested in a list": "posix.system", "numpy object array": "an object array", "protocol 0 text": "os.system",
           "persistent id": "a persistent id"}


def plain_load(data: bytes):
    obj = pickle.loads(data)
    if isinstance(obj, subprocess.Popen):
        obj.wait()
    return obj


@pytest.mark.parametrize("kind", [k for k in PAYLOADS if k != "persistent id"])
def test_payloads_are_live_under_plain_pickle(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    plain_load(PAYLOADS[kind](sentinel))
    assert sentinel.exists()  # so their absence below is the reader's doing


@pytest.mark.parametrize("kind", PAYLOADS)
def test_read_pickle_refuses_and_runs_nothing(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(PAYLOADS[kind](sentinel))
    with pytest.raises(EngineError) as err:
        read_pickle(bad)
    assert not sentinel.exists()
    msg = str(err.value)
    assert msg.startswith(f"{bad}: refusing to load ") and REFUSED[kind] in msg and "\n" not in msg
    assert "only plain data" in msg


def numpy_global(module: str, name: str, args: bytes = b")") -> bytes:
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + args + b"R."


@pytest.mark.parametrize("data, refused", [
    (numpy_global("numpy", "load", b"X\x03\x00\x00\x00x.y\x85"), "numpy.load"),
    (numpy_global("numpy.testing", "assert_", b"K\x01\x85"), "numpy.testing.assert_"),
    (numpy_global("copyreg", "_reconstructor"), "copyreg._reconstructor"),
    (numpy_global("builtins", "getattr"), "builtins.getattr"),
    (numpy_global("_codecs", "encode", b"X\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86"), "_codecs.encode(str, 'zlib')"),
    (numpy_global("builtins", "bytes", b"J\x00\x00\x00\x40\x85"), "builtins.bytes(int)"),  # bytes(2**30): an allocation
    (numpy_global("numpy._core.numeric", "_frombuffer", b"(J\x00\x00\x00\x40cnumpy\ndtype\nX\x02\x00\x00\x00u1\x85R"
                  b"J\x00\x00\x00\x40\x85X\x01\x00\x00\x00Ct"), "array data of type int, not bytes"),
    (numpy_global("numpy._core.multiarray", "_reconstruct", b"cbuiltins\nlist\nK\x00\x85C\x01b\x87"), "builtins.list"),
    (numpy_global("numpy", "dtype", b"X\x02\x00\x00\x00M8\x85"), "numpy.dtype('M8')"),
    (numpy_global("numpy", "dtype", b"X\x02\x00\x00\x00V8\x85"), "numpy.dtype('V8')"),
])
def test_numpy_and_builtin_globals_beyond_plain_arrays_are_refused(tmp_path, data, refused):
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(data)
    with pytest.raises(EngineError, match="refusing to load " + refused.replace("(", r"\(").replace(")", r"\)")):
        read_pickle(bad)


@pytest.mark.parametrize("data, problem", [
    (b"", "EOFError"),
    (pickle.dumps({"imlist": ["a"] * 50})[:-7], "truncated"),
    (b"\x80\x09K\x01.", "unsupported pickle protocol: 9"),
    (b"PK\x03\x04 a zip, not a pickle", "UnpicklingError"),
    (b"\x80\x05\x97.", "UnpicklingError"),  # an out-of-band buffer: none is given
    (b"(" * 200_000 + b".", "UnpicklingError"),  # marks with nothing to close
    (b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".", "nested too deeply"),
])
def test_unreadable_pickles_are_one_line(tmp_path, data, problem):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(data)
    with pytest.raises(EngineError, match="not a readable pickle") as err:
        read_pickle(bad)
    assert problem in str(err.value) and str(err.value).startswith(str(bad)) and "\n" not in str(err.value)


def test_shared_references_stay_cheap(tmp_path):
    """A 'billion laughs' of shared lists: 2**60 leaves by reference, a few hundred bytes on disk."""
    data = b"\x80\x02K\x00\x85q\x00"  # (0,) memoised as 0
    for level in range(1, 61):
        data += b"]h" + bytes([level - 1]) + b"ah" + bytes([level - 1]) + b"aq" + bytes([level])
    (tmp_path / "laughs.pkl").write_bytes(data + b".")
    top = read_pickle(tmp_path / "laughs.pkl")
    assert top[0] is top[1] and top[0][0] is top[0][1]  # the sharing is kept, not expanded


# ---------------------------------------------------------------- every entry point of the command line

@pytest.fixture(scope="module")
def stores(tiny_train, tmp_path_factory):
    """A teacher store over tiny_train's images (random vectors: nothing here trains) and a gnd for validation."""
    root = tmp_path_factory.mktemp("stores")
    cids = read_pickle(tiny_train / "train" / "db.pkl")["train"]["cids"]
    write_store(root / "teacher", np.random.default_rng(0).standard_normal((len(cids), 8)).astype(np.float32), "test:space", cids)
    return root


def entry_points(bad: Path, tiny_train: Path, tiny_bench: Path, stores: Path, out: Path) -> dict:
    db = tiny_train / "train" / "db.pkl"
    teacher = stores / "teacher"
    return {
        "eval --gnd": ["eval", "--gnd", bad, "--ranks", out / "ranks.npy"],
        "report --gnd": ["report", "--gnd", bad, "--results", out / "r.npz", "--images", tiny_bench / "jpg", "--out", out / "rep"],
        "train --train-set": ["train", "--out", out / "run", "--teacher-store", teacher, "--train-set", bad, "--epochs", 1],
        "train --val-gnd": ["train", "--out", out / "run", "--teacher-store", teacher, "--train-set", db, "--epochs", 1,
                            "--val-gnd", bad, "--val-store", teacher],
        "encode --gnd": ["encode", "--model", "effnet-lite2-gem", "--gnd", bad, "--images", tiny_bench / "jpg", "--out", out / "s"],
        "encode --train-set": ["encode", "--model", "effnet-lite2-gem", "--train-set", bad, "--images", tiny_train / "jpg",
                               "--out", out / "s"],
        "whiten --pairs": ["whiten", "--model", "effnet-lite2-gem", "--pairs", bad, "--images", tiny_train / "jpg",
                           "--out", out / "w.safetensors"],
    }


ENTRY_POINTS = ["eval --gnd", "report --gnd", "train --train-set", "train --val-gnd", "encode --gnd", "encode --train-set",
                "whiten --pairs"]
CHEAP = ENTRY_POINTS[:4]  # no network to build first: every payload; the others build an encoder, so one payload each


@pytest.mark.parametrize("entry, kind", [(e, k) for e in CHEAP for k in PAYLOADS]
                         + [(e, "os.system") for e in ENTRY_POINTS[4:]])
def test_no_entry_point_runs_a_payload(entry, kind, tmp_path, run_cli, tiny_train, tiny_bench, stores):
    sentinel = tmp_path / "SENTINEL"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(PAYLOADS[kind](sentinel))
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(*entry_points(bad, tiny_train, tiny_bench, stores, tmp_path / "out")[entry])
    assert not sentinel.exists()
    assert code == EXIT_INPUT, err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: refusing to load ") and REFUSED[kind] in err
    assert not any((tmp_path / "out").iterdir())  # nothing written on the way to the refusal
