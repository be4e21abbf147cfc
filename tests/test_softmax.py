import pytest
import torch
from helpers import DTYPES, LAYOUTS, ROW_SIZES, AutogradCase, draws, make_layout, randn
from nan_inf import VARIANT_WIDTHS, check_rows, grad_with_nan, nan_inf_contract, random_row, row_cases

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches


def _check(backend, x, dim, dtype):
    x = x.detach().requires_grad_(True)
    y = tmf.softmax(x, dim)
    dy = randn(y.shape, dtype, x.device, seed=1)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().cpu().requires_grad_(True)
    y64 = torch.softmax(x64, dim)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double().cpu())
    assert y.dtype == dtype and y.device == x.device
    assert_matches(y, y64, dtype, "softmax forward")
    assert_matches(dx, dx64, dtype, "softmax dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", list(ROW_SIZES))
def test_contract_sizes(backend, n, dtype):
    _check(backend, randn((ROW_SIZES[n], n), dtype, backend.device, scale=3.0), -1, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [33, 4097, 8193])
def test_layouts(backend, layout, n, dtype):
    _check(backend, make_layout((5, n), dtype, backend.device, layout, scale=2.0), -1, dtype)


@pytest.mark.parametrize("shape", [(37,), (6, 45), (3, 5, 70), (2, 3, 4, 129)])
def test_every_dim(backend, shape):
    x = randn(shape, torch.float32, backend.device, scale=2.0)
    for dim in range(-len(shape), len(shape)):
        _check(backend, x, dim, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masking_and_nan(backend, dtype):
    x = randn((6, 300), dtype, backend.device)
    x[0, ::3] = float("-inf")  # masked entries
    x[1, :-1] = float("-inf")  # a single survivor
    x[2] = float("-inf")  # fully masked: NaN, as torch
    x[3, 17] = float("nan")  # NaN propagates to its row
    x[4, 5] = float("inf")
    y = tmf.softmax(x)
    ref = torch.softmax(x.double().cpu(), -1)
    assert_matches(y, ref, dtype, "softmax with -inf/NaN")
    assert torch.isnan(y[2]).all() and torch.isnan(y[3]).all()
    assert (y[0, ::3] == 0).all()


def test_float16_limits(backend):
    x = randn((4, 4097), torch.float16, backend.device) * 0.01 + 65000.0
    x[1] = -65000.0 + randn((4097,), torch.float16, backend.device)
    _check(backend, x, -1, torch.float16)


@pytest.mark.parametrize("shape", [(0, 7), (0,), (3, 0), (2, 0, 5)])
def test_empty(backend, shape):
    x = torch.randn(shape, device=backend.device, requires_grad=True)
    y = tmf.softmax(x, -1)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_scalar_input(backend):
    x = torch.tensor(3.0, device=backend.device)
    assert tmf.softmax(x, 0).item() == 1.0


def test_gradcheck_reference():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tmf.softmax(t, 0), (x,))
    assert torch.autograd.gradcheck(lambda t: tmf.softmax(t, -1), (x,))


def test_backward_is_our_kernel(backend, monkeypatch):
    """The backward runs the fused softmax_backward entry point, not autograd through the forward."""
    calls = []
    from torch_metal_fused.ops import _dispatch

    real = _dispatch.run_kernel
    monkeypatch.setattr(_dispatch, "run_kernel", lambda name, *a: calls.append(name) or real(name, *a))
    import torch_metal_fused.ops.softmax as mod

    monkeypatch.setattr(mod, "run_kernel", _dispatch.run_kernel)
    x = randn((3, 8), torch.float32, backend.device).requires_grad_(True)
    tmf.softmax(x).sum().backward()
    assert calls == ["softmax_forward", "softmax_backward"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [40, 1000, 9000])
def test_backward_with_a_strided_incoming_gradient(backend, n, dtype):
    """dy as a view whose rows are wider than y's (its own row stride), at widths that select every backward
    variant: each must address dy with dy's stride, not y's."""
    from torch_metal_fused.ops.softmax import softmax_backward

    x = randn((6, n), dtype, backend.device, scale=2.0)
    y = tmf.softmax(x)
    dy = randn((6, n + 7), dtype, backend.device, seed=1)[:, 3 : 3 + n]
    assert dy.stride() == (n + 7, 1)
    dx = softmax_backward(y, dy)
    y64, dy64 = y.double().cpu(), dy.double().cpu()
    assert_matches(dx, y64 * (dy64 - (dy64 * y64).sum(-1, keepdim=True)), dtype, "softmax dx, strided dy")


