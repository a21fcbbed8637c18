"""Training losses, as functions: each returns a 0-dim tensor.

Calling convention (every entry of `LOSSES`): `loss(student, teacher, *extra, **options)`.

Tuple losses ("contrastive", "contrastive+", "triplet", "multi-similarity") take a batch of
B tuples (q_i, p_i, n_i1..n_iK) as
    anchors: B x D         s(q_i), from the student;
    refs:    B x (1+K) x D  p_i then n_i1..n_iK: stored teacher vectors t(.) in the asymmetric
                            form, student vectors s(.) in the symmetric form;
    anchor_teacher: B x D   t(q_i), contrastive+ only.
Anchor i meets only its own positive and its own negatives. They are summed over the pairs of
a tuple and over the tuples of the batch, as the cirtorch / AML reference code does (it runs
backward once per tuple, so gradients add up); `reduction="mean"` divides by B instead.

Knowledge-transfer losses ("regression", "rkd", "darkrank", "csd") take rows of the same N
images: student N x D, teacher N x D' (D' = D for regression and CSD); CSD also takes the
teacher vectors of each image's teacher top-K neighbours, N x K x D. No labels. The teacher
side is a fixed target: it is detached.

The pair and tuple losses are pytorch-metric-learning's, called with `ref_emb` and an explicit
`indices_tuple` and no labels, so PML never derives pairs from labels (it would drop the
pair (i, i) only when `ref_labels is labels`, and otherwise pair every anchor with every
reference of the same label).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses as pml_losses, reducers

from engine.errors import EngineError
from kernels import l2n

__all__ = [
    "LOSSES",
    "TUPLE_LOSSES",
    "contrastive",
    "contrastive_plus",
    "csd",
    "darkrank",
    "multi_similarity",
    "regression",
    "rkd",
    "triplet",
]


# ---------------------------------------------------------------- tuple layout
def _check_tuples(anchors: torch.Tensor, refs: torch.Tensor) -> tuple[int, int, int]:
    """(B, R, D) of a tuple batch, or a clear error when the shapes do not fit together."""
    if anchors.ndim != 2 or refs.ndim != 3:
        raise EngineError(f"tuple loss: anchors must be B x D and refs B x (1+K) x D, got "
                          f"{tuple(anchors.shape)} and {tuple(refs.shape)}")
    B, D = anchors.shape
    if refs.shape[0] != B or refs.shape[2] != D or refs.shape[1] < 1:
        raise EngineError(f"tuple loss: refs {tuple(refs.shape)} does not match anchors "
                          f"{tuple(anchors.shape)} (expected {B} x (1+K) x {D})")
    return B, refs.shape[1], D


def _tuple_pairs(B: int, R: int, device: torch.device):
    """Index pairs into refs flattened to (B*R) x D: anchor i with row i*R (its positive) and
    rows i*R+1 .. i*R+R-1 (its negatives). Returns (pos_a, pos_r, neg_a, neg_r), int64."""
    a = torch.arange(B, device=device)
    neg_r = (a[:, None] * R + torch.arange(1, R, device=device)).reshape(-1)
    return a, a * R, a.repeat_interleave(R - 1), neg_r


def _reduce(total: torch.Tensor, B: int, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / B
    raise EngineError(f"unknown reduction {reduction!r}: expected 'sum' or 'mean'")


# ---------------------------------------------------------------- pair and tuple losses
class _HalfSquaredContrastive(pml_losses.ContrastiveLoss):
    """PML's contrastive loss with the cirtorch per-pair terms: 1/2 d^2 for a positive
    (pos_margin 0), 1/2 max(0, m - d)^2 for a negative. PML's own terms are unsquared hinges."""

    def get_per_pair_loss(self, pair_dists, pos_or_neg):
        return 0.5 * super().get_per_pair_loss(pair_dists, pos_or_neg) ** 2


def _euclidean(power: int = 1) -> distances.LpDistance:
    # Descriptors arrive L2-normalised; re-normalising would hide a caller's bug and change
    # the formula for anyone passing raw vectors.
    return distances.LpDistance(normalize_embeddings=False, p=2, power=power)


def _pml_contrastive(anchors, ref_emb, pairs, margin: float) -> torch.Tensor:
    loss = _HalfSquaredContrastive(pos_margin=0.0, neg_margin=margin,
                                   distance=_euclidean(), reducer=reducers.SumReducer())
    return loss(anchors, indices_tuple=pairs, ref_emb=ref_emb)


def contrastive(anchors: torch.Tensor, refs: torch.Tensor, margin: float = 0.7,
                reduction: str = "sum") -> torch.Tensor:
    """Contrastive loss over tuples: with d = ||a - x||,
    sum_i [1/2 d(a_i, p_i)^2 + sum_k 1/2 max(0, margin - d(a_i, n_ik))^2].

    anchors: B x D (student); refs: B x (1+K) x D (positive, then K negatives).
    reduction: "sum" over tuples (cirtorch) or "mean" over tuples. Returns a 0-dim tensor.
    """
    B, R, D = _check_tuples(anchors, refs)
    pairs = _tuple_pairs(B, R, anchors.device)
    return _reduce(_pml_contrastive(anchors, refs.reshape(B * R, D), pairs, margin), B, reduction)


