"""Two writers on one store: the second (encode, convert or import) is refused naming the store and the holder;
the first finishes and the store is whole and the same as a single writer's."""
import json
import os
import signal
import time

import numpy as np
import pytest
from storefaults import assert_same_store, baseline, encode_args, engine, photos, start

from engine.errors import EXIT_INPUT

pytestmark = pytest.mark.faults

__all__ = ["baseline", "photos"]  # fixtures


def holder_pid(store):
    try:
        return json.loads((store / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_second_writer_is_refused_while_the_first_holds_the_store(photos, baseline, tmp_path):
    out = tmp_path / "s"
    first = start(*encode_args(photos, out))
    try:
        deadline = time.monotonic() + 120
        while holder_pid(out) != first.pid and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(first.pid, signal.SIGSTOP)  # holding the lock, mid-encode
        assert first.poll() is None and holder_pid(out) == first.pid
        np.save(tmp_path / "v.npy", np.ones((3, 1280), np.float32))
        for second in (encode_args(photos, out), ["store", "convert", out, "--dtype", "int8"],
                       ["store", "import", tmp_path / "v.npy", "--out", out, "--overwrite"]):
            done = engine(*second)
            assert done.returncode == EXIT_INPUT, done.stderr
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
            assert str(out) in done.stderr and "being written by" in done.stderr
            assert f"pid {first.pid}" in done.stderr and "encode" in done.stderr  # who holds it, and doing what
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert_same_store(out, baseline)
