"""Hostile inputs to search: non-finite galleries and queries, absurd k and rescore, and arrays that do not
match what the C++ kernel is told. Each gives a valid result (every id a distinct real row, exactly
min(k, N) of them) or one clear error; never garbage ids, never a crash."""
import json

import numpy as np
import pytest

from engine import EngineError, _search, quantize
from engine.search import check_result_size, search
from engine.store import add_copy, open_store, write_store

pytestmark = pytest.mark.faults

N, D, Q = 300, 24, 5
NAN_ROWS = [0, 7, 150, 299]  # the first row, rows in two shards, the last row
INF_ROWS = [3, 200]


def rows_and_queries(seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((N, D)).astype(np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True), rng.standard_normal((Q, D)).astype(np.float32)


def poison(path, rows, value):
    """Writes `value` into `rows` of every copy in place, as numpy would (no import check runs): every column
    of a float copy (float16 / bfloat16 through their codecs), the per-row scale of the int8 copy."""
    manifest = json.loads((path / "manifest.json").read_text())
    for dtype, entries in manifest["copies"].items():
        for shard, entry in zip(manifest["shards"], entries):
            local = [r - shard["start"] for r in rows if 0 <= r - shard["start"] < shard["rows"]]
            if not local:
                continue
            target = entry["scale"] if dtype == "int8" else entry["file"]
            arr = np.load(path / target, mmap_mode="r+")
            if dtype == "bfloat16":
                arr[local] = quantize.float32_to_bfloat16_bits(np.full((len(local), D), value, np.float32))
            else:
                arr[local] = value
            arr.flush()
            del arr


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A 4-shard store with every copy, NaN in NAN_ROWS and +inf in one column of INF_ROWS (float copies)."""
    g, q = rows_and_queries()
    path = tmp_path_factory.mktemp("poisoned") / "s"
    store = write_store(path, g, "space", shard_rows=128)
    for dtype in ("float16", "bfloat16", "int8"):
        add_copy(store, dtype)
    poison(path, NAN_ROWS, np.nan)
    manifest = json.loads((path / "manifest.json").read_text())
    for dtype in ("float32", "float16"):  # +inf in column 0 only: the score is +-inf, or NaN where q[0] = 0
        for shard, entry in zip(manifest["shards"], manifest["copies"][dtype]):
            arr = np.load(path / entry["file"], mmap_mode="r+")
            for r in INF_ROWS:
                if 0 <= r - shard["start"] < shard["rows"]:
                    arr[r - shard["start"], 0] = np.inf
            arr.flush()
            del arr
    return open_store(path), g, q


def assert_valid(scores, ids, n, k):
    """Exactly min(k, n) distinct rows of 0..n-1 per query, ordered: score descending, NaN last, ties by id."""
    kk = min(k, n)
    assert scores.shape == ids.shape == (Q, kk) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert ((ids >= 0) & (ids < n)).all()
    assert all(len(set(row)) == kk for row in ids)
    for s, i in zip(scores, ids):
        nan = np.isnan(s)
        assert not (nan[:-1] & ~nan[1:]).any()  # no number after a NaN
        num = s[~nan]
        assert (num[:-1] >= num[1:]).all()
        assert (np.diff(i[nan]) > 0).all()


TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2, "int8": 0.1}  # unrescored scans, |q| ~ 5


def finite_reference(g, q, bad):
    """Scores against the clean rows only (the poisoned ones at -inf) in float64."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    s[:, bad] = -np.inf
    return s


@pytest.mark.parametrize("backend", ["engine", "faiss", "torch"])
@pytest.mark.parametrize("scan, rescore", [("float32", 0), ("float16", 0), ("bfloat16", 4), ("int8", 4), ("int8", 0)])
@pytest.mark.parametrize("k", [10, N, 2**62])
def test_nan_and_inf_rows_never_give_garbage(poisoned, scan, rescore, backend, k):
    store, g, q = poisoned
    scores, ids = search(store, q, k, scan=scan, rescore=rescore, backend=backend)
    assert_valid(scores, ids, N, k)
    bad = sorted(set(NAN_ROWS) | set(INF_ROWS))
    ref = finite_reference(g, q, bad)
    # the clean rows come ranked as they are, above every poisoned row that scored NaN or -inf
    for s, i, r in zip(scores, ids, ref):
        clean = ~np.isin(i, bad)
        top = np.sort(r[np.isfinite(r)])[::-1][: clean.sum()]
        np.testing.assert_allclose(s[clean], top, atol=TOLERANCE[scan] if rescore == 0 else 1e-4)
    if backend == "engine" and k >= N:  # every NaN row is in the result, last, by id, at score NaN
        for s, i in zip(scores, ids):
            assert set(i[np.isnan(s)]) >= set(NAN_ROWS)


def test_rows_the_scan_scored_nan_are_rescored_from_the_exact_copy(tmp_path):
    """A compressed copy whose rows overflowed (float16 holds at most 65504) hides nothing from rescoring."""
    g, q = rows_and_queries(1)
    g[[5, 60]] *= 1e5  # finite in float32, inf in float16
    store = write_store(tmp_path / "s", g, "space", shard_rows=100)
    add_copy(store, "float16")
    scores, ids = search(open_store(tmp_path / "s"), q, 10, scan="float16", rescore=N)
    ref = q.astype(np.float64) @ g.astype(np.float64).T
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1, kind="stable")[:, :10])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_queries_are_refused(poisoned, bad):
    store, _, q = poisoned
    q = q.astype(np.float64)
    q[2, 3] = bad
    with pytest.raises(EngineError, match="query 2 holds NaN or infinite") as e:
        search(store, q, 5)
    assert "\n" not in str(e.value)


