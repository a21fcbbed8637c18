"""Training losses: formulas as functions, and one interface the trainer calls for every loss.

The interface (`Loss`, built by `make_loss(name, **options)`), modelled on pytorch-metric-learning's
`forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)`:

    loss(student, teacher, refs=None, neighbours=None) -> 0-dim tensor

    student:    N x D         s(x): the student vectors of the batch's anchor images (every image of
                              the batch for a knowledge-transfer loss, the tuples' queries for a tuple loss)
    teacher:    N x D'        t(x): the stored teacher vectors of the same images (a fixed target: detached)
    refs:       N x (1+K) x D tuple losses: each anchor's positive, then its K negatives; teacher
                              vectors in the asymmetric form, student vectors in the symmetric form.
                              The layout is the tuple structure: anchor i meets only row i.
    neighbours: N x K x D     the teacher vectors of each image's teacher top-K neighbours (CSD's context)

Each loss declares what it needs (`needs_tuples`, `needs_neighbours`, `symmetric_form`, `min_images`,
`reduction`); the trainer and its data pipeline read these and never branch on a loss's name, so a new
loss is one class here and one entry in `LOSSES`.

Tuple losses ("contrastive", "contrastive+", "triplet", "multi-similarity") are summed over the pairs of
a tuple and over the tuples of the batch, as the cirtorch / AML reference code does (it runs backward
once per tuple, so gradients add up); `reduction="mean"` divides by the number of tuples instead.
They are pytorch-metric-learning's losses, called with `ref_emb` and an explicit `indices_tuple` and no
labels, so PML never derives pairs from labels (it would drop the pair (i, i) only when `ref_labels is
labels`, and otherwise pair every anchor with every reference of the same label).

Knowledge-transfer losses ("regression", "rkd", "darkrank", "csd") take rows of the same images,
no labels, and are written here: PML has no form of them.
"""
from __future__ import annotations

import inspect
from typing import ClassVar

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses as pml_losses, reducers

from engine.errors import EngineError
from kernels import l2n

from .options import is_count, is_finite, require, require_choice

