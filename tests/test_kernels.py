"""The descriptor head: the Triton kernels against the torch reference, the reference against float64.

By default the Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1
is set by tests/conftest.py, before any test module imports triton: Triton reads it when a kernel is
decorated). With AML_KERNELS_CUDA=1 on a CUDA machine the same sweep runs the compiled
kernels on CUDA tensors, plus the full-size case (bench/gpu_check.sh does this).

Tolerances, as relative error max|out - ref| / max|ref| over the B x D output:
- against the reference on the same input: 1e-5 for every dtype (both upcast to float32 first,
  so only float32 rounding and summation order differ);
- a float16 / bfloat16 map against the float32 map it was rounded from: 1e-3 / 1e-2.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ON_CUDA = os.environ.get("AML_KERNELS_CUDA") == "1"  # else tests/conftest.py set TRITON_INTERPRET=1
if ON_CUDA and not torch.cuda.is_available():
    raise RuntimeError("AML_KERNELS_CUDA=1 but torch sees no CUDA device")

import kernels  # noqa: E402

triton_head = pytest.importorskip("kernels.triton_head", reason="triton is not installed")

DEVICE = "cuda" if ON_CUDA else "cpu"
REPO = Path(__file__).resolve().parents[1]
SAME_INPUT_TOL = 1e-5
ROUNDING_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (B, C, H, W, D, head): odd sizes off every block size; head = which of W, b are given.
SHAPES = [
    (1, 37, 5, 7, 19, "W+b"),
    (3, 70, 9, 4, 33, "W"),
    (3, 130, 3, 11, None, "none"),
]


@pytest.fixture(autouse=True, scope="module")
def _kernel_mode():
    # A run that imported kernels.triton_head before this file set TRITON_INTERPRET would
    # silently test the wrong thing; fail loudly instead.
    assert triton_head.INTERPRETED != ON_CUDA, (
        "kernels.triton_head was imported before tests/test_kernels.py chose the Triton mode; "
        "run this file on its own"
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|, computed in float64 on the CPU."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def make_inputs(B, C, H, W, D, head, dtype=torch.float32, channels_last=False, seed=0):
    """A post-ReLU-like map (some exact zeros, so the eps clamp matters) and a whitening."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(B, C, H, W, generator=g))
    x = x.to(device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    Wm = b = None
    if head != "none":
        Wm = torch.randn(D, C, generator=g).to(DEVICE) / C**0.5
    if head == "W+b":
        b = torch.randn(D, generator=g).to(DEVICE) * 0.1
    return x, Wm, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("p", [3.0, 2.5], ids=["p3-float", "p2.5-tensor"])
def test_triton_matches_reference(dtype, channels_last, p):
    p_arg = p if p == 3.0 else torch.tensor(p, device=DEVICE)
    for B, C, H, W, D, head in SHAPES:
        x, Wm, b = make_inputs(B, C, H, W, D, head, dtype, channels_last)
        out = kernels.gem_whiten(x, p_arg, Wm, b, backend="triton")
        ref = kernels.gem_whiten(x, p_arg, Wm, b, backend="torch")
        assert out.dtype == torch.float32 and out.shape == ref.shape == (B, D or C)
        assert rel_err(out, ref) <= SAME_INPUT_TOL, (B, C, H, W, D, head)


@pytest.mark.parametrize("p", [3.0, 2.5], ids=["p3-tensor", "p2.5-float"])
def test_p_passing_and_arbitrary_strides(p):
    # The other p form than the sweep, on a sliced map whose strides are neither NCHW nor NHWC.
    p_arg = torch.tensor([p], device=DEVICE) if p == 3.0 else p
    x, Wm, b = make_inputs(2, 41, 8, 9, 23, "W+b")
    x = x[:, 1::2, 1:, ::2]
    out = kernels.gem_whiten(x, p_arg, Wm[:, :20], b, backend="triton")
    assert rel_err(out, kernels.gem_whiten(x, p_arg, Wm[:, :20], b, backend="torch")) <= SAME_INPUT_TOL


def test_whitening_matrix_any_dtype_and_strides():
    x, Wm, b = make_inputs(3, 24, 4, 4, 40, "W+b")
    Wt = Wm.t().contiguous().t().to(torch.bfloat16)  # column-major, bfloat16
    out = kernels.gem_whiten(x, 3.0, Wt, b, backend="triton")
    assert rel_err(out, kernels.gem_whiten(x, 3.0, Wt, b, backend="torch")) <= SAME_INPUT_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_map_against_float32(dtype):
    x, Wm, b = make_inputs(3, 70, 9, 4, 33, "W+b")
    out = kernels.gem_whiten(x.to(dtype), 3.0, Wm, b, backend="triton")
    assert rel_err(out, kernels.gem_whiten(x, 3.0, Wm, b, backend="torch")) <= ROUNDING_TOL[dtype]


@pytest.mark.parametrize("programs,precision", [(1, "ieee"), (8, "ieee"), (64, "ieee"), (8, "tf32x3")])
def test_split_c_partials_sum_to_the_whitening(programs, precision):
    # C = 300 is not a whole number of BLOCK_K steps: the last slice of C is short. tf32x3 (bench_head's variant)
    # is near fp32 on a GPU; the interpreter computes it in fp32.
    g = torch.rand(5, 300, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    Wm = torch.randn(45, 300, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    part, ss = triton_head.whiten_partials(g, Wm, programs, precision)
    assert part.shape[0] == ss.shape[0] and (part.shape[0] == 1) == (programs == 1)
    assert rel_err(part.sum(0), g.double() @ Wm.double().T) <= SAME_INPUT_TOL
    assert rel_err(ss.sum(0), (g.double() ** 2).sum(1)) <= SAME_INPUT_TOL


@pytest.mark.skipif(not ON_CUDA, reason="full-size case only on a CUDA device (AML_KERNELS_CUDA=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_size_on_cuda(dtype):
    for channels_last in (False, True):
        x, Wm, b = make_inputs(64, 2048, 24, 24, 2048, "W+b", dtype, channels_last)
        p = torch.tensor(3.0, device=DEVICE)
        out = kernels.gem_whiten(x, p, Wm, b, backend="triton")
        assert rel_err(out, kernels.gem_whiten(x, p, Wm, b, backend="torch")) <= SAME_INPUT_TOL


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs only on a CUDA device (AML_KERNELS_CUDA=1)")
def test_full_size_head_replayed_as_a_cuda_graph():
    # What the graphed encoder does: capture once, then replay on new data written into the static input.
    from engine.backends import capture_cuda_graph

    x, Wm, b = make_inputs(64, 2048, 24, 24, 2048, "W+b", torch.float32, True)
    p = torch.tensor(3.0, device=DEVICE)
    graph, out = capture_cuda_graph(lambda: kernels.gem_whiten(x, p, Wm, b, backend="triton"), torch.device(DEVICE))
    x.copy_(make_inputs(64, 2048, 24, 24, 2048, "none", seed=1)[0])
    graph.replay()
    assert rel_err(out, kernels.gem_whiten(x, p, Wm, b, backend="torch")) <= SAME_INPUT_TOL


def test_auto_on_cpu_is_the_reference():
    x, Wm, b = make_inputs(2, 9, 3, 3, 5, "W+b")
    x, Wm, b = x.cpu(), Wm.cpu(), b.cpu()
    assert torch.equal(kernels.gem_whiten(x, 3.0, Wm, b), kernels.gem_whiten_reference(x, 3.0, Wm, b))


def test_gradients_fall_back_to_the_reference():
    x, Wm, b = make_inputs(2, 9, 3, 3, 5, "W+b")
    p = torch.nn.Parameter(torch.tensor(3.0, device=DEVICE))
    Wm, b = torch.nn.Parameter(Wm), torch.nn.Parameter(b)
    out = kernels.gem_whiten(x.requires_grad_(), p, Wm, b)  # "auto"
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, p, Wm, b))
    with pytest.raises(ValueError, match="forward only"):
        kernels.gem_whiten(x, p, Wm, b, backend="triton")
    with torch.no_grad():  # inference with learnable parameters may use the kernel
        out = kernels.gem_whiten(x, p, Wm, b, backend="triton")
        assert rel_err(out, kernels.gem_whiten(x, p, Wm, b, backend="torch")) <= SAME_INPUT_TOL


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "cuda"}, "unknown head backend 'cuda'"),
        ({"b": torch.zeros(5)}, "needs a whitening matrix"),
        ({"W": torch.zeros(5, 8)}, "W must be D x C with C = 9"),
        ({"W": torch.zeros(5, 9), "b": torch.zeros(4)}, r"b must have shape \(5,\)"),
        ({"p": torch.ones(2)}, "one-element tensor"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"x": torch.rand(2, 9, 3, 3), "p": 3.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        kernels.gem_whiten(**args)


def test_reference_against_float64_formula():
    x, Wm, b = make_inputs(3, 11, 4, 5, 7, "W+b")
    xs, Ws, bs = x.cpu().double().numpy(), Wm.cpu().double().numpy(), b.cpu().double().numpy()
    for p in (3.0, 2.5):
        out = np.empty((3, 7))
        for i in range(3):
            f = np.array([np.mean(np.maximum(xs[i, c], 1e-6) ** p) ** (1 / p) for c in range(11)])
            f = f / np.sqrt(np.sum(f * f))
            y = Ws @ f + bs
            out[i] = y / np.sqrt(np.sum(y * y))
        ref = kernels.gem_whiten_reference(x.cpu(), p, Wm.cpu(), b.cpu())
        assert rel_err(ref, torch.from_numpy(out)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_l2n_divides_by_the_norm_and_keeps_zero_rows(dtype):
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0], [-2.0, 1e-3]], dtype=dtype, requires_grad=True)
    y = kernels.l2n(x)
    want = torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.1, 0.0], [-2.0 / np.hypot(2.0, 1e-3), 1e-3 / np.hypot(2.0, 1e-3)]], dtype=dtype)
    assert y.dtype == dtype
    # a row shorter than L2_EPS is divided by L2_EPS (row 3), like torch.nn.functional.normalize
    torch.testing.assert_close(y.detach(), want, rtol=1e-7 if dtype == torch.float64 else 1e-6, atol=0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # numpy in, numpy out, the same numbers; a read-only array (a memory map) is not written to.
    a = x.detach().numpy().copy()
    a.flags.writeable = False
    got = kernels.l2n(a)
    assert isinstance(got, np.ndarray) and got.dtype == a.dtype
    np.testing.assert_array_equal(got, y.detach().numpy())
    # along the last axis of any leading shape
    z = torch.randn(2, 3, 5, dtype=dtype)
    torch.testing.assert_close(kernels.l2n(z).norm(dim=-1), torch.ones(2, 3, dtype=dtype))


def test_zero_rows_stay_zero_in_both_backends():
    x, Wm, _ = make_inputs(2, 9, 3, 3, 5, "W")
    Wm[:] = 0  # every whitened row is 0: its L2 must give 0, not NaN
    for backend in ("triton", "torch"):
        out = kernels.gem_whiten(x, 3.0, Wm, None, backend=backend)
        assert torch.equal(out.cpu(), torch.zeros(2, 5)), backend


def _run_without_interpreter(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_triton_on_cpu_without_interpreter_says_so():
    proc = _run_without_interpreter(
        "import torch, kernels; kernels.gem_whiten(torch.rand(1, 2, 2, 2), 3.0, backend='triton')"
    )
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr.splitlines()[-1]


def test_kernels_compile_for_hopper():
    """Without a GPU: Triton still compiles every kernel variant to an sm_90 cubin (bundled ptxas)."""
    proc = _run_without_interpreter(
        """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_head as th

def build(fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

i32, f32 = "i32", "fp32"
# Each dtype once, covering both p forms, both tile shapes gem_pool picks and both spatial addressings.
for dtype, from_ptr, flat, (block_c, block_s) in [("fp32", True, True, th.GEM_TILE_NCHW), ("fp16", False, False, th.GEM_TILE_NHWC),
                                                  ("bf16", True, False, th.GEM_TILE_NHWC)]:
    build(th._gem_kernel, dict(x_ptr="*" + dtype, g_ptr="*fp32", p_ptr="*fp32", p_val=f32, C=i32, H=i32,
          Wd=i32, stride_b=i32, stride_c=i32, stride_h=i32, stride_w=i32, eps=f32),
          dict(P_FROM_PTR=from_ptr, FLAT_S=flat, BLOCK_C=block_c, BLOCK_S=block_s))
for block_c, block_s in th.GEM_TILE_CANDIDATES:  # the tiles bench_head.py tries on bf16 channels_last maps
    build(th._gem_kernel, dict(x_ptr="*bf16", g_ptr="*fp32", p_ptr="*fp32", p_val=f32, C=i32, H=i32,
          Wd=i32, stride_b=i32, stride_c=i32, stride_h=i32, stride_w=i32, eps=f32),
          dict(P_FROM_PTR=True, FLAT_S=True, BLOCK_C=block_c, BLOCK_S=block_s))
for w_dtype, block_m, precision in (("bf16", 16, "ieee"), ("fp32", th.WHITEN_TILE[0], "ieee"),
                                    ("fp32", th.WHITEN_TILE[0], "tf32x3")):
    build(th._whiten_kernel, dict(g_ptr="*fp32", w_ptr="*" + w_dtype, part_ptr="*fp32", ss_ptr="*fp32", B=i32, C=i32,
          D=i32, K_PER=i32, stride_wd=i32, stride_wc=i32),
          dict(BLOCK_M=block_m, BLOCK_N=th.WHITEN_TILE[1], BLOCK_K=th.WHITEN_TILE[2], PRECISION=precision))
for whitened, has_bias in ((True, True), (True, False), (False, False)):
    build(th._finish_kernel, dict(part_ptr="*fp32", ss_ptr="*fp32", b_ptr="*fp32", out_ptr="*fp32", B=i32, N=i32,
          SPLIT=i32, l2_eps=f32), dict(WHITENED=whitened, HAS_BIAS=has_bias, BLOCK=1024))
print("ok")
"""
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