def contrastive_plus(anchors: torch.Tensor, refs: torch.Tensor, anchor_teacher: torch.Tensor,
                     margin: float = 0.7, reduction: str = "sum") -> torch.Tensor:
    """Contr+: the asymmetric contrastive loss with the anchor image's own teacher vector t(q_i)
    as a second positive, i.e. contrastive(anchors, refs) + sum_i 1/2 ||s(q_i) - t(q_i)||^2.

    anchors: B x D (student); refs: B x (1+K) x D (teacher); anchor_teacher: B x D (teacher).
    Returns a 0-dim tensor (reduction as in `contrastive`).
    """
    B, R, D = _check_tuples(anchors, refs)
    if anchor_teacher.shape != anchors.shape:
        raise EngineError(f"contrastive+: anchor_teacher {tuple(anchor_teacher.shape)} must match "
                          f"anchors {tuple(anchors.shape)}")
    pos_a, pos_r, neg_a, neg_r = _tuple_pairs(B, R, anchors.device)
    # t(q_i) is appended after the B*R reference rows, at row B*R + i.
    ref_emb = torch.cat([refs.reshape(B * R, D), anchor_teacher])
    pairs = (torch.cat([pos_a, pos_a]), torch.cat([pos_r, B * R + pos_a]), neg_a, neg_r)
    return _reduce(_pml_contrastive(anchors, ref_emb, pairs, margin), B, reduction)


def triplet(anchors: torch.Tensor, refs: torch.Tensor, margin: float = 0.1,
            reduction: str = "sum") -> torch.Tensor:
    """Triplet loss over tuples: sum_i sum_k max(0, ||a_i - p_i||^2 - ||a_i - n_ik||^2 + margin).

    anchors: B x D; refs: B x (1+K) x D (K >= 1). margin 0.1 as in the AML code.
    Returns a 0-dim tensor (reduction as in `contrastive`).
    """
    B, R, D = _check_tuples(anchors, refs)
    _, pos_r, neg_a, neg_r = _tuple_pairs(B, R, anchors.device)
    loss = pml_losses.TripletMarginLoss(margin=margin, distance=_euclidean(power=2),
                                        reducer=reducers.SumReducer())
    indices = (neg_a, pos_r.repeat_interleave(R - 1), neg_r)
    return _reduce(loss(anchors, indices_tuple=indices, ref_emb=refs.reshape(B * R, D)), B, reduction)


def multi_similarity(anchors: torch.Tensor, refs: torch.Tensor, lam: float = 0.5,
                     alpha: float = 2.0, beta: float = 40.0, reduction: str = "sum") -> torch.Tensor:
    """Multi-similarity loss on the similarities S = a_i . x of each anchor:
    sum_i [1/alpha log(1 + exp(-alpha (S_ip - lam))) + 1/beta log(1 + sum_k exp(beta (S_ik - lam)))].

    anchors: B x D; refs: B x (1+K) x D. Inner products, no re-normalisation.
    Returns a 0-dim tensor (reduction as in `contrastive`).
    """
    B, R, D = _check_tuples(anchors, refs)
    pairs = _tuple_pairs(B, R, anchors.device)
    loss = pml_losses.MultiSimilarityLoss(
        alpha=alpha, beta=beta, base=lam,
        distance=distances.DotProductSimilarity(normalize_embeddings=False),
        reducer=reducers.SumReducer())
    return _reduce(loss(anchors, indices_tuple=pairs, ref_emb=refs.reshape(B * R, D)), B, reduction)


# ---------------------------------------------------------------- knowledge-transfer losses
def _check_same_images(name: str, student: torch.Tensor, teacher: torch.Tensor, same_dim: bool):
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[0] != teacher.shape[0] or (
            same_dim and student.shape[1] != teacher.shape[1]):
        want = "N x D each" if same_dim else "N x D and N x D'"
        raise EngineError(f"{name}: student {tuple(student.shape)} and teacher "
                          f"{tuple(teacher.shape)} must be rows of the same images ({want})")