__all__ = [
    "LOSSES",
    "Loss",
    "contrastive",
    "contrastive_plus",
    "csd",
    "darkrank",
    "loss_options",
    "make_loss",
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
class _ExplicitPairs:
    """PML's pair losses return zero, with no gradient, when every index list holds at most one
    pair: a guard for label-derived batches with nothing to compare. Here the pairs are always
    given, and one tuple with at most one negative (a small batch, or one torchrun process's share
    of it) is such a list: it must still count."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return self.loss_method(self.distance(embeddings, ref_emb), indices_tuple)


class _HalfSquaredContrastive(_ExplicitPairs, pml_losses.ContrastiveLoss):
    """PML's contrastive loss with the cirtorch per-pair terms: 1/2 d^2 for a positive
    (pos_margin 0), 1/2 max(0, m - d)^2 for a negative. PML's own terms are unsquared hinges."""

    def get_per_pair_loss(self, pair_dists, pos_or_neg):
        return 0.5 * super().get_per_pair_loss(pair_dists, pos_or_neg) ** 2


class _MultiSimilarity(_ExplicitPairs, pml_losses.MultiSimilarityLoss):
    """PML's multi-similarity loss, counted for a single pair too."""


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
    ref_emb = torch.cat([refs.reshape(B * R, D), anchor_teacher.detach()])  # t(q_i): a fixed target
    pairs = (torch.cat([pos_a, pos_a]), torch.cat([pos_r, B * R + pos_a]), neg_a, neg_r)
    return _reduce(_pml_contrastive(anchors, ref_emb, pairs, margin), B, reduction)


def triplet(anchors: torch.Tensor, refs: torch.Tensor, margin: float = 0.7,
            reduction: str = "sum") -> torch.Tensor:
    """Triplet loss over tuples: sum_i sum_k max(0, ||a_i - p_i||^2 - ||a_i - n_ik||^2 + margin).

    anchors: B x D; refs: B x (1+K) x D (K >= 1). margin 0.7: the AML runs' --loss-margin, on the same
    squared distances (pytorch-metric-learning's own default, 0.1, is for unsquared ones).
    Returns a 0-dim tensor (reduction as in `contrastive`).
    """
    B, R, D = _check_tuples(anchors, refs)
    if R < 2:
        raise EngineError(f"triplet: every tuple needs a negative, got refs {tuple(refs.shape)}")
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
    loss = _MultiSimilarity(alpha=alpha, beta=beta, base=lam,
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


def regression(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Absolute knowledge transfer: 1/2 ||s(x) - t(x)||^2 over the N images, averaged ("mean") or
    summed ("sum", as the AML code does: one backward per image of its 5-image batches).

    student, teacher: N x D. Returns a 0-dim tensor.
    """
    _check_same_images("regression", student, teacher, same_dim=True)
    per_image = 0.5 * (student - teacher.detach()).pow(2).sum(dim=1)
    return _reduce(per_image.sum(), len(per_image), reduction)


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


# ---------------------------------------------------------------- the interface
class Loss:
    """A training loss over one batch: `loss(student, teacher, refs=None, neighbours=None)` (see the
    module docstring for the shapes) returns a 0-dim tensor. Options are set at construction.

    What the trainer reads instead of the loss's name:
      needs_tuples      the batch is mined tuples (query, positive, negatives), not random images
      symmetric_form    refs may come from the student (--mode sym); False: the teacher is the reference
      needs_neighbours  K > 0: pass the teacher vectors of each image's teacher top-K neighbours
      min_images        smaller batches of images are skipped (relational losses compare images)
      reduction         "sum" over the batch's tuples or "mean" over its images: under torchrun a
                        process's share of a sum is scaled by the world size, a mean is not
    """

    name: ClassVar[str]
    needs_tuples: ClassVar[bool] = False
    symmetric_form: ClassVar[bool] = False
    needs_neighbours: int = 0
    # A knowledge-transfer batch of one image is skipped, as it always was: relational losses need two.
    min_images: int = 2
    reduction: str = "mean"

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, refs: torch.Tensor | None = None,
                 neighbours: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _TupleLoss(Loss):
    """A loss over mined tuples: the anchor is `student`, its positive and negatives are `refs`."""

    needs_tuples = True
    symmetric_form = True
    min_images = 1

    def __init__(self, reduction: str = "sum"):
        require_choice("reduction", reduction, ("sum", "mean"))
        self.reduction = reduction

    def __call__(self, student, teacher, refs=None, neighbours=None):
        if refs is None:
            raise EngineError(f"{self.name}: a tuple loss needs refs (each anchor's positive and negatives)")
        return self.tuples(student, teacher, refs)

    def tuples(self, anchors: torch.Tensor, anchor_teacher: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _MarginTupleLoss(_TupleLoss):
    def __init__(self, margin: float, reduction: str):
        super().__init__(reduction)
        require("margin", margin, is_finite(margin) and margin >= 0, "a finite number >= 0")
        self.margin = float(margin)


class Contrastive(_MarginTupleLoss):
    name = "contrastive"

    def __init__(self, margin: float = 0.7, reduction: str = "sum"):
        super().__init__(margin, reduction)

    def tuples(self, anchors, anchor_teacher, refs):
        return contrastive(anchors, refs, self.margin, self.reduction)


class ContrastivePlus(_MarginTupleLoss):
    name = "contrastive+"
    symmetric_form = False  # its extra positive is the anchor's own teacher vector

    def __init__(self, margin: float = 0.7, reduction: str = "sum"):
        super().__init__(margin, reduction)

    def tuples(self, anchors, anchor_teacher, refs):
        return contrastive_plus(anchors, refs, anchor_teacher, self.margin, self.reduction)


class Triplet(_MarginTupleLoss):
    name = "triplet"

    def __init__(self, margin: float = 0.7, reduction: str = "sum"):
        super().__init__(margin, reduction)

    def tuples(self, anchors, anchor_teacher, refs):
        return triplet(anchors, refs, self.margin, self.reduction)


class MultiSimilarity(_TupleLoss):
    name = "multi-similarity"

    def __init__(self, lam: float = 0.5, alpha: float = 2.0, beta: float = 40.0, reduction: str = "sum"):
        super().__init__(reduction)
        self.lam, self.alpha, self.beta = lam, alpha, beta

    def tuples(self, anchors, anchor_teacher, refs):
        return multi_similarity(anchors, refs, self.lam, self.alpha, self.beta, self.reduction)


class Regression(Loss):
    name = "regression"

    def __init__(self, reduction: str = "mean"):
        require_choice("reduction", reduction, ("sum", "mean"))
        self.reduction = reduction

    def __call__(self, student, teacher, refs=None, neighbours=None):
        return regression(student, teacher, self.reduction)


class Rkd(Loss):
    name = "rkd"

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0):
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def __call__(self, student, teacher, refs=None, neighbours=None):
        return rkd(student, teacher, self.distance_weight, self.angle_weight)


class DarkRank(Loss):
    name = "darkrank"

    def __init__(self, alpha: float = 3.0, beta: float = 3.0, list_len: int | None = 4):
        self.alpha, self.beta, self.list_len = alpha, beta, list_len
        self.min_images = max(2, (list_len or 1) + 1)  # a list of list_len others per image

    def __call__(self, student, teacher, refs=None, neighbours=None):
        return darkrank(student, teacher, self.alpha, self.beta, self.list_len)


class Csd(Loss):
    name = "csd"

    def __init__(self, csd_k: int = 96, tau_teacher: float = 0.01, tau_student: float = 1.0):
        require("csd_k", csd_k, is_count(csd_k), "an integer >= 1")
        self.needs_neighbours, self.tau_teacher, self.tau_student = csd_k, tau_teacher, tau_student

    def __call__(self, student, teacher, refs=None, neighbours=None):
        if neighbours is None:
            raise EngineError("csd: needs the teacher vectors of each image's teacher neighbours")
        return csd(student, teacher, neighbours, self.tau_teacher, self.tau_student)


LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (
    Regression, Contrastive, ContrastivePlus, Triplet, MultiSimilarity, Rkd, DarkRank, Csd)}


def loss_options(name: str) -> set[str]:
    """The option names the loss registered as `name` takes (an unknown name: an EngineError)."""
    cls = LOSSES.get(name)
    if cls is None:
        raise EngineError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}")
    return set(inspect.signature(cls).parameters)


def make_loss(name: str, **options) -> Loss:
    """The loss registered as `name`, built with `options` (an option given as None keeps the loss's
    default). An unknown name, an option the loss does not take, or a bad value is an EngineError."""
    takes = loss_options(name)
    cls = LOSSES[name]
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - takes)
    if foreign:
        have = ", ".join(sorted(takes)) or "none"
        raise EngineError(f"loss {name} takes no {', '.join(foreign)} (its options: {have})")
    return cls(**given)
