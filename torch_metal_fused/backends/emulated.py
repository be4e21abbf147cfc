"""The "metal-emulated" backend's remaining C++-launched op, LoRA: CPU tensors run through our LoRA kernels on the
Metal-on-CPU harness via the same launch code (csrc/include/tmf/launch/lora_linear.h) as the compiled MPS extension.
Every other op launches from the Python plans (backends/metal.py) through the harness's compile_shader stand-in.
Native GEMMs (the LoRA base products) run on torch's CPU matmul, as they run on MPS's native matmul on a Mac.
Opt in with TORCH_METAL_FUSED_BACKEND=metal-emulated."""

from __future__ import annotations

import torch

from torch_metal_fused import reference

_LORA_MAX_RANK = 256  # tmf::kLoraMaxRank (csrc/include/tmf/shader_args.h)


def available() -> tuple[bool, str]:
    try:
        from torch_metal_fused.emulator import runner

        runner.libraries()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _runner():
    from torch_metal_fused.emulator import runner

    return runner


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, cols) view of t with a unit inner stride (copying only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.ndim != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _output(shape, dtype: torch.dtype) -> torch.Tensor:
    """A kernel output, poisoned with NaN: an element a kernel never writes fails the contract instead of
    silently keeping what the allocator held (on a Mac it holds garbage)."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype)


# The native GEMMs in float16 run in float32 and round once to float16: torch's CPU float16 GEMM is a slow fallback
# (torch 2.13.0 here: 56 s for 512x4096 @ 4096x4096, against 0.06 s in bfloat16 and 0.15 s in float32), which made
# the emulated benchmark's float16 LoRA rows take a minute; a GPU's float16 GEMM accumulates in float32 too.
def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None and t.dtype == torch.float16 else t


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_wide(a) @ _wide(b)).to(a.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(_wide(x), _wide(weight), _wide(bias)).to(x.dtype)


def _merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W' = W + s·B·A, rounded once to W's dtype (as the native addmm gives it on MPS)."""
    return torch.addmm(_wide(weight), _wide(lora_b), _wide(lora_a), alpha=scale).to(weight.dtype)


def _row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def lora_forward(x, weight, bias, lora_a, lora_b, scale: float, dropout_mask):
    tokens, in_features = x.shape
    rank = lora_a.shape[0]
    if rank > _LORA_MAX_RANK:  # the kernels' tiles take rank <= kLoraMaxRank
        return reference.lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_mask)
    if _runner().lora_use_merged_weight(tokens, in_features, dropout_mask is not None):
        merged = _merged_weight(weight, lora_a, lora_b, scale)  # W + s·B·A on the native matmul
        return _linear(x, merged, bias), _mm(x, lora_a.t())
    y = _linear(x, weight, bias).contiguous()  # the native GEMM
    h = _output((tokens, rank), x.dtype)
    if tokens == 0:
        return y, h
    x2 = _rows(x)
    mask = dropout_mask.contiguous() if dropout_mask is not None else None
    _runner().launch(
        "lora_forward_lowrank",
        x.dtype,
        x2,
        _row_stride(x2),
        lora_a.contiguous(),
        lora_b.contiguous(),
        mask,
        y,
        h,
        tokens,
        in_features,
        weight.shape[0],
        rank,
        float(scale),
    )
    return y, h


def lora_backward(dy, x, weight, lora_a, lora_b, h, scale: float, dropout_mask, needs):
    needs_dx, needs_dw, needs_db, needs_da, needs_dlb = needs
    rank = lora_a.shape[0]
    tokens = x.shape[0]
    if rank > _LORA_MAX_RANK:
        return reference.lora_backward(dy, x, weight, lora_a, lora_b, h, scale, dropout_mask, needs)
    dy2 = _rows(dy)
    dx = dw = dbias = da = dlb = None
    if _runner().lora_use_merged_weight(tokens, x.shape[1], dropout_mask is not None):
        if needs_dx:
            dx = _mm(dy2, _merged_weight(weight, lora_a, lora_b, scale))  # dy·W' = dy·W + dh·A
        if needs_da:
            da = _mm((_mm(dy2, lora_b) * scale).t(), x)
    elif needs_dx or needs_da:
        if needs_dx:
            dx = _mm(dy2, weight).contiguous()  # native GEMM; the kernel adds (dh·A)·mask in place
        dh = _output((tokens, rank), x.dtype)
        if tokens:
            mask = dropout_mask.contiguous() if dropout_mask is not None else None
            _runner().launch(
                "lora_backward_lowrank",
                x.dtype,
                dy2,
                _row_stride(dy2),
                lora_a.contiguous(),
                lora_b.contiguous(),
                mask,
                dh,
                dx,
                tokens,
                x.shape[1],
                weight.shape[0],
                rank,
                float(scale),
            )
        if needs_da:
            x_lora = x if dropout_mask is None else x * dropout_mask
            da = _mm(dh.t(), x_lora)
    if needs_dlb:
        dlb = _mm(dy2.t(), h) * scale
    if needs_dw:
        dw = _mm(dy2.t(), x)
    if needs_db:
        dbias = dy2.sum(0)
    return dx, dw, dbias, da, dlb
