"""Learned whitening: its defining properties, the layer form, and an independent transcription
of cirtorch's `whitenlearn` (column layout, scipy factorisations, general eigensolver)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from engine.errors import EngineError
from kernels import l2n
from training.whitening import apply_whitening, learn_whitening, whitening_layer

N, D = 240, 10


@pytest.fixture
def pairs():
    """Descriptors of 60 instances, 4 noisy views each (anisotropic noise); pairs are two views."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, D)) * np.linspace(3.0, 0.5, D)
    X = np.repeat(centres, 4, axis=0) + rng.standard_normal((N, D)) * np.linspace(0.1, 0.6, D)
    qidxs = np.arange(0, N, 4).repeat(2) + np.tile([0, 2], 60)
    return X, qidxs, qidxs + 1


def cirtorch_whitenlearn(X, qidxs, pidxs):
    """cirtorch's algorithm on D x N columns, written independently of training.whitening."""
    Xc = X.T
    m = Xc[:, qidxs].mean(axis=1, keepdims=True)
    df = Xc[:, qidxs] - Xc[:, pidxs]
    S = df @ df.T / df.shape[1]
    alpha = 0.0
    while True:
        try:
            L = scipy.linalg.cholesky(S + alpha * np.eye(len(S)), lower=True)
            break
        except scipy.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0 else alpha * 10
    P = scipy.linalg.inv(L)
    df = P @ (Xc - m)
    eigval, eigvec = np.linalg.eig(df @ df.T)
    order = np.real(eigval).argsort()[::-1]
    return m[:, 0], np.real(eigvec[:, order]).T @ P


def same_up_to_row_signs(A, B, rtol):
    signs = np.sign(np.sum(A * B, axis=1, keepdims=True))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(A, signs * B, rtol=rtol, atol=rtol * np.abs(B).max())


def test_pair_differences_are_white_and_components_ordered(pairs):
    X, q, p = pairs
    m, P = learn_whitening(X, q, p)
    assert m.shape == (D,) and P.shape == (D, D) and P.dtype == np.float64
    diff = (X[q] - X[p]) @ P.T
    np.testing.assert_allclose(diff.T @ diff / len(q), np.eye(D), atol=1e-9)
    Y = (X - m) @ P.T
    cov = Y.T @ Y
    assert (np.diff(np.diag(cov)) < 0).all()  # components by decreasing spread
    # ... and uncorrelated over all descriptors (they are eigenvectors).
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-8 * cov.max())


def test_matches_cirtorch_whitenlearn(pairs):
    X, q, p = pairs
    m, P = learn_whitening(X, q, p)
    m_ref, P_ref = cirtorch_whitenlearn(X, q, p)
    np.testing.assert_allclose(m, m_ref, rtol=1e-12)
    same_up_to_row_signs(P, P_ref, rtol=1e-7)


def test_singular_pair_covariance_is_regularised(pairs):
    X, q, p = pairs
    m, P = learn_whitening(X, q[:4], p[:4])  # 4 pairs in 10 dimensions: S has rank 4
    assert np.isfinite(P).all()
    m_ref, P_ref = cirtorch_whitenlearn(X, q[:4], p[:4])
    same_up_to_row_signs(P, P_ref, rtol=1e-5)


@pytest.mark.parametrize("dim", [None, 4])
def test_layer_equals_apply(pairs, dim):
    X, q, p = pairs
    m, P = learn_whitening(X, q, p)
    W, b = whitening_layer(m, P, dim=dim)
    d = D if dim is None else dim
    assert W.shape == (d, D) and b.shape == (d,) and W.dtype == b.dtype == torch.float32
    Y = apply_whitening(X, m, P, dim=dim)
    assert Y.shape == (N, d)
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), 1.0, rtol=1e-12)
    # The encoder head's form: L2(x W^T + b).
    layer = l2n(torch.from_numpy(X).float() @ W.T + b)
    np.testing.assert_allclose(layer.numpy(), Y, atol=1e-4)


def test_bad_input_is_reported(pairs):
    X, q, p = pairs
    with pytest.raises(EngineError, match="out of range"):
        learn_whitening(X, q, p + N)
    with pytest.raises(EngineError, match="must be equal"):
        learn_whitening(X, q, p[:-1])
    with pytest.raises(EngineError, match="finite"):
        learn_whitening(np.full((4, 3), np.nan), [0], [1])
    m, P = learn_whitening(X, q, p)
    with pytest.raises(EngineError, match="dim 11"):
        whitening_layer(m, P, dim=11)
