"""The CUDA backend: the compiled extension's entry points (csrc/cuda/), plus LoRA with float32 adapters on bfloat16
activations (PEFT's default), composed here from cuBLAS products.

cuBLAS multiplies bfloat16 operands with float32 accumulation and a float32 result, but takes no float32 operand
beside a bfloat16 one. So each float32 rank-r operand (A, B, h, dh) is carried as two bfloat16 terms, hi + lo
(16 significant bits, where float32 has 24), and every product reads the activations once, in bfloat16, as the
same-dtype op does: no float32 copy of x, y, dy or dx is made. The products with a rank-r operand on both sides
(y += s·h·Bᵀ, dh·A) take three of the four cross terms (lo·lo is below float32's rounding of the rest). float16
activations with float32 adapters take the reference composition (float16's exponent range would flush the lo
terms of small gradients).
"""

from __future__ import annotations

import functools

import torch

from torch_metal_fused import reference


def _compiled_extension():
    from torch_metal_fused import _C  # only a CUDA build selects this backend

    return _C


def __getattr__(name: str):
    return getattr(_compiled_extension(), name)


def _split(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 t as hi + lo in `dtype` (lo 0 where t is not finite, so an inf stays an inf, not inf - inf = NaN)."""
    hi = t.to(dtype)
    return hi, (t - hi.float()).nan_to_num_(0.0, 0.0, 0.0).to(dtype)


def _finite(hi: torch.Tensor) -> torch.Tensor:
    """hi with its non-finite entries zeroed: the operand of a cross term hi·lo that must add nothing where hi·hi
    already carries an infinity with the float32 product's sign (inf·lo can have the other sign, or be inf·0)."""
    return hi.nan_to_num(0.0, 0.0, 0.0)


@functools.cache
def _has_float32_output_mm(device_type: str) -> bool:
    """Whether torch.mm takes out_dtype=float32 for bfloat16 operands on this device type (CUDA, torch 2.9+)."""
    a = torch.ones(1, 1, dtype=torch.bfloat16, device=device_type)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b of bfloat16 operands, accumulated and returned in float32."""
    if _has_float32_output_mm(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # an older torch or a CPU test of this route: the same products


def _paired(t: torch.Tensor, dtype: torch.dtype, dim: int) -> torch.Tensor:
    """[hi, lo] of float32 t along `dim`: a product with it, halves summed, is the product with t."""
    return torch.cat(_split(t, dtype), dim)


def _sum_halves(t: torch.Tensor, dim: int) -> torch.Tensor:
    """hi + lo products summed, the lo product's non-finite entries taken as 0: where the hi product is infinite (an
    infinite activation) the sum is the hi product, as the single float32 product gives (inf·a_lo may have the other
    sign, or be inf·0); a NaN in the hi product stays. Modifies t's second half."""
    a, b = t.chunk(2, dim)
    return torch.add(a, b.nan_to_num_(0.0, 0.0, 0.0))


def _mixed(x: torch.Tensor, lora_a: torch.Tensor) -> bool:
    return lora_a.dtype != x.dtype


def lora_forward(x, weight, bias, lora_a, lora_b, scale: float, dropout_mask):
    if not _mixed(x, lora_a):
        return _compiled_extension().lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_mask)
    if x.dtype != torch.bfloat16:
        return reference.lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_mask)
    dtype = x.dtype
    x_lora = x if dropout_mask is None else x * dropout_mask
    h = _sum_halves(_mm_float32(x_lora, _paired(lora_a, dtype, 0).t()), 1)  # (tokens, r) float32
    # y = bias + s·h·Bᵀ written first (rounded once), then the base GEMM adds x·Wᵀ in its epilogue (beta = 1), as the
    # same-dtype accumulate route does: no separate read-modify-write pass over y.
    h_hi, h_lo = _split(h * scale, dtype)
    b_hi, b_lo = _split(lora_b, dtype)
    lowrank = torch.cat((h_hi, h_lo, _finite(h_hi)), 1)
    factor = torch.cat((b_hi, b_hi, b_lo), 1)
    y = torch.addmm(bias, lowrank, factor.t()) if bias is not None else lowrank @ factor.t()
    return y.addmm_(x, weight.t()), h


def lora_backward(dy, x, weight, lora_a, lora_b, h, scale: float, dropout_mask, needs):
    if not _mixed(x, lora_a):
        return _compiled_extension().lora_backward(dy, x, weight, lora_a, lora_b, h, scale, dropout_mask, needs)
    if x.dtype != torch.bfloat16:
        return reference.lora_backward(dy, x, weight, lora_a, lora_b, h, scale, dropout_mask, needs)
    needs_dx, needs_dw, needs_db, needs_da, needs_dlb = needs
    dtype = x.dtype
    dy2 = dy if dy.ndim == 2 else dy.reshape(-1, dy.shape[-1])
    dx = dw = dbias = da = dlb = None
    if needs_dx or needs_da:
        dh = _sum_halves(_mm_float32(dy2, _paired(lora_b, dtype, 1)), 1).mul_(scale)  # (tokens, r) float32
        dh_hi, dh_lo = _split(dh, dtype)
        if needs_dx:
            a_hi, a_lo = _split(lora_a, dtype)
            # The adapter path's part rounded to x's dtype, masked, then the base GEMM adds dy·W into it (beta = 1):
            # PEFT's order (its cast of x gives the adapter part back in x's dtype before the sum).
            dx = torch.cat((dh_hi, dh_lo, _finite(dh_hi)), 1) @ torch.cat((a_hi, a_hi, a_lo), 0)
            if dropout_mask is not None:
                dx.mul_(dropout_mask)
            dx.addmm_(dy2, weight)
        if needs_da:
            x_lora = x if dropout_mask is None else x * dropout_mask
            da = _sum_halves(_mm_float32(torch.cat((dh_hi, dh_lo), 1).t(), x_lora), 0)
    if needs_dlb:
        dlb = _sum_halves(_mm_float32(dy2.t(), _paired(h, dtype, 1)), 1).mul_(scale)
    if needs_dw:
        dw = dy2.t() @ x
    if needs_db:
        dbias = dy2.sum(0)
    return dx, dw, dbias, da, dlb