def test_non_finite_queries_at_the_kernel_give_real_rows():
    """The kernel, called directly with a NaN query: every score NaN, rows 0.. in order, never garbage."""
    g, q = rows_and_queries()
    q[1] = np.nan
    for isa in _search.isa_levels():
        for dtype in quantize.DTYPES:
            stored, scale = quantize.encode(g, dtype)
            s, i = _search.search_shard(q, stored, dtype, 20, scale=scale, isa=isa, exact=g, rescore=2)
            assert_valid(s, i, N, 20)
            assert np.isnan(s[1]).all() and (i[1] == np.arange(20)).all()


@pytest.mark.parametrize("k, rescore", [(2**62, 0), (2**62, 2**62), (2**63 - 1, 2), (7, 2**62), (2**100, 3), (10, 2**100)])
def test_huge_k_and_rescore_give_every_row(poisoned, k, rescore):
    store, g, q = poisoned
    scores, ids = search(store, q, k, scan="int8", rescore=rescore)
    assert_valid(scores, ids, N, k)


@pytest.mark.parametrize("k, rescore", [(2**62, 2**62), (2**63 - 1, 2), (3, 2**63 - 1), (2**62, 0)])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_huge_k_times_rescore_at_the_kernel(k, rescore, dtype):
    """k * rescore overflows int64: all rows are candidates, and rescoring makes the result exact."""
    g, q = rows_and_queries()
    stored, scale = quantize.encode(g, dtype)
    s, i = _search.search_shard(q, stored, dtype, k, scale=scale, exact=g, rescore=rescore, id_offset=10)
    kk = min(k, N)
    assert s.shape == (Q, kk)
    if rescore:
        ref = q.astype(np.float64) @ g.astype(np.float64).T
        np.testing.assert_allclose(s, np.take_along_axis(ref, i - 10, 1), atol=1e-5)
        np.testing.assert_allclose(s, -np.sort(-ref, axis=1)[:, :kk], atol=1e-5)


def test_a_result_beyond_memory_is_refused_before_any_work():
    with pytest.raises(EngineError, match="more than this machine's"):
        check_result_size(10**6, 2**62, 10**9)
    assert check_result_size(3, 2**62, 40) == 40


def test_too_many_threads_is_refused(poisoned):
    store, _, q = poisoned
    with pytest.raises(EngineError, match="threads must be at most"):
        search(store, q, 5, threads=_search.MAX_THREADS + 1)


def _f32():
    g, q = rows_and_queries()
    return g, q, quantize.encode(g, "int8")


def misaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    return out


