"""The C++ shard kernel (engine._search) against a float64 numpy reference, on every ISA tier this CPU runs."""
import numpy as np
import pytest

from engine import _search, quantize

ISAS = _search.isa_levels()
RESCORE = {"float32": 0, "float16": 8, "bfloat16": 8, "int8": 8}


def reference(q, g, k):
    """float64 scores (Q x N) and the top-k ids, ties by lower id (rows partitioned first: a full sort of
    1000 x 9000 scores took seconds)."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    kk = min(k, g.shape[0])
    kth = -np.partition(-s, kk - 1, axis=1)[:, kk - 1]
    ids = np.empty((len(q), kk), np.int64)
    for i in range(len(q)):
        cand = np.flatnonzero(s[i] >= kth[i])
        ids[i] = cand[np.lexsort((cand, -s[i, cand]))][:kk]
    return s, ids


def assert_exact(scores, ids, q, g, k, tol=1e-4):
    """Scores agree with float64 within tol, and ids are identical wherever the reference is not tied within tol."""
    ref, rid = reference(q, g, k)
    kk = min(k, g.shape[0])
    assert scores.shape == ids.shape == (len(q), kk)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ids, 1), atol=tol)
    top = np.take_along_axis(ref, rid, 1)
    np.testing.assert_allclose(scores, top, atol=tol)
    # top[:, j] is the (j+1)-th largest score: it is untied when both sorted neighbours are more than tol away,
    # and then the id must be the reference's
    srt = -np.sort(np.partition(-ref, min(kk, ref.shape[1] - 1), axis=1)[:, : kk + 1], axis=1)
    inf = np.full((len(q), 1), np.inf)
    gap_above = np.diff(np.concatenate([inf, -srt], axis=1), axis=1)[:, :kk]
    gap_below = np.diff(np.concatenate([-srt, inf], axis=1), axis=1)[:, :kk]
    untied = (gap_above > tol) & (gap_below > tol)
    bad = np.argwhere(untied & (ids != rid))
    assert not len(bad), bad[:5]


def data(n, d, nq, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return rng.standard_normal((nq, d)).astype(np.float32), g


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", quantize.DTYPES)
@pytest.mark.parametrize("d", [1, 3, 17, 129])
def test_exact_with_rescoring(isa, dtype, d):
    q, g = data(300, d, 5, seed=d)
    stored, scale = quantize.encode(g, dtype)
    s, i = _search.search_shard(q, stored, dtype, 10, scale=scale, exact=g, rescore=RESCORE[dtype], isa=isa)
    assert_exact(s, i, q, g, 10)


@pytest.mark.parametrize("nq", [1, 5, 70])
@pytest.mark.parametrize("dtype", quantize.DTYPES)
def test_query_counts_and_threads(nq, dtype):
    q, g = data(2100, 65, nq, seed=nq)
    stored, scale = quantize.encode(g, dtype)
    runs = [
        _search.search_shard(q, stored, dtype, 7, scale=scale, exact=g, rescore=RESCORE[dtype], threads=t)
        for t in (1, 2, 3)
    ]
    assert_exact(*runs[0], q, g, 7)
    for s, i in runs[1:]:  # the partition across threads never changes a result, not even a bit
        np.testing.assert_array_equal(s, runs[0][0])
        np.testing.assert_array_equal(i, runs[0][1])


def test_k_larger_than_n_and_offset():
    q, g = data(13, 9, 4)
    s, i = _search.search_shard(q, g, "float32", 50, id_offset=1000)
    assert s.shape == (4, 13)
    assert_exact(s, i - 1000, q, g, 13)


@pytest.mark.parametrize("n,d", [(500, 77), (3500, 301)])
@pytest.mark.parametrize("nq", [6, 37])
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_unrescored_scan_identical_across_isas(dtype, nq, n, d):
    """int8 sums are exact integers on every tier; bfloat16 products are exact (the query is rounded to bf16).

    37 queries take the many-query kernels (packed int8 tiles on VNNI, packed float tiles) with odd
    sizes everywhere: D = 77 not a multiple of 4, 500 rows not a multiple of 16, 37 queries not of 8.
    D = 301 (padded to 320) is one 256-byte depth chunk of the packed int8 kernel plus a 64-byte one whose
    last real dword is partial, and 3500 rows are two of its 1632-row tiles plus 236 (no whole 32-row panel)."""
    q, g = data(n, d, nq)
    stored, scale = quantize.encode(g, dtype)
    base = _search.search_shard(q, stored, dtype, 20, scale=scale, isa="scalar")
    for isa in ISAS[1:]:
        s, i = _search.search_shard(q, stored, dtype, 20, scale=scale, isa=isa)
        if dtype == "int8":
            np.testing.assert_array_equal(s, base[0])
        np.testing.assert_allclose(s, base[0], atol=1e-5)
        assert (i == base[1]).mean() > 0.98


# Many-query float scans go through the packed kernel (12 / 6 / 4 queries x 32 / 16 / 8 rows per register tile
# on avx512 / avx2 / scalar, 256-column depth chunks, tiles of 512 KiB). Awkward sizes on purpose: D = 300 is
# one full chunk plus 44 columns, 1000 rows are 2 tiles of 416 plus 168 (not a whole panel), Q = 37 is no
# multiple of any register tile; 9000 rows x 1043 queries take the large-block path (blocks of 1020 or 1024
# queries, a multiple of the register tile, then 23 or 19; rows split across threads);
# 45 rows with k = 50 return every row, so a padding row that leaked out would show.
PACKED_CASES = [(1000, 300, 37, 10), (9000, 19, 1043, 10), (45, 20, 20, 50)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n, d, nq, k", PACKED_CASES)
def test_packed_float_scans_match_float64(isa, dtype, n, d, nq, k):
    """The scan's own scores against float64 on the decoded gallery (bfloat16 scans round the query to bf16 first)."""
    q, g = data(n, d, nq, seed=d)
    stored, _ = quantize.encode(g, dtype)
    rows = quantize.decode(stored, dtype)
    qr = quantize.decode(quantize.encode(q, dtype)[0], dtype) if dtype == "bfloat16" else q
    s, i = _search.search_shard(q, stored, dtype, k, threads=2, isa=isa)
    assert_exact(s, i, qr, rows, k)