# ---- CUDA kernel classes past the contract's sizes (csrc/cuda/ops.cu): narrow rows on the warp-rows kernel (a
# warp per row, 4423 rows: a ragged last block), wide rows kept in shared memory (forward up to 200 KB a row:
# 512 threads at 20000 and bf16 32768, 1024 for fp32 32768 and 40000; backward with y and dy staged where both fit:
# 20000, bf16 32768 and 40000; fp32 32768 and 40000 take the looped kernel), NaN/-inf rows in each, a view 16 bytes
# into its storage (the vector kernels still run) ------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4423, 64), (4423, 256), (4423, 512), (5, 20000), (3, 32768), (3, 40000)])
@pytest.mark.parametrize("view", [False, True], ids=["contiguous", "aligned_offset"])
def test_cuda_narrow_and_wide_rows(dtype, shape, view):
    rows, cols = shape
    pad = 16 // (torch.finfo(dtype).bits // 8) if view else 0
    x = randn((pad + rows * cols,), dtype, "cuda", scale=3.0)[pad:].view(rows, cols)
    x[1, ::3] = float("-inf")
    x[2] = float("-inf")  # fully masked: NaN, as torch
    x[-1, cols // 2] = float("nan")
    x[0, 5] = float("inf")
    y = tmf.softmax(x)
    ref = torch.softmax(x.double().cpu(), -1)
    assert_matches(y, ref, dtype, f"softmax {shape} with -inf/NaN")
    assert torch.isnan(y[2]).all() and torch.isnan(y[-1]).all()
    assert (y[1, ::3] == 0).all()
    x = randn((pad + rows * cols,), dtype, "cuda", scale=3.0, seed=5)[pad:].view(rows, cols)
    _check(None, x, -1, dtype)  # forward and backward


# ---- the autograd contract's case (tests/test_autograd_contract.py) --------------------------------------------
def autograd_case(name, device, dtype, reduction) -> AutogradCase:
    x = randn((37, 5), dtype, device, seed=1)
    return AutogradCase(lambda x: tmf.softmax(x, 0), lambda x: torch.softmax(x, 0), [x])


# ---- every kernel of the family, for tests/test_emulator_kernels.py's drive -------------------------------------
def every_kernel(dtype):
    """Zero-argument calls that together dispatch every softmax kernel in `dtype`, forward and backward: row widths
    that pick each variant, and a pipeline capped at 64 threads for the looped one."""
    from torch_metal_fused.emulator import runner

    for cols, max_threads in ((40, 1024), (1000, 1024), (1000, 64), (9000, 1024)):
        x = randn((9, cols), dtype, "cpu").requires_grad_(True)

        def run(x=x, max_threads=max_threads):
            with runner.pipeline_max_threads(max_threads):
                tmf.softmax(x).square().sum().backward()

        yield run


# ---- calls that differ in one thing a launch plan depends on (tests/test_compile_shader.py's plan-cache test) -----
def plan_cache_calls() -> list:
    """(backend entry point, arguments): back to back, each must get its own plan."""
    r = draws()

    x, wide, x5 = r(4, 300), r(4, 600), r(5, 300)
    return [
        ("softmax_forward", (x,)),
        ("softmax_forward", (wide[:, :300],)),  # another row stride
        ("softmax_forward", (x5,)),  # another row count
    ]


# ---- NaN and ±inf as torch (tests/nan_inf.py: the contract and its helpers) ------------------------------------------
@nan_inf_contract("softmax")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANT_WIDTHS))
def test_nan_inf(backend, variant, dtype):
    """Every row placement, plus a clean row whose incoming gradient holds a NaN (its dx row is NaN, as torch's)."""
    cols = VARIANT_WIDTHS[variant]
    cases = row_cases(cols, seed=cols) + [("dy_nan", random_row(cols, seed=99))]
    names = [n for n, _ in cases]
    x = torch.stack([row for _, row in cases]).to(dtype).to(backend.device).requires_grad_(True)
    y = tmf.softmax(x, -1)
    dy = grad_with_nan(y.shape, dtype, backend.device, [names.index("dy_nan")], seed=1)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().cpu().requires_grad_(True)
    y64 = torch.softmax(x64, -1)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double().cpu())
    clean = [names.index("clean"), names.index("clean_last")]
    check_rows(y, y64, dtype, f"softmax {variant} forward", clean)
    check_rows(dx, dx64, dtype, f"softmax {variant} dx", clean)
    assert torch.isnan(y[names.index("nan_among_neg_inf")]).all(), "a NaN among -inf must make the row NaN"
