"""Edge values at widths that select every kernel variant, in every dtype, forward and backward against float64:
huge and tiny logits, denormals, all-zero rows, -inf (partly and fully masked rows), NaN. Each case exists because
a plausible kernel slip survives the random-input contract without it: a short-row softmax that forgets to
subtract the row max (huge logits), an RMSNorm that drops eps (all-zero rows), a LoRA kernel that reuses the first
token group's dropout-mask rows (dropout over several groups)."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, randn

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches

# A width per variant of the row kernels (tmf::launch::plan_rows: single_row up to 8 x 1024 = 8192).
WIDTHS = {"simd_rows": 200, "single_row": 1023, "looped": 9000}  # 1023: a tail thread with 7 of 8


def _rows(dtype: torch.dtype, cols: int, huge: float, masks: bool) -> torch.Tensor:
    """One row per edge case (finite ones first)."""
    g = torch.Generator().manual_seed(cols)
    r = lambda: torch.randn(cols, generator=g, dtype=torch.float64)  # noqa: E731
    tiny = torch.finfo(dtype).tiny
    rows = [
        r() * huge,  # huge values
        r() * huge + huge,  # huge, all of one sign
        r() * tiny * 0.3,  # mostly subnormal in the tensor's dtype
        torch.zeros(cols, dtype=torch.float64),  # all zero
        r(),  # ordinary
    ]
    if masks:
        partly = r()
        partly[::3] = float("-inf")
        one_nan = r()
        one_nan[cols // 2] = float("nan")
        rows += [partly, torch.full((cols,), float("-inf"), dtype=torch.float64), one_nan]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(WIDTHS))
def test_softmax_edge_values(backend, variant, dtype):
    x = _rows(dtype, WIDTHS[variant], huge=1000.0, masks=True).to(backend.device).requires_grad_(True)
    y = tmf.softmax(x, -1)
    dy = randn(y.shape, dtype, backend.device, seed=1)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().cpu().requires_grad_(True)
    y64 = torch.softmax(x64, -1)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double().cpu())
    assert_matches(y, y64, dtype, f"softmax {variant} forward")
    assert_matches(dx, dx64, dtype, f"softmax {variant} dx")


def _rms_norm_reference(x, w, eps):
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(WIDTHS))
@pytest.mark.parametrize("mode", ["dx_dw", "dx", "dw", "noweight"])
def test_rms_norm_edge_values(backend, variant, dtype, mode):
    """All-zero rows make eps decide the result; huge rows overflow x² in float16 (statistics are float32);
    subnormal rows underflow x². NaN/-inf rows only where dw is not computed (one poisons every column of dw)."""
    cols = WIDTHS[variant]
    huge = min(1e15, torch.finfo(dtype).max / 8)
    x = _rows(dtype, cols, huge=huge, masks=mode in ("dx", "noweight")).to(backend.device)
    w = None if mode == "noweight" else randn((cols,), dtype, backend.device, seed=2) + 1.0
    x.requires_grad_(mode != "dw")
    if w is not None:
        w.requires_grad_(mode != "dx")
    leaves = [t for t in (x, w) if t is not None and t.requires_grad]
    eps = 1e-5
    y = tmf.rms_norm(x, w, eps)
    dy = randn(y.shape, dtype, backend.device, seed=3)
    grads = torch.autograd.grad(y, leaves, dy)

    def reference(dt):
        xr = x.detach().to(dt).cpu().requires_grad_(x.requires_grad)
        wr = w.detach().to(dt).cpu().requires_grad_(w.requires_grad) if w is not None else None
        yr = _rms_norm_reference(xr, wr, eps)
        return yr, torch.autograd.grad(yr, [t for t in (xr, wr) if t is not None and t.requires_grad], dy.to(dt).cpu())

    y64, refs = reference(torch.float64)
    y32, base = reference(torch.float32)  # PyTorch's own float32 computation: the fairness baseline
    assert_matches(y, y64, dtype, f"rms_norm {variant} forward", baseline=y32.to(dtype))
    names = [n for n, t in (("dx", x), ("dw", w)) if t is not None and t.requires_grad]
    for g, r, b, name in zip(grads, refs, base, names):
        assert_matches(g, r, dtype, f"rms_norm {variant} {name}", baseline=b.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("frozen_input", [False, True])
def test_lora_dropout_over_several_token_groups(backend, dtype, frozen_input):
    """300 tokens at rank 4: two reduce tiles and two expand groups of 256 token rows (the last partial), partial
    staging steps; dropout on, so every group must apply its own mask rows (forward on x, backward on dx). The mask
    is drawn again from the same RNG state and the result compared with float64."""
    tokens, fin, fout, r, p = 300, 40, 24, 4, 0.25
    x = randn((tokens, fin), dtype, backend.device).requires_grad_(not frozen_input)
    w = randn((fout, fin), dtype, backend.device, scale=fin**-0.5, seed=1)
    a = randn((r, fin), dtype, backend.device, scale=fin**-0.5, seed=2).requires_grad_(True)
    b = randn((fout, r), dtype, backend.device, scale=r**-0.5, seed=3).requires_grad_(True)
    leaves = [t for t in (x, a, b) if t.requires_grad]
    torch.manual_seed(7)
    y = tmf.lora_linear(x, w, a, b, 2.0, None, dropout_p=p, training=True)
    dy = randn(y.shape, dtype, backend.device, seed=4)
    grads = torch.autograd.grad(y, leaves, dy)
    torch.manual_seed(7)  # the op draws its mask like this, on a tensor like x (tmf/ops/lora_linear.py)
    mask = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
    assert 0 < int((mask == 0).sum()) < mask.numel()

    def reference(dt):
        xr, ar, br = (t.detach().to(dt).cpu().requires_grad_(t.requires_grad) for t in (x, a, b))
        yr = xr @ w.to(dt).cpu().t() + 2.0 * ((xr * mask.to(dt).cpu()) @ ar.t()) @ br.t()
        return yr, torch.autograd.grad(yr, [t for t in (xr, ar, br) if t.requires_grad], dy.to(dt).cpu())

    y64, refs = reference(torch.float64)
    y32, base = reference(torch.float32)
    assert_matches(y, y64, dtype, "lora dropout forward", baseline=y32.to(dtype))
    for g, ref, bl in zip(grads, refs, base):
        assert_matches(g, ref, dtype, "lora dropout gradient", baseline=bl.to(dtype))
