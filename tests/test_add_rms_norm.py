"""tmf.add_rms_norm (residual add fused with RMSNorm) against float64: new_residual equals x + residual as the dtype
rounds it, the normed output and every gradient (x, residual, weight) match float64 autograd through that rounded
sum, in every dtype, every kernel variant (row widths), with Gemma's offset, strided layouts, a frozen weight, empty
tensors and NaN/inf; the harness moves the minimum; the module; bad input raises a clear error."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, AutogradCase, draws, make_layout, randn, rms64
from nan_inf import INF, NAN, VARIANT_WIDTHS, check_rows, nan_inf_contract, row_cases, weight_with

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches

# Row widths picking each variant: simd_rows (<= 256), single_row (<= 8192), looped (longer).
WIDTHS = {1: 7, 33: 9, 256: 5, 1000: 4, 4097: 3, 8192: 2, 8193: 2}


def _check(x, residual, weight, dtype, eps=1e-6, offset=0.0, grads=None, what="", frozen_weight=False):
    x = x.detach().requires_grad_(True)
    residual = residual.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(not frozen_weight)
    y, h = tmf.add_rms_norm(x, residual, weight, eps, offset)
    assert torch.equal(h, x.detach() + residual.detach()), f"new_residual {what}"
    if grads is None:
        grads = (randn(y.shape, dtype, x.device, seed=7), randn(h.shape, dtype, x.device, seed=8))
    wanted = (x, residual) if frozen_weight else (x, residual, weight)
    dx, dres, *dw = torch.autograd.grad((y, h), wanted, grads)
    # float64 through the rounded sum (the kernels normalise h as the dtype holds it)
    h64 = h.detach().double().cpu().requires_grad_(True)
    w64 = weight.detach().double().cpu().requires_grad_(True)
    y64 = h64 * torch.rsqrt(h64.square().mean(-1, keepdim=True) + eps) * (w64 + offset)
    dh64, dw64 = torch.autograd.grad((y64, h64), (h64, w64), tuple(g.double().cpu() for g in grads))
    assert_matches(y, y64, dtype, f"add_rms_norm y {what}")
    assert_matches(dx, dh64, dtype, f"add_rms_norm dx {what}")
    assert_matches(dres, dh64, dtype, f"add_rms_norm dresidual {what}")
    if not frozen_weight:
        assert_matches(dw[0], dw64, dtype, f"add_rms_norm dw {what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", list(WIDTHS))
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_contract(backend, dtype, cols, offset):
    rows = WIDTHS[cols]
    x = randn((rows, cols), dtype, backend.device, scale=2.0)
    residual = randn((rows, cols), dtype, backend.device, seed=1, scale=3.0)
    weight = randn((cols,), dtype, backend.device, seed=2)
    _check(x, residual, weight, dtype, offset=offset, what=f"{cols} wide")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [33, 1000, 8193])
def test_frozen_weight(backend, dtype, cols):
    """A weight without gradient (LoRA training): the dx-only kernels of every variant, no dw work."""
    x = randn((3, cols), dtype, backend.device, scale=2.0)
    residual = randn((3, cols), dtype, backend.device, seed=1)
    _check(x, residual, randn((cols,), dtype, backend.device, seed=2), dtype, frozen_weight=True, what="frozen")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["offset_view", "strided_rows", "transposed"])
@pytest.mark.parametrize("cols", [40, 300, 8193])  # simd_rows, single_row, looped
def test_layouts(backend, dtype, layout, cols):
    """x, residual and the incoming gradients each in a non-contiguous layout, 3-D (batch, seq, hidden), at every
    variant's width (each addresses the residual with its own row stride)."""
    shape = (2, 3, cols)
    x = make_layout(shape, dtype, backend.device, layout, scale=2.0)
    residual = make_layout(shape, dtype, backend.device, layout, seed=1)
    weight = randn((cols,), dtype, backend.device, seed=2)
    gy = make_layout(shape, dtype, backend.device, layout, seed=3)
    gh = make_layout(shape, dtype, backend.device, layout, seed=4)
    _check(x, residual, weight, dtype, grads=(gy, gh), what=layout)
    _check(x.contiguous(), residual, weight, dtype, grads=(gy.contiguous(), gh), what=f"only residual, dh {layout}")