@pytest.mark.parametrize("n, d, nq, k", PACKED_CASES)
def test_packed_float32_scores_do_not_depend_on_threads_or_simd_width(n, d, nq, k):
    """Each score is one running sum over the columns in order, so thread splits and the AVX2 / AVX-512 tiers
    (both FMA) give the same bits; the scalar tier rounds each product and agrees within float32 error."""
    q, g = data(n, d, nq, seed=1)
    runs = {(isa, t): _search.search_shard(q, g, "float32", k, threads=t, isa=isa) for isa in ISAS for t in (1, 3)}
    base = runs[(ISAS[-1], 1)]
    for (isa, _), (s, i) in runs.items():
        if isa == "scalar":
            np.testing.assert_allclose(s, base[0], atol=1e-5)
            assert (i == base[1]).mean() > 0.99
        else:
            np.testing.assert_array_equal(s, base[0])
            np.testing.assert_array_equal(i, base[1])


def test_ties_go_to_the_lower_id():
    g = np.tile(np.eye(4, 8, dtype=np.float32), (50, 1))  # every row repeated 50 times
    q = np.ones((3, 8), np.float32)
    for isa in ISAS:
        s, i = _search.search_shard(q, g, "float32", 10, threads=2, isa=isa)
        np.testing.assert_array_equal(i, np.tile(np.arange(10), (3, 1)))
        assert (s == 1).all()


def test_unrescored_recall_bounds():
    """Stated bounds for the compressed scans alone (unit vectors, D = 128, N = 4000): bf16 recall@10 >= 0.98, int8 >= 0.95."""
    q, g = data(4000, 128, 20)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, rid = reference(q, g, 10)
    for dtype, bound in (("bfloat16", 0.98), ("int8", 0.95)):
        stored, scale = quantize.encode(g, dtype)
        _, i = _search.search_shard(q, stored, dtype, 10, scale=scale)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, rid)])
        assert recall >= bound, (dtype, recall)


