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


# ---------------------------------------------------------------- whitening in the encoder head: students too

SIDE = 64


@pytest.fixture(scope="module")
def whitened_teacher(tiny_train, tmp_path_factory):
    """The offline teacher with an Lw learned on the tiny training pairs (32 components): its checkpoint."""
    from engine.encode import EncodeOptions
    from engine.models import build_teacher
    from training.learn_whitening import whiten_encoder

    out = tmp_path_factory.mktemp("whitened") / "teacher.safetensors"
    opts = EncodeOptions(max_side=SIDE, workers=0, progress=False)
    return whiten_encoder(build_teacher("effnet-lite2-gem"), tiny_train / "train" / "db.pkl", out, opts, dim=32)


def test_a_student_learns_its_own_whitening_after_its_projection(tiny_train, tmp_path, run_cli):
    from engine.datasets.sfm import load_whitening_set
    from engine.encode import EncodeOptions, encode_to_array
    from engine.models import build_student, load_checkpoint, load_encoder, save_checkpoint

    student = build_student("mobilenetv2", 48, "some-teacher:0123")
    ckpt = save_checkpoint(student, tmp_path / "s.safetensors")
    db = tiny_train / "train" / "db.pkl"
    code, _, err = run_cli("whiten", "--model", ckpt, "--pairs", db, "--out", tmp_path / "sw.safetensors", "--dim", 16,
                           "--max-side", SIDE, "--workers", 0)
    assert code == 0, err
    w = load_checkpoint(tmp_path / "sw.safetensors")
    torch.testing.assert_close(w.head.project.weight, student.head.project.weight, rtol=0, atol=0)
    assert w.dim == 16 and w.head.whiten.weight.shape == (16, 48)
    # Lw learned on the student's own (projected) vectors of the pairs...
    pairs = load_whitening_set(db)
    X, _, _ = encode_to_array(student, [(p, None) for p in pairs.images], EncodeOptions(max_side=SIDE, workers=0, progress=False))
    W, b = whitening_layer(*learn_whitening(X, pairs.qidxs, pairs.pidxs), dim=16)
    torch.testing.assert_close(w.head.whiten.weight, W, rtol=0, atol=1e-4)
    torch.testing.assert_close(w.head.whiten.bias, b, rtol=0, atol=1e-4)
    # ... is not the teacher's: a space of its own, whose raw space is the student's.
    assert w.space not in (student.space, "") and w.config["raw_space"] == student.space
    assert load_encoder(f"raw:checkpoint:{tmp_path / 'sw.safetensors'}").space == student.space


def test_the_paper_s_test_time_whitening_adopts_the_teacher_s_lw(whitened_teacher, tmp_path, run_cli):
    from engine.errors import EXIT_INPUT
    from engine.models import build_student, build_teacher, load_checkpoint, load_encoder, save_checkpoint
    from engine.multiscale import describe

    teacher = load_checkpoint(whitened_teacher)
    raw = load_encoder(f"raw:checkpoint:{whitened_teacher}")
    # The raw space is the unwhitened teacher's own: the registry teacher's id, not the whitened one.
    assert raw.space == build_teacher("effnet-lite2-gem").space != teacher.space and raw.dim == 1280 != teacher.dim
    student = build_student("mobilenetv2", raw.dim, raw.space, teacher=raw.name, bridge_to=raw)
    ckpt = save_checkpoint(student, tmp_path / "s.safetensors")
    code, _, err = run_cli("whiten", "--model", ckpt, "--lw-from", f"checkpoint:{whitened_teacher}", "--out", tmp_path / "sw.safetensors")
    assert code == 0, err
    w = load_checkpoint(tmp_path / "sw.safetensors")
    assert (w.space, w.dim, w.config["raw_space"]) == (teacher.space, teacher.dim, raw.space)
    x = torch.rand(2, 3, 72, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = l2n(student(x) @ teacher.head.whiten.weight.T + teacher.head.whiten.bias)
        torch.testing.assert_close(w(x), want, rtol=0, atol=1e-5)
        # Multi-scale: the scales combine before the whitening (the student's projection makes the power 1).
        scales = (1.0, 2**-0.5)
        ms = l2n(describe(student, x, scales) @ teacher.head.whiten.weight.T + teacher.head.whiten.bias)
        torch.testing.assert_close(describe(w, x, scales), ms, rtol=0, atol=1e-5)
    # A student of the whitened space (or any other) cannot take the teacher's Lw a second time.
    other = save_checkpoint(build_student("mobilenetv2", teacher.dim, teacher.space), tmp_path / "o.safetensors")
    code, _, err = run_cli("whiten", "--model", other, "--lw-from", whitened_teacher, "--out", tmp_path / "x.safetensors")
    assert code == EXIT_INPUT and "raw space" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()
    code, _, err = run_cli("whiten", "--model", ckpt, "--lw-from", whitened_teacher, "--pairs", "p.pkl", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "exactly one of --pairs" in err
    code, _, err = run_cli("whiten", "--model", "raw:effnet-lite2-gem", "--pairs", "p.pkl", "--out", tmp_path / "x.safetensors")
    assert code == EXIT_INPUT and "has no whitening" in err


def test_raw_and_whitened_vectors_never_meet(whitened_teacher, tiny_train, tmp_path):
    from engine.encode import EncodeOptions, encode_to_array, encode_to_store
    from engine.errors import EngineError
    from engine.models import load_checkpoint, load_encoder
    from engine.search import search

    raw = load_encoder(f"raw:checkpoint:{whitened_teacher}")
    teacher = load_checkpoint(whitened_teacher)
    items = [(p, None) for p in sorted((tiny_train / "jpg").glob("*.jpg"))[:3]]
    opts = EncodeOptions(max_side=SIDE, workers=0, progress=False)
    store = encode_to_store(raw, items, [str(i) for i in range(3)], tmp_path / "raw.store", opts)
    assert store.space == raw.space
    queries = encode_to_array(raw, items[:1], opts)[0]
    assert search(store, queries, 1, space=raw.space)[1][0, 0] == 0
    with pytest.raises(EngineError, match="space"):  # the same numbers, said to be whitened: refused
        search(store, queries, 1, space=teacher.space)
