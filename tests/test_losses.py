"""Each loss against its formula written out directly (values and gradients, through the one interface
the trainer calls), one-tuple batches, zero-loss cases, and the pytorch-metric-learning behaviour the
tuple losses rely on."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from engine.errors import EngineError
from training.losses import (LOSSES, contrastive, contrastive_plus, csd, darkrank, make_loss,
                             multi_similarity, regression, rkd, triplet)

B, K, D = 5, 5, 16  # 30 reference rows: torch.cdist takes its matmul path, as in training


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.fixture
def tuples():
    """anchors B x D, refs B x (1+K) x D, anchor_teacher B x D: unit rows, float64."""
    return unit(B, D, seed=1), unit(B, 1 + K, D, seed=2), unit(B, D, seed=3)


# ---------------------------------------------------------------- direct formulas (differentiable)
def direct_contrastive(a, refs, margin=0.7):
    d = (a[:, None, :] - refs).norm(dim=2)
    return (0.5 * d[:, 0] ** 2).sum() + (0.5 * (margin - d[:, 1:]).clamp(min=0) ** 2).sum()


def direct_contrastive_plus(a, refs, t, margin=0.7):
    return direct_contrastive(a, refs, margin) + (0.5 * (a - t).norm(dim=1) ** 2).sum()


def direct_triplet(a, refs, margin=0.7):
    d2 = ((a[:, None, :] - refs) ** 2).sum(dim=2)
    return (d2[:, :1] - d2[:, 1:] + margin).clamp(min=0).sum()


def direct_multi_similarity(a, refs, lam=0.5, alpha=2.0, beta=40.0):
    S = torch.einsum("bd,brd->br", a, refs)
    pos = torch.log1p(torch.exp(-alpha * (S[:, 0] - lam))) / alpha
    neg = torch.log1p(torch.exp(beta * (S[:, 1:] - lam)).sum(dim=1)) / beta
    return (pos + neg).sum()


def direct_regression(s, t):
    return sum(0.5 * (s[i] - t[i]).dot(s[i] - t[i]) for i in range(len(s))) / len(s)


def smooth_l1(x, y):
    r = (x - y).abs()
    return 0.5 * r * r if r < 1 else r - 0.5


def direct_rkd(s, t):
    n = len(s)

    def dists(x):
        d = [[(x[i] - x[j]).norm() if i != j else x.new_zeros(()) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
        return [[v / mean for v in row] for row in d]

    def cos(x, i, j, k):
        if j == i or k == i:
            return x.new_zeros(())
        u, v = x[j] - x[i], x[k] - x[i]
        return u.dot(v) / (u.norm() * v.norm())

    sd, td = dists(s), dists(t)
    dist_term = sum(smooth_l1(sd[i][j], td[i][j]) for i in range(n) for j in range(n)) / n ** 2
    angle_term = sum(smooth_l1(cos(s, i, j, k), cos(t, i, j, k))
                     for i in range(n) for j in range(n) for k in range(n)) / n ** 3
    return dist_term + 2 * angle_term


def direct_darkrank(s, t, alpha=3.0, beta=3.0, length=4):
    total = 0.0
    for i in range(len(s)):
        others = [j for j in range(len(s)) if j != i]
        order = sorted(others, key=lambda j: (t[i] - t[j]).norm().item())[:length]
        scores = torch.stack([-alpha * (s[i] - s[j]).norm() ** beta for j in order])
        total = total - sum(scores[m] - torch.logsumexp(scores[m:], dim=0) for m in range(length))
    return total / len(s)


def direct_csd(s, t, r, tau_teacher=0.01, tau_student=1.0):
    total = 0.0
    for i in range(len(s)):
        ctx = [t[i]] + [r[i, j] for j in range(r.shape[1])]
        pt = torch.softmax(torch.stack([t[i].dot(c) for c in ctx]) / tau_teacher, 0)
        ps = torch.softmax(torch.stack([s[i].dot(c) for c in ctx]) / tau_student, 0)
        total = total + (pt * (pt.log() - ps.log())).sum()
    return total / len(s)


# Every registered loss, called (student, teacher, refs, neighbours) -> its direct formula.
REFERENCE = {
    "contrastive": lambda s, t, refs, nb: direct_contrastive(s, refs),
    "contrastive+": lambda s, t, refs, nb: direct_contrastive_plus(s, refs, t),
    "triplet": lambda s, t, refs, nb: direct_triplet(s, refs),
    "multi-similarity": lambda s, t, refs, nb: direct_multi_similarity(s, refs),
    "regression": lambda s, t, refs, nb: direct_regression(s, t),
    "rkd": lambda s, t, refs, nb: direct_rkd(s, t),
    "darkrank": lambda s, t, refs, nb: direct_darkrank(s, t),
    "csd": lambda s, t, refs, nb: direct_csd(s, t, nb),
}
FORMS = [(name, mode) for name in sorted(LOSSES) for mode in ("asym", "sym")
         if mode == "asym" or make_loss(name).symmetric_form]


def batch_for(loss, n=6):
    """A fixed random batch of what `loss` declares it needs: float64 unit rows.
    Tuple losses: n anchors, n x (1+3) refs; the others: n images (teacher D' = D, as CSD needs)."""
    student, teacher = unit(n, D, seed=21), unit(n, D, seed=22)
    refs = unit(n, 4, D, seed=23) if loss.needs_tuples else None
    neighbours = unit(n, loss.needs_neighbours, D, seed=24) if loss.needs_neighbours else None
    return student, teacher, refs, neighbours


@pytest.mark.parametrize("name,mode", FORMS)
def test_each_loss_through_the_interface_matches_its_formula_and_gradient(name, mode):
    loss = make_loss(name, csd_k=4 if name == "csd" else None)
    student, teacher, refs, neighbours = batch_for(loss)
    learns = [student] + ([refs] if mode == "sym" else [])  # sym: the refs are student vectors too
    got_inputs = [x.clone().requires_grad_(any(x is y for y in learns)) if x is not None else None
                  for x in (student, teacher, refs, neighbours)]
    want_inputs = [x.clone().requires_grad_(any(x is y for y in learns)) if x is not None else None
                   for x in (student, teacher, refs, neighbours)]
    got = loss(got_inputs[0], got_inputs[1], refs=got_inputs[2], neighbours=got_inputs[3])
    want = REFERENCE[name](*want_inputs)
    assert got.ndim == 0 and got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    got.backward()
    want.backward()
    for g, w in zip(got_inputs, want_inputs):
        if w is not None and w.requires_grad:
            assert torch.allclose(g.grad, w.grad, rtol=1e-8, atol=1e-12)
    assert got_inputs[0].grad.abs().sum() > 0  # the batch is not a trivial zero of the loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_teacher_side_is_a_fixed_target(name):
    loss = make_loss(name, csd_k=3 if name == "csd" else None)
    student, teacher, refs, neighbours = (None if x is None else x.float() for x in batch_for(loss))
    student.requires_grad_()
    teacher.requires_grad_()
    loss(student, teacher, refs=refs, neighbours=neighbours).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None or not teacher.grad.any()  # contrastive+ reads t(q) but must not move it


# ---------------------------------------------------------------- one tuple, at most one negative
@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("name,direct", [("contrastive", direct_contrastive),
                                         ("multi-similarity", direct_multi_similarity)])
def test_a_single_tuple_still_counts(name, direct, negatives):
    # PML returns a zero loss, with no gradient, when every index list holds at most one pair.
    a = unit(1, D, seed=30)
    positive = unit(1, D, seed=31)  # far from the anchor
    negative = F.normalize(a + 0.2 * unit(1, D, seed=32), dim=1)  # close to it: inside the margin
    refs = torch.stack([positive, negative][:1 + negatives], dim=1)  # 1 x (1 + negatives) x D
    anchors, want_anchors = a.clone().requires_grad_(), a.clone().requires_grad_()
    got = make_loss(name)(anchors, a, refs=refs)
    want = direct(want_anchors, refs)
    assert got.item() == pytest.approx(want.item(), rel=1e-10) and want.item() > 0.1
    got.backward()
    want.backward()
    assert torch.allclose(anchors.grad, want_anchors.grad, rtol=1e-8) and anchors.grad.abs().sum() > 0


# ---------------------------------------------------------------- the functions, with their options
def test_contrastive_margins_and_mean(tuples):
    a, refs, _ = tuples
    for margin in (0.7, 1.2, 1.9):
        assert torch.allclose(contrastive(a, refs, margin=margin), direct_contrastive(a, refs, margin))
    assert torch.allclose(contrastive(a, refs, reduction="mean"), direct_contrastive(a, refs) / B)
    assert torch.allclose(contrastive_plus(a, refs, tuples[2], margin=1.2),
                          direct_contrastive_plus(a, refs, tuples[2], 1.2))
    assert torch.allclose(make_loss("contrastive", margin=1.2, reduction="mean")(a, tuples[2], refs=refs),
                          direct_contrastive(a, refs, 1.2) / B)


def test_triplet_margins(tuples):
    a, refs, _ = tuples
    for margin in (0.1, 0.5):
        assert torch.allclose(triplet(a, refs, margin=margin), direct_triplet(a, refs, margin))


def test_triplet_default_margin_is_the_papers():
    # The AML runs' --loss-margin (0.7), on squared distances: a triplet whose negative is 0.3 (squared)
    # farther than its positive satisfies PML's 0.1 but still counts under the paper's margin.
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    refs = torch.tensor([[[0.8, 0.6], [0.65, 0.76]]], dtype=torch.float64)
    d2 = ((a[:, None] - refs) ** 2).sum(dim=2)[0]
    gap = (d2[1] - d2[0]).item()
    assert 0.1 < gap < 0.7
    assert make_loss("triplet").margin == 0.7 == inspect.signature(triplet).parameters["margin"].default
    assert triplet(a, refs, margin=0.1).item() == 0.0
    assert make_loss("triplet")(a, a, refs=refs).item() == pytest.approx(0.7 - gap, rel=1e-12)


@pytest.mark.parametrize("n", [1, 5, 20])
def test_regression_sum_is_the_mean_times_the_batch(n):
    # The AML code sums 1/2 ||s - t||^2 over its 5-image batches; the project's default averages: the
    # gradient differs by exactly the batch size, which changes what a learning rate and weight decay mean.
    s, t = unit(n, D, seed=40), unit(n, D, seed=41)
    grads = {}
    for reduction in ("mean", "sum"):
        x = s.clone().requires_grad_()
        loss = make_loss("regression", reduction=reduction)(x, t)
        loss.backward()
        grads[reduction] = (loss.detach(), x.grad)
        assert make_loss("regression", reduction=reduction).reduction == reduction
    assert torch.allclose(grads["sum"][0], n * grads["mean"][0], rtol=1e-12)
    assert torch.allclose(grads["sum"][1], n * grads["mean"][1], rtol=1e-12)
    assert torch.allclose(grads["sum"][1], s - t, rtol=1e-12)  # d/ds of sum 1/2 ||s - t||^2
    assert make_loss("regression").reduction == "mean"


def test_multi_similarity_options(tuples):
    a, refs, _ = tuples
    assert torch.allclose(multi_similarity(a, refs, lam=0.3, alpha=1.0, beta=10.0),
                          direct_multi_similarity(a, refs, 0.3, 1.0, 10.0))


def test_rkd_across_dimensions_and_smooth_l1_branches():
    s, t = unit(7, 6, seed=4), unit(7, 10, seed=5)  # student and teacher dimensions may differ
    assert rkd(s, t).item() == pytest.approx(direct_rkd(s, t).item(), rel=1e-10)
    # A large scale difference puts distance residuals on the linear branch of Smooth-L1.
    s_far = torch.cat([s[:6], 20 * s[6:]])
    assert rkd(s_far, t).item() == pytest.approx(direct_rkd(s_far, t).item(), rel=1e-10)


@pytest.mark.parametrize("alpha,beta,list_len", [(3.0, 3.0, 4), (1.0, 2.0, None), (3.0, 3.0, 1)])
def test_darkrank_options(alpha, beta, list_len):
    s, t = unit(8, 6, seed=6), unit(8, 12, seed=7)
    length = 7 if list_len is None else list_len
    want = direct_darkrank(s, t, alpha, beta, length).item()
    assert darkrank(s, t, alpha=alpha, beta=beta, list_len=list_len).item() == pytest.approx(want, rel=1e-10)


def test_csd_temperatures():
    s, t, r = unit(5, D, seed=8), unit(5, D, seed=9), unit(5, 6, D, seed=10)
    want = direct_csd(s, t, r, 0.05, 0.5).item()
    assert csd(s, t, r, tau_teacher=0.05, tau_student=0.5).item() == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------- zero-loss cases
def test_perfect_tuples_have_zero_loss():
    a = torch.eye(B, D, dtype=torch.float64)
    refs = torch.stack([a] + [-a] * K, dim=1)  # positive == anchor, negatives at distance 2
    assert contrastive(a, refs).item() == pytest.approx(0.0, abs=1e-12)
    assert contrastive_plus(a, refs, a.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert triplet(a, refs, margin=0.1).item() == 0.0


def test_perfect_transfer_has_zero_loss():
    t = unit(9, D, seed=14)
    assert regression(t.clone(), t).item() == 0.0
    # RKD is invariant to rotating and scaling the student space.
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert rkd(3.0 * t @ q, t).item() == pytest.approx(0.0, abs=1e-12)
    # With equal temperatures, a student equal to its teacher matches the context distribution.
    r = unit(9, 4, D, seed=15)
    assert csd(t.clone(), t, r, tau_teacher=0.05, tau_student=0.05).item() == pytest.approx(0.0, abs=1e-12)


def test_darkrank_prefers_the_teacher_order():
    t = unit(8, D, seed=16)
    agree = darkrank(t.clone(), t, list_len=None)
    shuffled = darkrank(t[torch.randperm(8, generator=torch.Generator().manual_seed(1))], t, list_len=None)
    assert agree < shuffled


# ---------------------------------------------------------------- PML's pairing
def test_pml_drops_self_pairs_only_when_ref_labels_is_labels():
    labels = torch.tensor([0, 1, 2])
    a1, _, _, _ = lmu.get_all_pairs_indices(labels, labels)
    assert len(a1) == 0  # same object: the diagonal (i, i) is taken for the same image
    a1, p, _, _ = lmu.get_all_pairs_indices(labels, labels.clone())
    assert a1.tolist() == p.tolist() == [0, 1, 2]  # an equal copy: (i, i) counted as positives


def test_tuple_losses_use_exactly_the_tuple_pairs():
    # Tuple j's negatives contain anchor i (j != i) and refs are the anchors' own tensors:
    # deriving pairs from labels or from the batch would add or drop terms; ours must not.
    a = unit(3, D, seed=17)
    refs = torch.stack([a, a.roll(1, 0), a.roll(2, 0)], dim=1)  # positive = the anchor itself
    want = direct_contrastive(a, refs, 1.9)
    assert torch.allclose(contrastive(a, refs, margin=1.9), want)
    d = (a[:, None, :] - refs).norm(dim=2)
    assert want == pytest.approx((0.5 * (1.9 - d[:, 1:]) ** 2).sum().item())  # B + B*K pairs only


# ---------------------------------------------------------------- what the trainer reads, and bad input
def test_declared_needs_follow_the_options():
    assert make_loss("csd", csd_k=7).needs_neighbours == 7
    assert make_loss("darkrank").min_images == 5  # a list of 4 others per image
    assert LOSSES["darkrank"](list_len=None).min_images == 2  # all others: any two images
    summed = {name for name in LOSSES if make_loss(name).reduction == "sum"}  # each loss's own default
    assert summed == {name for name in LOSSES if make_loss(name).needs_tuples}
    assert make_loss("contrastive", reduction="mean").reduction == "mean"


@pytest.mark.parametrize("name,options,message", [
    ("nope", {}, "unknown loss 'nope'"),
    ("regression", {"margin": 0.5}, "regression takes no margin"),
    ("multi-similarity", {"margin": 0.5}, "multi-similarity takes no margin"),
    ("contrastive", {"csd_k": 4}, "contrastive takes no csd_k"),
    ("contrastive", {"margin": math.nan}, "--margin must be a finite number >= 0, got nan"),
    ("triplet", {"margin": -0.1}, "--margin must be a finite number >= 0, got -0.1"),
    ("contrastive+", {"margin": math.inf}, "--margin must be a finite number >= 0, got inf"),
    ("csd", {"csd_k": 0}, "--csd-k must be an integer >= 1, got 0"),
    ("contrastive", {"reduction": "max"}, "--reduction must be one of sum, mean"),
])
def test_bad_loss_options_are_refused(name, options, message):
    with pytest.raises(EngineError, match=message.replace("+", r"\+")):
        make_loss(name, **options)


def test_bad_shapes_are_reported(tuples):
    a, refs, t = tuples
    with pytest.raises(EngineError, match="does not match anchors"):
        contrastive(a, refs[:, :, :8])
    with pytest.raises(EngineError, match="anchor_teacher"):
        contrastive_plus(a, refs, t[:2])
    with pytest.raises(EngineError, match="same images"):
        regression(a, t[:2])
    with pytest.raises(EngineError, match="list_len"):
        darkrank(a, t, list_len=B)
    with pytest.raises(EngineError, match="needs refs"):
        make_loss("triplet")(a, t)
    with pytest.raises(EngineError, match="every tuple needs a negative"):
        triplet(a, refs[:, :1])