def test_frozen_weight_and_one_output_used(backend):
    x = randn((4, 64), torch.float32, backend.device).requires_grad_(True)
    residual = randn((4, 64), torch.float32, backend.device, seed=1).requires_grad_(True)
    weight = randn((64,), torch.float32, backend.device, seed=2)  # frozen
    y, _ = tmf.add_rms_norm(x, residual, weight)
    (dx, dres) = torch.autograd.grad(y.square().sum(), (x, residual))  # h unused: its gradient is zero
    h64 = (x + residual).detach().double().cpu().requires_grad_(True)
    y64 = h64 * torch.rsqrt(h64.square().mean(-1, keepdim=True) + 1e-6) * weight.double().cpu()
    (ref,) = torch.autograd.grad(y64.square().sum(), h64)
    assert_matches(dx, ref, torch.float32, "dx, normed output only")
    assert_matches(dres, ref, torch.float32, "dresidual, normed output only")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_in_the_residual_stream(backend, dtype):
    x = randn((4, 300), dtype, backend.device)
    residual = randn((4, 300), dtype, backend.device, seed=1)
    residual[1, 7] = float("nan")
    residual[2, 0] = float("inf")
    y, h = tmf.add_rms_norm(x, residual, randn((300,), dtype, backend.device, seed=2))
    assert torch.isnan(h[1, 7]) and torch.isinf(h[2, 0])
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (2, 0, 4)])
def test_empty(backend, shape):
    x = torch.randn(shape, device=backend.device, requires_grad=True)
    residual = torch.randn(shape, device=backend.device, requires_grad=True)
    weight = torch.randn(shape[-1], device=backend.device, requires_grad=True)
    y, h = tmf.add_rms_norm(x, residual, weight)
    assert y.shape == h.shape == x.shape
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape


def test_module_matches_the_unfused_layers(backend):
    norm = tmf.nn.AddRMSNorm(48, eps=1e-5).to(backend.device)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = randn((3, 48), torch.float32, backend.device), randn((3, 48), torch.float32, backend.device, seed=1)
    y, h = norm(x, residual)
    torch.testing.assert_close(h, x + residual)
    torch.testing.assert_close(y, tmf.rms_norm(x + residual, norm.weight, 1e-5))
    assert set(norm.state_dict()) == {"weight"}  # as torch.nn.RMSNorm / LlamaRMSNorm
    gemma = tmf.nn.AddRMSNorm(48, offset=1.0)
    assert torch.equal(gemma.weight, torch.zeros(48))  # Gemma's weights start at zero: (1 + w) = 1


def test_bad_input_is_a_clear_error():
    x, r, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        tmf.add_rms_norm(x, torch.randn(4, 9), w)
    with pytest.raises(ValueError, match="weight must have shape"):
        tmf.add_rms_norm(x, r, torch.randn(9))
    with pytest.raises(TypeError, match="residual"):
        tmf.add_rms_norm(x, r.double(), w)
    with pytest.raises(ValueError, match="eps"):
        tmf.add_rms_norm(x, r, w, eps=-1.0)
    with pytest.raises(TypeError, match="weight"):
        tmf.add_rms_norm(x, r, None)


@pytest.mark.emulated
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_harness_moves_the_minimum(monkeypatch, dtype):
    """Forward: x and residual read once, h and y written once (the weight once per row walker); backward: dy, dh
    and h read once, dx written once — against the unfused add + RMSNorm's extra write and read of h, and the
    extra read-add-write of the gradients."""
    from torch_metal_fused.emulator import runner
    from torch_metal_fused.ops.rms_norm import _add_backward_impl

    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "metal-emulated")
    rows, cols = 64, 1024
    x, residual = randn((rows, cols), dtype, "cpu"), randn((rows, cols), dtype, "cpu", seed=1)
    weight = randn((cols,), dtype, "cpu", seed=2)
    n = rows * cols * x.element_size()
    with runner.record() as fwd:
        _, h = tmf.add_rms_norm(x, residual, weight)
    (f,) = fwd
    assert f.kernel.startswith("rms_norm_add_forward_single_row")
    assert f.traffic[0] == (n, 0) and f.traffic[5] == (n, 0)  # x, residual
    assert f.traffic[2] == (0, n) and f.traffic[6] == (0, n)  # y, h
    rstd = torch.rsqrt(h.float().square().mean(-1) + 1e-6)
    dy, dh = randn((rows, cols), dtype, "cpu", seed=3), randn((rows, cols), dtype, "cpu", seed=4)
    with runner.record() as bwd:
        _add_backward_impl(dy, dh, h, weight, rstd, False, 0.0)
    (b,) = bwd
    assert b.kernel.startswith("rms_norm_add_backward_dx_single_row")
    assert b.traffic[0] == (n, 0) and b.traffic[1] == (n, 0) and b.traffic[7] == (n, 0)  # dy, h, dh
    assert b.traffic[4] == (0, n)  # dx