def test_bad_arguments():
    q, g = data(10, 4, 2)
    with pytest.raises(ValueError, match="bfloat16 gallery .* must be uint16"):
        _search.search_shard(q, g, "bfloat16", 3)
    with pytest.raises(ValueError, match="scale"):
        _search.search_shard(q, quantize.encode(g, "int8")[0], "int8", 3)
    with pytest.raises(ValueError, match="float32 copy"):
        _search.search_shard(q, quantize.encode(g, "float16")[0], "float16", 3, rescore=2)
    with pytest.raises(ValueError, match="unknown isa"):
        _search.search_shard(q, g, "float32", 3, isa="sse9")
    with pytest.raises(ValueError, match="contiguous"):
        _search.search_shard(q, np.asfortranarray(g), "float32", 3)
    with pytest.raises(ValueError, match="k must"):
        _search.search_shard(q, g, "float32", 0)
    assert ISAS[0] == "scalar" and _search.default_threads() >= 1


def poisoned(dtype, g, rows):
    """The stored copy of g with `rows` scoring NaN: NaN values in a float copy, a NaN scale for int8."""
    stored, scale = quantize.encode(g, dtype)
    if dtype == "int8":
        scale[rows] = np.nan
    else:
        bad = np.full((len(rows), g.shape[1]), np.nan, np.float32)
        stored[rows] = quantize.encode(bad, dtype)[0]
    return stored, scale


# 3 queries scan rows as stored, 37 take every tier's packed kernels (float tiles; int8 tiles on VNNI)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", quantize.DTYPES)
@pytest.mark.parametrize("nq", [3, 37])
@pytest.mark.parametrize("rescore", [0, 3])
def test_nan_rows_rank_last_and_every_id_is_a_row(isa, dtype, nq, rescore):
    """NaN scores never enter the reservoir; the result still holds exactly min(k, N) distinct rows: the rows
    with numbers, best first, then the NaN rows by lower id at score NaN (here k exceeds the clean rows)."""
    q, g = data(700, 33, nq, seed=nq)
    bad = np.arange(0, 700, 3)  # a third of the rows, in every tile and chunk
    stored, scale = poisoned(dtype, g, bad)
    exact = g.copy()
    exact[bad] = np.nan
    k = 600
    s, i = _search.search_shard(q, stored, dtype, k, scale=scale, exact=exact if rescore else None, rescore=rescore,
                                threads=2, isa=isa)
    assert s.shape == i.shape == (nq, k)
    assert all(len(set(row)) == k for row in i) and ((i >= 0) & (i < 700)).all()
    clean = 700 - len(bad)
    assert not np.isnan(s[:, :clean]).any() and np.isnan(s[:, clean:]).all()
    np.testing.assert_array_equal(np.sort(i[:, :clean], axis=1), np.tile(np.setdiff1d(np.arange(700), bad), (nq, 1)))
    np.testing.assert_array_equal(i[:, clean:], np.tile(bad[: k - clean], (nq, 1)))
    assert (s[:, : clean - 1] >= s[:, 1:clean]).all()


def test_rows_scored_nan_only_by_the_scan_are_rescored():
    """A compressed copy's NaN rows (the float32 copy clean) are still candidates, ranked by their exact score."""
    q, g = data(50, 16, 4)
    stored, _ = poisoned("float16", g, [1, 2, 30])
    for isa in ISAS:
        s, i = _search.search_shard(q, stored, "float16", 10, exact=g, rescore=5, isa=isa)  # 50 candidates: all rows
        assert_exact(s, i, q, g, 10)


def test_concurrent_searches_from_python_threads():
    """The GIL is released while scanning: searches from several Python threads share the one pool safely."""
    from concurrent.futures import ThreadPoolExecutor

    q, g = data(5000, 64, 20)
    stored, scale = quantize.encode(g, "int8")
    expect = _search.search_shard(q, stored, "int8", 10, scale=scale, exact=g, rescore=4, threads=2)
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: _search.search_shard(q, stored, "int8", 10, scale=scale, exact=g, rescore=4,
                                                             threads=2), range(12)))
    for s, i in runs:
        np.testing.assert_array_equal(s, expect[0])
        np.testing.assert_array_equal(i, expect[1])
