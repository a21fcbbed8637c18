"""A full disk, played by a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored so writes fail with EFBIG):
encode and import stop with one line naming the file, the store keeps its last manifest and whole shards,
and a rerun with room completes it, bit-identical to a run that never ran short."""
import json
import resource
import signal

import numpy as np
import pytest
from storefaults import ENGINE, assert_same_store, baseline, encode_args, engine, photos

from engine.errors import EXIT_INPUT
from engine.store import open_store

pytestmark = pytest.mark.faults

__all__ = ["baseline", "photos"]  # fixtures


def limited(nbytes):
    """preexec_fn: no file of the child may grow past `nbytes`; the write fails instead of killing it."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


@pytest.fixture(autouse=True)
def _can_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < 1 << 20:
        pytest.skip("file-size limits cannot be set here")
    if ENGINE is None:
        pytest.skip("the engine command is not installed beside this python")


def refused_then_resumed(run_args, out, limit, want, names):
    done = engine(*run_args, preexec_fn=limited(limit))
    assert done.returncode == EXIT_INPUT, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "file too large" in done.stderr and all(n in done.stderr for n in names), done.stderr
    assert not list(out.rglob("*.tmp"))  # nothing half-written left beside the files
    store = open_store(out, allow_incomplete=True, checksums=True)  # the last manifest and its shards, whole
    assert not store.complete
    done = engine(*run_args)
    assert done.returncode == 0, done.stderr
    assert_same_store(out, want)
    return store


def test_encode_stops_at_the_first_shard_that_does_not_fit_and_resumes(photos, baseline, tmp_path):
    out = tmp_path / "s"
    shard_bytes = (baseline / "float32" / "shard-00000.npy").stat().st_size
    before = refused_then_resumed(encode_args(photos, out), out, shard_bytes - 1, baseline, ["float32/shard-00000.npy"])
    assert before.count == 0


def test_import_stops_when_the_manifest_no_longer_fits_and_resumes(tmp_path):
    v = np.random.default_rng(5).standard_normal((40, 4)).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    (tmp_path / "v.npy.json").write_text(json.dumps({"space": "space-a", "dim": 4}))
    args = ["store", "import", tmp_path / "v.npy", "--shard-rows", 2]
    assert engine(*args, "--out", tmp_path / "want").returncode == 0
    manifest_bytes = (tmp_path / "want" / "manifest.json").stat().st_size
    out = tmp_path / "s"
    before = refused_then_resumed([*args, "--out", out], out, manifest_bytes // 2, tmp_path / "want", ["manifest.json"])
    assert 0 < len(before.manifest["shards"]) < 20  # it stopped part-way, with whole shards kept
