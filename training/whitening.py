"""Learned whitening (Lw, Radenović et al. TPAMI 2018) from descriptors of matching image pairs.

Learning is float64 numpy; the result (m, P) applies as L2(P[:d] (x - m)), or as the linear
layer W = P[:d], b = -P[:d] m that the encoder head runs (`engine.models.Head.set_whitening`).
"""
from __future__ import annotations

import numpy as np
import torch

from engine.errors import EngineError
from kernels import l2n

__all__ = ["apply_whitening", "learn_whitening", "whitening_layer"]


def _regularised_cholesky(S: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of S + alpha I, alpha = 0, then 1e-10, 1e-9, ... until S + alpha I is
    positive definite (S is singular when there are fewer pairs than dimensions). S must be finite."""
    alpha = 0.0
    eye = np.eye(len(S))
    while True:
        try:
            return np.linalg.cholesky(S + alpha * eye)
        except np.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0.0 else alpha * 10


def learn_whitening(X, qidxs, pidxs) -> tuple[np.ndarray, np.ndarray]:
    """Learn Lw from the descriptors X (N x D) of the matching pairs (X[qidxs[i]], X[pidxs[i]]).

    m = mean of X[qidxs]; S = (X_q - X_p)^T (X_q - X_p) / n; P1 = inv(chol(S)); the eigenvectors V
    of P1 (X - m)^T (X - m) P1^T, eigenvalues descending; P = V^T P1.
    Returns (m (D,), P (D x D)), float64: P whitens the pair differences (identity covariance),
    then orders the components by decreasing variance of all N descriptors.
    """
    X = np.asarray(X, dtype=np.float64)
    qidxs, pidxs = np.asarray(qidxs, dtype=np.int64), np.asarray(pidxs, dtype=np.int64)
    if X.ndim != 2 or not np.isfinite(X).all():
        raise EngineError(f"whitening: descriptors must be a finite N x D array, got shape {X.shape}")
    if qidxs.ndim != 1 or qidxs.shape != pidxs.shape or len(qidxs) == 0:
        raise EngineError(f"whitening: qidxs {qidxs.shape} and pidxs {pidxs.shape} must be equal, non-empty 1-D")
    if min(qidxs.min(), pidxs.min()) < 0 or max(qidxs.max(), pidxs.max()) >= len(X):
        raise EngineError(f"whitening: pair indices out of range for {len(X)} descriptors")
    m = X[qidxs].mean(axis=0)
    diff = X[qidxs] - X[pidxs]
    P1 = np.linalg.inv(_regularised_cholesky(diff.T @ diff / len(diff)))
    centred = (X - m) @ P1.T
    eigval, eigvec = np.linalg.eigh(centred.T @ centred)
    return m, eigvec[:, np.argsort(eigval)[::-1]].T @ P1


def _output_dim(P, dim: int | None) -> int:
    d = len(P) if dim is None else dim
    if not 1 <= d <= len(P):
        raise EngineError(f"whitening: dim {dim} must be in 1..{len(P)}")
    return d


def apply_whitening(X, m, P, dim: int | None = None) -> np.ndarray:
    """Whiten descriptors: rows L2(P[:dim] (x - m)).

    X: N x D; m: (D,); P: D x D (from `learn_whitening`); dim: components kept (all when None).
    Returns N x dim float64.
    """
    d = _output_dim(P, dim)
    Y = (np.asarray(X, dtype=np.float64) - np.asarray(m, dtype=np.float64)) @ np.asarray(P, dtype=np.float64)[:d].T
    return l2n(Y)


def whitening_layer(m, P, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lw as a linear layer x -> W x + b (before the final L2): W = P[:dim], b = -P[:dim] m.

    m: (D,); P: D x D. Returns (W dim x D, b (dim,)), float32 torch tensors.
    """
    d = _output_dim(P, dim)
    P = np.asarray(P, dtype=np.float64)[:d]
    b = -P @ np.asarray(m, dtype=np.float64)
    return torch.from_numpy(P.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