# (what is wrong, a call of the kernel with it, the error it must raise)
g0, q0, (i8, sc) = _f32()
BAD_CALLS = [
    ("vectors not C-contiguous", lambda: _search.search_shard(q0, np.asfortranarray(g0), "float32", 3), "C-contiguous"),
    ("vectors strided rows", lambda: _search.search_shard(q0, np.repeat(g0, 2, 0)[::2], "float32", 3), "C-contiguous"),
    ("vectors float64", lambda: _search.search_shard(q0, g0.astype(np.float64), "float32", 3), "must be float32"),
    ("vectors big-endian", lambda: _search.search_shard(q0, g0.astype(">f4"), "float32", 3), "must be float32"),
    ("vectors misaligned", lambda: _search.search_shard(q0, misaligned(g0), "float32", 3), "aligned"),
    ("vectors other D", lambda: _search.search_shard(q0, g0[:, :10].copy(), "float32", 3), "x 24"),
    ("vectors 1-d", lambda: _search.search_shard(q0, g0[0], "float32", 3), "2-d"),
    ("vectors 3-d", lambda: _search.search_shard(q0, g0[None], "float32", 3), "2-d"),
    ("vectors int8 as float16", lambda: _search.search_shard(q0, i8, "float16", 3), "must be float16"),
    ("D = 0", lambda: _search.search_shard(q0[:, :0].copy(), g0[:, :0].copy(), "float32", 3), "D >= 1"),
    ("unknown dtype", lambda: _search.search_shard(q0, g0, "int4", 3), "unknown dtype"),
    ("queries float64", lambda: _search.search_shard(q0.astype(np.float64), g0, "float32", 3), "queries must be float32"),
    ("queries strided", lambda: _search.search_shard(np.repeat(q0, 2, 1)[:, ::2], g0, "float32", 3), "C-contiguous"),
    ("queries 1-d", lambda: _search.search_shard(q0[0], g0, "float32", 3), "2-d"),
    ("queries a list", lambda: _search.search_shard(q0.tolist(), g0, "float32", 3), "incompatible function arguments"),
    ("scale missing", lambda: _search.search_shard(q0, i8, "int8", 3), "needs its per-row"),
    ("scale short", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc[:-1]), "one float32 per gallery row"),
    ("scale float64", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc.astype(np.float64)), "must be float32"),
    ("scale strided", lambda: _search.search_shard(q0, i8, "int8", 3, scale=np.repeat(sc, 2)[::2]), "C-contiguous"),
    ("scale a list", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc.tolist()), "numpy array"),
    ("exact missing", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc, rescore=2), "float32 copy"),
    ("exact fewer rows", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc, exact=g0[:-1], rescore=2), "exact"),
    ("exact more rows", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc, exact=np.vstack([g0, g0]), rescore=2), "exact"),
    ("exact float16", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc, exact=g0.astype(np.float16), rescore=2), "float32"),
    ("exact Fortran", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc, exact=np.asfortranarray(g0), rescore=2), "C-contiguous"),
    ("exact a list", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc, exact=g0.tolist(), rescore=2), "numpy array"),
    ("k = 0", lambda: _search.search_shard(q0, g0, "float32", 0), "k must be positive"),
    ("k negative", lambda: _search.search_shard(q0, g0, "float32", -(2**63)), "k must be positive"),
    ("k past int64", lambda: _search.search_shard(q0, g0, "float32", 2**64), "incompatible function arguments"),
    ("rescore negative", lambda: _search.search_shard(q0, i8, "int8", 3, scale=sc, exact=g0, rescore=-1), "rescore"),
    ("id_offset negative", lambda: _search.search_shard(q0, g0, "float32", 3, id_offset=-5), "id_offset"),
    ("id_offset overflows", lambda: _search.search_shard(q0, g0, "float32", 3, id_offset=2**63 - 10), "overflows"),
    ("threads negative", lambda: _search.search_shard(q0, g0, "float32", 3, threads=-1), "threads"),
    ("threads too many", lambda: _search.search_shard(q0, g0, "float32", 3, threads=10**6), "threads"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_arrays_and_sizes_the_kernel_is_not_told_the_truth_about(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
