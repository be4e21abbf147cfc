import pytest
import torch
from helpers import DTYPES, LAYOUTS, ROW_SIZES, AutogradCase, draws, make_layout, randn, rms64
from nan_inf import (
    INF,
    NAN,
    VARIANT_WIDTHS,
    check_rows,
    grad_with_nan,
    nan_inf_contract,
    random_row,
    row_cases,
    weight_with,
)

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches


def _reference(x64, w64, eps):
    y = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    return y * w64 if w64 is not None else y


def _check(x, weight, dtype, eps=1e-6, weight_grad=True):
    x = x.detach().requires_grad_(True)
    inputs = [x]
    if weight is not None:
        weight = weight.detach().requires_grad_(weight_grad)
        if weight_grad:
            inputs.append(weight)
    y = tmf.rms_norm(x, weight, eps)
    dy = randn(y.shape, dtype, x.device, seed=1)
    grads = torch.autograd.grad(y, inputs, dy)
    x64 = x.detach().double().cpu().requires_grad_(True)
    w64 = weight.detach().double().cpu().requires_grad_(True) if weight is not None else None
    y64 = _reference(x64, w64, eps)
    refs = torch.autograd.grad(y64, [x64] + ([w64] if len(inputs) == 2 else []), dy.double().cpu())
    # PyTorch's own eager computation in float32 (the HF-style upcast), the fairness baseline.
    x32 = x.detach().float().cpu().requires_grad_(True)
    w32 = weight.detach().float().cpu().requires_grad_(True) if weight is not None else None
    y32 = _reference(x32, w32, eps)
    base = torch.autograd.grad(y32, [x32] + ([w32] if len(inputs) == 2 else []), dy.float().cpu())
    assert y.dtype == dtype
    assert_matches(y, y64, dtype, "rms_norm forward", baseline=y32.to(dtype))
    for name, g, r, b in zip(("dx", "dweight"), grads, refs, base):
        assert_matches(g, r, dtype, f"rms_norm {name}", baseline=b.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", list(ROW_SIZES))
def test_contract_sizes(backend, n, dtype):
    x = randn((ROW_SIZES[n], n), dtype, backend.device, scale=2.0)
    w = randn((n,), dtype, backend.device, seed=2) + 1.0
    _check(x, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [33, 4097, 8193])
def test_layouts(backend, layout, n, dtype):
    x = make_layout((6, n), dtype, backend.device, layout)
    w = make_layout((n,), dtype, backend.device, "offset_view", seed=3)
    _check(x, w, dtype)


@pytest.mark.parametrize("shape", [(31,), (5, 33), (2, 3, 64), (2, 3, 4, 1000)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_ranks_and_no_weight(backend, shape, with_weight):
    w = randn((shape[-1],), torch.float32, backend.device, seed=4) if with_weight else None
    _check(randn(shape, torch.float32, backend.device), w, torch.float32)


def test_many_rows(backend):
    # Enough rows that dw needs several partial blocks and a reduction.
    x = randn((3000, 96), torch.float32, backend.device)
    _check(x, randn((96,), torch.float32, backend.device, seed=5), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_weight_gets_no_grad(backend, dtype, monkeypatch):
    x = randn((5, 40), dtype, backend.device).requires_grad_(True)
    w = randn((40,), dtype, backend.device, seed=1)  # requires_grad False
    seen = []
    import torch_metal_fused.ops.rms_norm as mod

    real = mod.run_kernel
    monkeypatch.setattr(mod, "run_kernel", lambda name, *a: seen.append((name, a[-3:])) or real(name, *a))
    tmf.rms_norm(x, w).sum().backward()
    assert w.grad is None and x.grad is not None
    assert seen[-1] == ("rms_norm_backward", (True, False, 0.0))  # needs_dx, needs_dw, offset
    _check(x, w, dtype, weight_grad=False)


def test_half_limits_no_overflow(backend):
    x = randn((3, 4097), torch.float16, backend.device) * 0.001 + 60000.0  # x² overflows float16
    _check(x, torch.ones(4097, dtype=torch.float16, device=backend.device), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf(backend, dtype):
    x = randn((4, 50), dtype, backend.device)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    w = randn((50,), dtype, backend.device, seed=1)
    y = tmf.rms_norm(x, w)
    ref = _reference(x.double().cpu(), w.double().cpu(), 1e-6)
    assert_matches(y, ref, dtype, "rms_norm with NaN/inf")
    assert torch.isnan(y[1]).all()


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_empty(backend, shape):
    x = torch.randn(shape, device=backend.device, requires_grad=True)
    w = torch.randn(16, device=backend.device, requires_grad=True)
    y = tmf.rms_norm(x, w)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_eps_matters(backend):
    x = randn((4, 8), torch.float32, backend.device) * 1e-3
    _check(x, None, torch.float32, eps=1e-2)


def test_gradcheck_reference():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tmf.rms_norm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda a: tmf.rms_norm(a, None, 1e-5), (x,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [40, 1000, 9000])
def test_gemma_offset(backend, dtype, n):
    """offset=1: Gemma's (1 + weight), with weight near zero as Gemma initialises it."""
    x = randn((7, n), dtype, backend.device).requires_grad_(True)
    w = (randn((n,), dtype, backend.device, seed=2) * 0.1).requires_grad_(True)
    y = tmf.rms_norm(x, w, 1e-6, offset=1.0)
    dy = randn(y.shape, dtype, backend.device, seed=1)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64 = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * (1.0 + w64)
    rx, rw = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert_matches(y, y64, dtype, "gemma forward")
    assert_matches(gx, rx, dtype, "gemma dx")
    assert_matches(gw, rw, dtype, "gemma dweight")


def test_empty_rows_with_zero_eps(backend):
    """Rows of length 0: an empty output, and rstd = rsqrt(0 + eps), inf for eps = 0 (no Python error)."""
    x = torch.randn(3, 0, device=backend.device)
    y = tmf.rms_norm(x, None, eps=0.0)
    assert y.shape == (3, 0)
    from torch_metal_fused.ops.rms_norm import rms_norm_forward

    _, rstd = rms_norm_forward(x, None, 0.0, 0.0)
    assert torch.isinf(rstd).all() and rstd.shape == (3,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [40, 1000, 9000])
def test_backward_with_strided_inputs(backend, n, dtype):
    """dy and x as views with rows wider than their length (each its own row stride), at widths that select every
    backward variant, with dx and dw."""
    from torch_metal_fused.ops.rms_norm import rms_norm_backward, rms_norm_forward

    x = randn((6, n + 5), dtype, backend.device)[:, 2 : 2 + n]
    w = randn((n,), dtype, backend.device, seed=2) + 1.0
    dy = randn((6, n + 9), dtype, backend.device, seed=1)[:, 4 : 4 + n]
    assert x.stride(0) == n + 5 and dy.stride(0) == n + 9
    _, rstd = rms_norm_forward(x, w, 1e-6, 0.0)
    dx, dw = rms_norm_backward(dy, x, w, rstd, True, True, 0.0)
    x64, w64 = x.double().cpu().requires_grad_(True), w.double().cpu().requires_grad_(True)
    rx, rw = torch.autograd.grad(_reference(x64, w64, 1e-6), (x64, w64), dy.double().cpu())
    assert_matches(dx, rx, dtype, "rms_norm dx, strided x and dy")
    assert_matches(dw, rw, dtype, "rms_norm dw, strided x and dy")


# ---- CUDA kernel classes past the contract's sizes (csrc/cuda/ops.cu): narrow rows on the warp-rows forward (4423
# rows: 4 or 2 rows per warp, a ragged last block; 64 wide leaves lanes idle), with and without a weight, Gemma's
# offset, a view 16 bytes into its storage (the vector kernels still run) ---------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4423, 64), (4423, 256), (4423, 512), (300, 256)])
@pytest.mark.parametrize("view", [False, True], ids=["contiguous", "aligned_offset"])
def test_cuda_narrow_rows(dtype, shape, view):
    rows, cols = shape
    pad = 16 // (torch.finfo(dtype).bits // 8) if view else 0
    x = randn((pad + rows * cols,), dtype, "cuda", scale=2.0)[pad:].view(rows, cols)
    _check(x, randn((cols,), dtype, "cuda", seed=2), dtype)
    _check(x, None, dtype)
    w = randn((cols,), dtype, "cuda", seed=3)
    y = tmf.rms_norm(x, w, 1e-6, offset=1.0)
    x64 = x.double().cpu()
    assert_matches(y, _reference(x64, w.double().cpu() + 1.0, 1e-6), dtype, "rms_norm gemma offset, narrow rows")


# ---- the autograd contract's case (tests/test_autograd_contract.py) --------------------------------------------
def autograd_case(name, device, dtype, reduction) -> AutogradCase:
    ins = [randn((6, 45), dtype, device, seed=1), randn((45,), dtype, device, seed=2) + 1]
    return AutogradCase(lambda x, w: tmf.rms_norm(x, w, 1e-5), lambda x, w: rms64(x, w, 1e-5), ins)


# ---- every kernel of the family, for tests/test_emulator_kernels.py's drive -------------------------------------
def every_kernel(dtype):
    """Zero-argument calls that together dispatch every RMSNorm kernel in `dtype`: each variant by row width (a
    pipeline capped at 64 threads for the looped one), with dx and dw, dx only, dw only, and no weight."""
    from torch_metal_fused.emulator import runner

    for cols, max_threads in ((40, 1024), (1000, 1024), (1000, 64), (9000, 1024)):
        x, w = randn((9, cols), dtype, "cpu"), randn((cols,), dtype, "cpu")
        for wx, ww, weight in ((True, True, w), (True, False, w), (False, True, w), (True, False, None)):

            def run(x=x, wx=wx, weight=weight, ww=ww, max_threads=max_threads):
                xx = x.clone().requires_grad_(wx)
                wt = weight.clone().requires_grad_(ww) if weight is not None else None
                with runner.pipeline_max_threads(max_threads):
                    tmf.rms_norm(xx, wt).square().sum().backward()

            yield run


# ---- calls that differ in one thing a launch plan depends on (tests/test_compile_shader.py's plan-cache test) -----
def plan_cache_calls() -> list:
    """(backend entry point, arguments): back to back, each must get its own plan."""
    from torch_metal_fused import reference

    r = draws()

    x, w, dy = r(4, 300), r(300), r(4, 300)
    rstd = reference.rms_norm_rstd(x, 1e-6)
    return [
        ("rms_norm_forward", (x, w, 1e-6, 0.0)),
        ("rms_norm_forward", (x, w, 1e-1, 0.0)),  # eps
        ("rms_norm_forward", (x, w, 1e-1, 1.0)),  # Gemma's offset
        ("rms_norm_forward", (x, None, 1e-1, 0.0)),  # no weight
        ("rms_norm_backward", (dy, x, w, rstd, True, True, 0.0)),
        ("rms_norm_backward", (dy, x, w, rstd, True, True, 1.0)),  # offset
    ]


# ---- NaN and ±inf as torch (tests/nan_inf.py: the contract and its helpers) ------------------------------------------
@nan_inf_contract("rms_norm")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANT_WIDTHS))
@pytest.mark.parametrize("mode", ["dx_dw", "dx", "dw", "noweight"])
def test_nan_inf(backend, variant, dtype, mode):
    """Two calls per kernel (dx/dw/dx+dw backward, no-weight forward): NaN/±inf placements in x with a finite weight
    (dw: a NaN row poisons every column, as torch's), then NaN and ±inf in the weight with finite x (forward: those
    columns of every row; dx: every row, through the row's dot product; dw: finite)."""
    cols = VARIANT_WIDTHS[variant]
    eps = 1e-5
    cases = row_cases(cols, seed=cols + 1) + [("dy_nan", random_row(cols, seed=99))]
    names = [n for n, _ in cases]
    x_placed = torch.stack([row for _, row in cases]).to(dtype).to(backend.device)
    x_clean = randn((4, cols), dtype, backend.device, seed=5)
    w_finite = weight_with(cols, dtype, backend.device, [])
    w_placed = weight_with(cols, dtype, backend.device, [(0, NAN), (cols // 2, INF), (cols - 1, -INF)])
    calls = [(x_placed, w_finite, "x placements", [names.index("clean"), names.index("clean_last")])]
    if mode != "noweight":
        calls.append((x_clean, w_placed, "weight placements", []))
    for x_in, w_in, what, clean in calls:
        dy_nan_rows = [names.index("dy_nan")] if clean else []
        w = None if mode == "noweight" else w_in.detach().clone().requires_grad_(mode != "dx")
        x = x_in.detach().clone().requires_grad_(mode != "dw")
        leaves = [t for t in (x, w) if t is not None and t.requires_grad]
        y = tmf.rms_norm(x, w, eps)
        dy = grad_with_nan(y.shape, dtype, backend.device, dy_nan_rows, seed=3)
        grads = torch.autograd.grad(y, leaves, dy)
        x64 = x.detach().double().cpu().requires_grad_(x.requires_grad)
        w64 = w.detach().double().cpu().requires_grad_(w.requires_grad) if w is not None else None
        y64 = rms64(x64, w64, eps)
        refs = torch.autograd.grad(y64, [t for t in (x64, w64) if t is not None and t.requires_grad], dy.double().cpu())
        check_rows(y, y64, dtype, f"rms_norm {variant} {mode} forward, {what}", clean)
        grad_names = [n for n, t in (("dx", x), ("dw", w)) if t is not None and t.requires_grad]
        for g, ref, name in zip(grads, refs, grad_names):
            check_rows(g, ref, dtype, f"rms_norm {variant} {mode} {name}, {what}", clean if name == "dx" else [])
