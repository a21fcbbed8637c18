"""Each loss against its formula written out directly, gradients, zero-loss cases, and the
pytorch-metric-learning behaviour the tuple losses rely on."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from engine.errors import EngineError
from training.losses import (LOSSES, TUPLE_LOSSES, contrastive, contrastive_plus, csd, darkrank,
                             multi_similarity, regression, rkd, triplet)

B, K, D = 5, 5, 16  # 30 reference rows: torch.cdist takes its matmul path, as in training


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.fixture
def tuples():
    """anchors B x D, refs B x (1+K) x D, anchor_teacher B x D: unit rows, float64."""
    return unit(B, D, seed=1), unit(B, 1 + K, D, seed=2), unit(B, D, seed=3)


# ---------------------------------------------------------------- direct formulas
def direct_contrastive(a, refs, margin):
    d = (a[:, None, :] - refs).norm(dim=2)
    return (0.5 * d[:, 0] ** 2).sum() + (0.5 * (margin - d[:, 1:]).clamp(min=0) ** 2).sum()


def test_contrastive_is_the_cirtorch_sum(tuples):
    a, refs, _ = tuples
    for margin in (0.7, 1.2, 1.9):
        assert torch.allclose(contrastive(a, refs, margin=margin), direct_contrastive(a, refs, margin))
    assert torch.allclose(contrastive(a, refs, reduction="mean"), direct_contrastive(a, refs, 0.7) / B)


def test_contrastive_plus_adds_the_anchor_teacher_as_positive(tuples):
    a, refs, t = tuples
    want = direct_contrastive(a, refs, 0.7) + (0.5 * (a - t).norm(dim=1) ** 2).sum()
    assert torch.allclose(contrastive_plus(a, refs, t), want)


def test_triplet_formula(tuples):
    a, refs, _ = tuples
    d2 = ((a[:, None, :] - refs) ** 2).sum(dim=2)
    for margin in (0.1, 0.5):
        want = (d2[:, :1] - d2[:, 1:] + margin).clamp(min=0).sum()
        assert torch.allclose(triplet(a, refs, margin=margin), want)


def test_multi_similarity_formula(tuples):
    a, refs, _ = tuples
    S = torch.einsum("bd,brd->br", a, refs)
    lam, alpha, beta = 0.5, 2.0, 40.0
    pos = torch.log1p(torch.exp(-alpha * (S[:, 0] - lam))) / alpha
    neg = torch.log1p(torch.exp(beta * (S[:, 1:] - lam)).sum(dim=1)) / beta
    assert torch.allclose(multi_similarity(a, refs), (pos + neg).sum())


def test_regression_formula(tuples):
    s, _, t = tuples
    assert torch.allclose(regression(s, t), sum(0.5 * (s[i] - t[i]).dot(s[i] - t[i]) for i in range(B)) / B)


def smooth_l1(x, y):
    r = abs(x - y)
    return 0.5 * r * r if r < 1 else r - 0.5


def direct_rkd(s, t):
    n = len(s)

    def dists(x):
        d = [[(x[i] - x[j]).norm().item() for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
        return [[v / mean for v in row] for row in d]

    def cos(x, i, j, k):
        u, v = x[j] - x[i], x[k] - x[i]
        if j == i or k == i:
            return 0.0
        return (u.dot(v) / (u.norm() * v.norm())).item()

    sd, td = dists(s), dists(t)
    dist_term = sum(smooth_l1(sd[i][j], td[i][j]) for i in range(n) for j in range(n)) / n ** 2
    angle_term = sum(smooth_l1(cos(s, i, j, k), cos(t, i, j, k))
                     for i in range(n) for j in range(n) for k in range(n)) / n ** 3
    return dist_term + 2 * angle_term


def test_rkd_formula():
    s, t = unit(7, 6, seed=4), unit(7, 10, seed=5)  # student and teacher dimensions may differ
    assert rkd(s, t).item() == pytest.approx(direct_rkd(s, t), rel=1e-10)
    # A large scale difference puts distance residuals on the linear branch of Smooth-L1.
    s_far = torch.cat([s[:6], 20 * s[6:]])
    assert rkd(s_far, t).item() == pytest.approx(direct_rkd(s_far, t), rel=1e-10)


def direct_darkrank(s, t, alpha, beta, length):
    total = 0.0
    for i in range(len(s)):
        others = [j for j in range(len(s)) if j != i]
        order = sorted(others, key=lambda j: (t[i] - t[j]).norm().item())[:length]
        scores = [-alpha * (s[i] - s[j]).norm().item() ** beta for j in order]
        total -= sum(scores[m] - math.log(sum(math.exp(v) for v in scores[m:])) for m in range(length))
    return total / len(s)


@pytest.mark.parametrize("alpha,beta,list_len", [(3.0, 3.0, 4), (1.0, 2.0, None), (3.0, 3.0, 1)])
def test_darkrank_formula(alpha, beta, list_len):
    s, t = unit(8, 6, seed=6), unit(8, 12, seed=7)
    length = 7 if list_len is None else list_len
    want = direct_darkrank(s, t, alpha, beta, length)
    assert darkrank(s, t, alpha=alpha, beta=beta, list_len=list_len).item() == pytest.approx(want, rel=1e-10)


def test_csd_formula():
    n, k = 5, 6
    s, t, r = unit(n, D, seed=8), unit(n, D, seed=9), unit(n, k, D, seed=10)
    total = 0.0
    for i in range(n):
        ctx = [t[i]] + [r[i, j] for j in range(k)]
        pt = torch.softmax(torch.stack([t[i].dot(c) for c in ctx]) / 0.01, 0)
        ps = torch.softmax(torch.stack([s[i].dot(c) for c in ctx]) / 1.0, 0)
        total += (pt * (pt.log() - ps.log())).sum().item()
    assert csd(s, t, r).item() == pytest.approx(total / n, rel=1e-10)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", sorted(TUPLE_LOSSES))
def test_tuple_losses_gradients_asymmetric_and_symmetric(name, tuples):
    a, refs, t = (x.float() for x in tuples)
    extra = (t,) if name == "contrastive+" else ()
    # Asymmetric: the teacher tensors are constants; only the student anchor gets a gradient.
    anchors = a.clone().requires_grad_()
    LOSSES[name](anchors, refs, *extra).backward()
    assert anchors.grad is not None and torch.isfinite(anchors.grad).all() and anchors.grad.abs().sum() > 0
    assert not refs.requires_grad and refs.grad is None
    # Symmetric: the references come from the student too and receive gradients.
    anchors, student_refs = a.clone().requires_grad_(), refs.clone().requires_grad_()
    LOSSES[name](anchors, student_refs, *extra).backward()
    assert student_refs.grad is not None and torch.isfinite(student_refs.grad).all()
    assert student_refs.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["regression", "rkd", "darkrank", "csd"])
def test_transfer_losses_train_the_student_only(name):
    s = unit(6, D, seed=11, dtype=torch.float32).requires_grad_()
    t = unit(6, D, seed=12, dtype=torch.float32).requires_grad_()
    extra = (unit(6, 3, D, seed=13, dtype=torch.float32),) if name == "csd" else ()
    LOSSES[name](s, t, *extra).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher is a target, detached inside the loss


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
