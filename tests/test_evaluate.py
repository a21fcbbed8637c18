"""The revisited protocol against hand-worked cases and an independent implementation (revisitop's algorithm)."""
import numpy as np
import pytest

from engine.evaluate import average_precision, compute_map, evaluate_revisited, positive_ranks, precision_at


def revisitop_compute_map(ranks, gnd, kappas=(1, 5, 10)):
    """The official revisitop algorithm (merge walk over positives and junk), written out again on NumPy 2."""
    nq = len(gnd)
    total_ap, nempty = 0.0, 0
    prs_sum = np.zeros(len(kappas))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i].get("junk", []), dtype=int)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else j / rank
            p1 = (j + 1) / (rank + 1)
            ap += (p0 + p1) / 2.0 / len(qgnd)
        total_ap += ap
        pos = pos + 1
        for j, kap in enumerate(kappas):
            kq = min(max(pos), kap)
            prs_sum[j] += (pos <= kq).sum() / kq
    n = nq - nempty
    return total_ap / n, prs_sum / n


def to_protocol(gnd, protocol):
    out = []
    for g in gnd:
        if protocol == "easy":
            out.append({"ok": g["easy"], "junk": g["junk"] + g["hard"]})
        elif protocol == "medium":
            out.append({"ok": g["easy"] + g["hard"], "junk": g["junk"]})
        else:
            out.append({"ok": g["hard"], "junk": g["junk"] + g["easy"]})
    return out


def test_single_positive_first_and_second():
    assert average_precision(np.array([0]), 1) == 1.0
    # positive at rank 1: prec0 = 0/1, prec1 = 1/2 -> 0.25
    assert average_precision(np.array([1]), 1) == pytest.approx(0.25)


def test_hand_worked_ap_with_junk_removed():
    # ranking: 5 (junk), 3 (pos), 7 (neg), 2 (pos); n_pos = 3 (one positive never retrieved)
    ranking = np.array([5, 3, 7, 2])
    pos = positive_ranks(ranking, positives=np.array([3, 2, 9]), ignored=np.array([5]))
    assert pos.tolist() == [0, 2]  # junk removed: 3 is first, 2 third
    # j=0, r=0: (1 + 1)/2 = 1 ; j=1, r=2: (1/2 + 2/3)/2 = 7/12 ; / 3 positives
    assert average_precision(pos, 3) == pytest.approx((1 + 7 / 12) / 3)


def test_precision_at_k_uses_last_positive_cap():
    pos = np.array([0, 2])  # 1-based ranks 1 and 3
    np.testing.assert_allclose(precision_at(pos, (1, 5, 10)), [1.0, 2 / 3, 2 / 3])


def test_queries_without_positives_are_skipped():
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [], "hard": [], "junk": [1]}]
    ranks = np.array([[0, 0], [1, 1]])
    m, aps, _, _ = compute_map(ranks, gnd, "easy")
    assert m == 1.0 and np.isnan(aps[1])


def test_ties_are_resolved_by_the_ranking_given():
    # evaluation scores the order it is handed; two orders of tied items give their own APs
    gnd = [{"easy": [1], "hard": [], "junk": []}]
    assert compute_map(np.array([[1], [0]]), gnd, "easy")[0] == 1.0
    assert compute_map(np.array([[0], [1]]), gnd, "easy")[0] == pytest.approx(0.25)


def test_protocols_move_hard_and_easy_between_positive_and_ignored():
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    ranks = np.array([[1], [2], [0], [3]])
    res = evaluate_revisited(ranks, gnd)
    # easy: hard(1) and junk(2) ignored -> 0 first
    assert res["easy"]["mAP"] == pytest.approx(100.0)
    # medium: positives 1, 0 at ranks 0, 1 after removing junk
    assert res["medium"]["mAP"] == pytest.approx(100.0)
    # hard: easy(0), junk(2) ignored -> 1 first
    assert res["hard"]["mAP"] == pytest.approx(100.0)
    res2 = evaluate_revisited(np.array([[3], [1], [2], [0]]), gnd)
    assert res2["hard"]["mAP"] == pytest.approx(25.0)


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_revisitop_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n_gallery, n_q = 300, 25
    gnd = []
    for q in range(n_q):
        perm = rng.permutation(n_gallery)
        ne, nh, nj = rng.integers(0, 12, size=3)
        gnd.append({"easy": perm[:ne].tolist(), "hard": perm[ne:ne + nh].tolist(), "junk": perm[ne + nh:ne + nh + nj].tolist()})
    ranks = np.stack([rng.permutation(n_gallery) for _ in range(n_q)], axis=1)
    for protocol in ("easy", "medium", "hard"):
        ref_gnd = to_protocol(gnd, protocol)
        if all(len(g["ok"]) == 0 for g in ref_gnd):
            continue
        ref_map, ref_pr = revisitop_compute_map(ranks, ref_gnd)
        m, _, mpr, _ = compute_map(ranks, gnd, protocol)
        assert abs(m - ref_map) < 1e-6
        np.testing.assert_allclose(mpr, ref_pr, atol=1e-6)


def test_rank_matrix_shape_is_checked():
    from engine.errors import EngineError

    with pytest.raises(EngineError, match="expected"):
        compute_map(np.zeros((4, 3), int), [{"easy": [0], "hard": [], "junk": []}] * 2)


def test_a_ranking_that_would_be_miscounted_is_refused():
    from engine.errors import EngineError

    gnd = [{"easy": [0], "hard": [], "junk": []}]
    with pytest.raises(EngineError, match="lists gallery id 0 more than once"):
        compute_map(np.array([[0], [0], [1]]), gnd, "easy")  # would count one positive twice: AP > 1
    with pytest.raises(EngineError, match="must be integers, got float64"):
        compute_map(np.array([[0.7], [1.0]]), gnd, "easy")  # not truncated to 0
    with pytest.raises(EngineError, match=">= 0"):
        compute_map(np.array([[-1], [0]]), gnd, "easy")


def test_results_file_round_trip_and_every_defect_named(tmp_path):
    from engine.errors import EngineError
    from engine.results import load_results, save_results

    ids = np.array([[2, 0, 1], [1, 2, 0]])
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.2]])
    save_results(tmp_path / "r.npz", ids, scores)
    got_ids, got_scores = load_results(tmp_path / "r.npz")
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores.astype(np.float32))
    assert not [p for p in tmp_path.iterdir() if p.name != "r.npz"]  # written into place, no temporary left

    np.save(tmp_path / "plain.npy", ids)
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "noscores.npz", ids=ids)
    np.savez(tmp_path / "float.npz", ids=ids.astype(np.float64), scores=scores)
    np.savez(tmp_path / "shape.npz", ids=ids, scores=scores[:, :2])
    np.savez(tmp_path / "negative.npz", ids=-ids, scores=scores)
    np.savez(tmp_path / "strings.npz", ids=ids, scores=np.array([["a", "b", "c"]] * 2))
    cases = {"absent.npz": "no such results file", "plain.npy": "a single array", "text.npz": "not a readable results .npz",
             "noscores.npz": "no 'scores'", "float.npz": "must be integers, got float64", "shape.npz": "must match",
             "negative.npz": ">= 0", "strings.npz": "must be real numbers"}
    for name, message in cases.items():
        with pytest.raises(EngineError, match=message) as err:
            load_results(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