def regression(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Absolute knowledge transfer: mean over the N images of 1/2 ||s(x) - t(x)||^2.

    student, teacher: N x D. Returns a 0-dim tensor.
    """
    _check_same_images("regression", student, teacher, same_dim=True)
    return 0.5 * (student - teacher.detach()).pow(2).sum(dim=1).mean()


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    # The direct (not Gram-matrix) form: exact zeros on the diagonal, and cdist's backward
    # gives a zero (not NaN) gradient there.
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def _rkd_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-normalised distances (N x N) and angle cosines cos<x_j - x_i, x_k - x_i> (N x N x N)."""
    d = _pairwise_distances(x)
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    d = d / d[off_diagonal].mean()
    e = l2n(x[None, :, :] - x[:, None, :])  # e[i, j] = unit(x_j - x_i); 0 if j == i
    return d, e @ e.transpose(1, 2)


def rkd(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 1.0,
        angle_weight: float = 2.0) -> torch.Tensor:
    """Relational KD (Park et al. 2019): distance_weight * SmoothL1(psi_D(s), psi_D(t)) +
    angle_weight * SmoothL1(psi_A(s), psi_A(t)), each averaged over all N x N (resp. N x N x N)
    entries as in the RKD / AML code, where psi_D is the pairwise distance divided by the mean
    off-diagonal distance and psi_A the cosine of the angle at x_i between x_j and x_k.

    student: N x D, teacher: N x D' (N >= 2; D may differ from D'). Returns a 0-dim tensor.
    """
    _check_same_images("rkd", student, teacher, same_dim=False)
    if len(student) < 2:
        raise EngineError(f"rkd: needs at least 2 images, got {len(student)}")
    s_d, s_a = _rkd_terms(student)
    t_d, t_a = _rkd_terms(teacher.detach())
    return distance_weight * F.smooth_l1_loss(s_d, t_d) + angle_weight * F.smooth_l1_loss(s_a, t_a)


def darkrank(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 3.0, beta: float = 3.0,
             list_len: int | None = 4) -> torch.Tensor:
    """DarkRank, hard (listwise) variant (Chen et al. 2018): for each image i, scores
    S(i, j) = -alpha ||x_i - x_j||^beta over the other images; the teacher's top `list_len`
    (all others when None) in the teacher's order pi; the loss is the negative Plackett-Luce
    log-likelihood of pi under the student's scores,
    -sum_l [S_s(i, pi_l) - log sum_{m >= l} exp S_s(i, pi_m)], averaged over the N images.

    student: N x D, teacher: N x D'. list_len 4 as in the RKD / AML code. Returns a 0-dim tensor.
    """
    _check_same_images("darkrank", student, teacher, same_dim=False)
    n = len(student)
    length = n - 1 if list_len is None else list_len
    if not 1 <= length <= n - 1:
        raise EngineError(f"darkrank: list_len {list_len} must be in 1..N-1 = 1..{n - 1}")
    s_score = -alpha * _pairwise_distances(student).pow(beta)
    t_score = -alpha * _pairwise_distances(teacher.detach()).pow(beta)
    # The image itself always scores 0, the maximum: keep it out of its own list.
    t_score = t_score.masked_fill(torch.eye(n, dtype=torch.bool, device=t_score.device), float("-inf"))
    ordered = s_score.gather(1, t_score.topk(length, dim=1).indices)
    suffix_lse = torch.logcumsumexp(ordered.flip(1), dim=1).flip(1)
    return -(ordered - suffix_lse).sum(dim=1).mean()


def csd(student: torch.Tensor, teacher: torch.Tensor, neighbours: torch.Tensor,
        tau_teacher: float = 0.01, tau_student: float = 1.0) -> torch.Tensor:
    """Contextual-similarity distillation: KL(p_t || p_s), averaged over the N images, with
    p_t = softmax([t(x).t(x), t(x).t(r_1..K)] / tau_teacher) and
    p_s = softmax([s(x).t(x), s(x).t(r_1..K)] / tau_student), r = the teacher's top-K
    neighbours of x (see `training.mining.nearest_neighbours`).

    student: N x D; teacher: N x D; neighbours: N x K x D (teacher vectors). Returns a 0-dim tensor.
    """
    _check_same_images("csd", student, teacher, same_dim=True)
    if neighbours.ndim != 3 or neighbours.shape[0] != len(student) or neighbours.shape[2] != student.shape[1]:
        raise EngineError(f"csd: neighbours {tuple(neighbours.shape)} must be N x K x D = "
                          f"{len(student)} x K x {student.shape[1]}")
    context = torch.cat([teacher[:, None, :], neighbours], dim=1).detach()  # N x (1+K) x D
    t_logits = torch.einsum("nd,nkd->nk", teacher.detach(), context) / tau_teacher
    s_logits = torch.einsum("nd,nkd->nk", student, context) / tau_student
    return F.kl_div(F.log_softmax(s_logits, dim=1), F.log_softmax(t_logits, dim=1),
                    reduction="batchmean", log_target=True)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "regression": regression,
    "contrastive": contrastive,
    "contrastive+": contrastive_plus,
    "triplet": triplet,
    "multi-similarity": multi_similarity,
    "rkd": rkd,
    "darkrank": darkrank,
    "csd": csd,
}
# The losses that take (anchors, refs[, anchor_teacher]) tuples from mining; the rest take
# (student, teacher[, neighbours]) rows of the same images.
TUPLE_LOSSES = frozenset({"contrastive", "contrastive+", "triplet", "multi-similarity"})