# ---- CUDA: every kernel class of the fused launch (csrc/cuda/ops.cu), with 16-byte aligned views so the vector
# kernels run on views too ----------------------------------------------------------------------------------------
# (rows, cols) -> the forward / backward kernels they take in bf16 (fp32 where it differs):
CUDA_SHAPES = [
    (4423, 256),  # forward warp-rows, 4 rows per warp (fp32: 2 vectors per lane, 2 rows), ragged last block;
    #               backward register kernel (16-byte vectors)
    (4423, 512),  # forward warp-rows, 2 vectors per lane (fp32: block vector kernel); backward pipelined, 128 threads
    (7, 1000),  # forward block vector kernel, 1 vector per thread with idle lanes; backward pipelined, ragged row
    (1111, 4096),  # forward block vector kernel; backward pipelined, more rows than resident blocks
    (3, 8192),  # backward pipelined at its widest (fp32: 192 KB of shared memory)
    (3, 20000),  # forward looped (aligned, past registers); backward looped
    (5, 33),  # register kernels, element by element
    (9, 1001),  # register kernels, element by element, several items per thread
    (3, 8193),  # looped kernels, element by element
]


def _aligned(shape, dtype, device, layout, seed, scale=1.0):
    """contiguous; a view 16 bytes into its storage (storage offset 16 / element size); rows 16 bytes longer than the
    row (a column slice of a wider tensor, also 16 bytes in): vector loads stay legal in all three."""
    pad = 16 // (torch.finfo(dtype).bits // 8)
    rows, cols = shape
    if layout == "contiguous":
        return randn(shape, dtype, device, scale, seed)
    if layout == "aligned_offset":
        return randn((pad + rows * cols,), dtype, device, scale, seed)[pad:].view(rows, cols)
    wide = randn((rows, cols + 2 * pad), dtype, device, scale, seed)
    return wide[:, pad : pad + cols]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["contiguous", "aligned_offset", "aligned_strided"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_cuda_kernel_classes(dtype, shape, layout, offset):
    """x in `layout`, the residual and dh in the other aligned layouts (each kernel addresses them with their own
    row strides), dy contiguous; the frozen-weight (dx only) kernels in the strided layout."""
    others = {"contiguous": "aligned_strided", "aligned_offset": "contiguous", "aligned_strided": "aligned_offset"}
    x = _aligned(shape, dtype, "cuda", layout, 0, scale=2.0)
    residual = _aligned(shape, dtype, "cuda", others[layout], 1, scale=3.0)
    weight = randn((shape[1],), dtype, "cuda", seed=2)
    grads = (randn(shape, dtype, "cuda", seed=7), _aligned(shape, dtype, "cuda", others[layout], 8))
    what = f"{shape} {layout} offset={offset}"
    _check(x, residual, weight, dtype, offset=offset, grads=grads, what=what, frozen_weight=layout == "aligned_strided")


# ---- the autograd contract's case (tests/test_autograd_contract.py) --------------------------------------------
def autograd_case(name, device, dtype, reduction) -> AutogradCase:
    ins = [randn((6, 45), dtype, device, seed=s) for s in (1, 2)] + [randn((45,), dtype, device, seed=3) + 1]
    return AutogradCase(
        lambda x, res, w: tmf.add_rms_norm(x, res, w, 1e-5), lambda x, res, w: (rms64(x + res, w, 1e-5), x + res), ins
    )


# ---- every kernel of the family, for tests/test_emulator_kernels.py's drive -------------------------------------
def every_kernel(dtype):
    """Zero-argument calls that together dispatch every add + RMSNorm kernel in `dtype`: simd_rows, single_row and
    looped, with and without dw."""
    for cols in (40, 1000, 9000):
        x, r = randn((3, cols), dtype, "cpu").requires_grad_(True), randn((3, cols), dtype, "cpu")
        for w in (randn((cols,), dtype, "cpu").requires_grad_(True), randn((cols,), dtype, "cpu")):

            def run(x=x, r=r, w=w):
                sum(t.sum() for t in tmf.add_rms_norm(x, r, w)).backward()

            yield run


# ---- calls that differ in one thing a launch plan depends on (tests/test_compile_shader.py's plan-cache test) -----
def plan_cache_calls() -> list:
    """(backend entry point, arguments): back to back, each must get its own plan."""
    from torch_metal_fused import reference

    r = draws()

    x, res, w, dy, dh = r(4, 300), r(4, 300), r(300), r(4, 300), r(4, 300)
    _, h, rstd = reference.rms_norm_add_forward(x, res, w, 1e-6, 0.0)
    return [
        ("rms_norm_add_forward", (x, res, w, 1e-6, 0.0)),
        ("rms_norm_add_forward", (x, res, w, 1e-1, 0.0)),  # eps
        ("rms_norm_add_forward", (x, res, w, 1e-1, 1.0)),  # Gemma's offset
        ("rms_norm_add_backward", (dy, dh, h, w, rstd, True, 0.0)),
        ("rms_norm_add_backward", (dy, dh, h, w, rstd, True, 1.0)),  # offset
    ]


# ---- NaN and ±inf as torch (tests/nan_inf.py: the contract and its helpers) ------------------------------------------
@nan_inf_contract("add_rms_norm")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANT_WIDTHS))
@pytest.mark.parametrize("frozen_weight", [False, True], ids=["dx_dw", "dx"])
def test_nan_inf(backend, variant, dtype, frozen_weight):
    """NaN/±inf placements in x (one per row), NaN and ±inf in the residual (other rows, and +inf + -inf = NaN in
    h), then NaN and ±inf in the weight; outputs y and h, gradients of x, residual and weight against float64
    autograd through h as the dtype rounds it."""
    cols = VARIANT_WIDTHS[variant]
    eps = 1e-6
    cases = row_cases(cols, seed=cols + 2)
    names = [n for n, _ in cases]
    x_placed = torch.stack([row for _, row in cases]).to(dtype).to(backend.device)
    res_placed = randn(x_placed.shape, dtype, backend.device, seed=4)
    res_placed[names.index("nan_first"), cols - 1] = NAN  # a second NaN in that row, from the residual
    res_placed[names.index("pos_inf"), cols // 3] = -INF  # +inf + -inf: NaN in h
    res_placed[names.index("neg_inf"), 0] = INF
    w_placed = weight_with(cols, dtype, backend.device, [(0, NAN), (cols // 2, INF), (cols - 1, -INF)])
    clean = [names.index("clean"), names.index("clean_last")]
    calls = [
        (x_placed, res_placed, weight_with(cols, dtype, backend.device, []), "x/residual placements", clean),
        (randn((3, cols), dtype, backend.device, seed=6), randn((3, cols), dtype, backend.device, seed=7), w_placed,
         "weight placements", []),
    ]  # fmt: skip
    for x_in, res_in, w_in, what, clean_rows in calls:
        x, res = x_in.detach().clone().requires_grad_(True), res_in.detach().clone().requires_grad_(True)
        w = w_in.detach().clone().requires_grad_(not frozen_weight)
        y, h = tmf.add_rms_norm(x, res, w, eps)
        dy, dh = randn(y.shape, dtype, x.device, seed=8), randn(h.shape, dtype, x.device, seed=9)
        wanted = (x, res) if frozen_weight else (x, res, w)
        grads = torch.autograd.grad((y, h), wanted, (dy, dh))
        h64 = (x.detach() + res.detach()).double().cpu().requires_grad_(True)  # rounded as the dtype's add rounds
        w64 = w.detach().double().cpu().requires_grad_(True)
        y64 = rms64(h64, w64, eps)
        dh64, dw64 = torch.autograd.grad((y64, h64), (h64, w64), (dy.double().cpu(), dh.double().cpu()))
        tag = f"add_rms_norm {variant} {'frozen' if frozen_weight else 'dx_dw'}, {what}"
        check_rows(h, h64, dtype, f"{tag} h", clean_rows)
        check_rows(y, y64, dtype, f"{tag} y", clean_rows)
        check_rows(grads[0], dh64, dtype, f"{tag} dx", clean_rows)
        check_rows(grads[1], dh64, dtype, f"{tag} dresidual", clean_rows)
        if not frozen_weight:
            assert_matches(grads[2], dw64, dtype, f"{tag} dw")
