"""Fused LoRA linear: y = x @ weightᵀ + bias + scale * (dropout(x) @ lora_aᵀ) @ lora_bᵀ.

The adapters (lora_a, lora_b) come in x's dtype, or in float32 on a float16/bfloat16 x: PEFT's default
(`autocast_adapter_dtype=True`), served with PEFT's semantics (the low-rank product in float32, added to the base
output in float32 and rounded once) by kernels that widen the activations in registers, so no float32 copy of an
activation is made or saved. dlora_a and dlora_b come in the adapters' dtype.

The base GEMM runs on the platform's native matmul; the rank-r path (h = x·Aᵀ, y += scale·h·Bᵀ) is fused
into one kernel that adds into the base output in place. Backward: dB = scale·dyᵀh, dh = scale·dy·B,
dA = dhᵀx, dx = dy·W + dh·A, dW = dyᵀx, dbias = Σdy — each only when its input needs a gradient
(a frozen weight costs nothing).

Kernel launch code: Metal `torch_metal_fused/backends/metal.py` (lora_*)
(shared with the Metal-on-CPU harness), shaders `shaders/lora_linear.metal`; CUDA `csrc/cuda/lora_linear.cu`.
"""

from __future__ import annotations

import torch

from torch_metal_fused import reference
from torch_metal_fused._autocast import autocast_enabled, cast_like_linear
from torch_metal_fused._validation import check_dropout, check_finite_number, check_same_device_dtype, check_tensor
from torch_metal_fused.ops._dispatch import (
    as_rows,
    call,
    create_graph_requested,
    empty_to_none,
    none_to_empty,
    run_kernel,
)
from torch_metal_fused.ops.rms_norm import NormOutput

_HALF_PRECISION = (torch.float16, torch.bfloat16)


def _lora_linear_forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x is (tokens, in). Returns y (tokens, out) and h = dropout(x)·Aᵀ (tokens, r), saved for backward. The CUDA
    backend in half precision with many tokens (the merged-weight route) returns h filled with NaN and its backward
    computes h itself (csrc/cuda/lora_linear.cu: h_in_backward): h is for this op's backward only."""
    return run_kernel("lora_forward", x, weight, bias, lora_a, lora_b, scale, dropout_mask)


lora_linear_forward = torch.library.custom_op(
    "torch_metal_fused::lora_linear_forward", _lora_linear_forward_impl, mutates_args=()
)


@lora_linear_forward.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_mask):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0], dtype=lora_a.dtype)


def _lora_linear_backward_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    scale: float,
    dropout_mask: torch.Tensor | None,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dlora_a, dlora_b); gradients not asked for come back as 0-element tensors."""
    grads = run_kernel("lora_backward", dy, x, weight, lora_a, lora_b, h, scale, dropout_mask, tuple(needs))
    return tuple(none_to_empty(g, like) for g, like in zip(grads, (x, x, x, lora_a, lora_a)))  # as the fake impl


lora_linear_backward = torch.library.custom_op(
    "torch_metal_fused::lora_linear_backward", _lora_linear_backward_impl, mutates_args=()
)


@lora_linear_backward.register_fake
def _(dy, x, weight, lora_a, lora_b, h, scale, dropout_mask, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    dtypes = (x.dtype, x.dtype, x.dtype, lora_a.dtype, lora_a.dtype)
    return tuple(x.new_empty(s if need else (0,), dtype=d) for s, d, need in zip(shapes, dtypes, needs))


class LoRALinearFunction(torch.autograd.Function):
    """Double backward is supported: with create_graph=True backward is the reference formula in torch ops over the
    saved inputs, with h recomputed from them (x itself is saved, not its 2-D view, so the formula reaches x's
    history; an RMSNorm output is remade with its history to the norm's input and weight: ops.rms_norm.NormOutput)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale, bias, dropout_p, training):
        x2 = as_rows(x)
        mask = None
        if training and dropout_p > 0.0:
            # A 0/1 mask, exact in any dtype, with dropout's 1/(1-p) folded into the scale (in float32 in the
            # kernels): the kernels then compute scale/(1-p) · (x∘mask)·Aᵀ·Bᵀ, and h is (x∘mask)·Aᵀ.
            mask = x2.new_empty(x2.shape).bernoulli_(1.0 - dropout_p)
            scale = scale / (1.0 - dropout_p)
        y, h = call(lora_linear_forward, _lora_linear_forward_impl, x2, weight, bias, lora_a, lora_b, scale, mask)
        # An RMSNorm's output (a decoder layer's q/k/v and gate/up input) is made again for backward, not kept
        ctx.x_source = NormOutput.of(x)
        ctx.save_for_backward(x if ctx.x_source is None else None, weight, lora_a, lora_b, h, mask)
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, h, mask = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [n[0], n[1], ctx.has_bias and n[5], n[2], n[3]]
        if not any(needs):
            return (None,) * 8
        if ctx.x_source is not None:
            x = ctx.x_source.get()
        x2, dy2 = as_rows(x), as_rows(dy)
        if create_graph_requested():
            h = (x2 if mask is None else x2 * mask).to(lora_a.dtype) @ lora_a.t()
            grads = reference.lora_backward(dy2, x2, weight, lora_a, lora_b, h, ctx.scale, mask, tuple(needs))
        else:
            args = (dy2, x2, weight, lora_a, lora_b, h, ctx.scale, mask, needs)
            grads = call(lora_linear_backward, _lora_linear_backward_impl, *args)
        dx, dw, db, da, dlb = (empty_to_none(g, need) for g, need in zip(grads, needs))
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, da, dlb, None, db, None, None


def _check_lora_args(x, weight, lora_a, lora_b, bias) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_tensor(name, t)
    check_same_device_dtype("x", x, weight=weight, bias=bias)
    check_same_device_dtype("lora_a", lora_a, lora_b=lora_b)
    if lora_a.device != x.device:
        raise ValueError(f"lora_a is on {lora_a.device} but x is on {x.device}; move them to one device")
    if lora_a.dtype != x.dtype and not (lora_a.dtype == torch.float32 and x.dtype in _HALF_PRECISION):
        raise TypeError(
            f"lora_a and lora_b have dtype {lora_a.dtype} but x has dtype {x.dtype}: the adapters must have x's "
            "dtype, or float32 on a float16/bfloat16 x (PEFT's default)"
        )
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({in_features})")
    if lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must have shape (r, {in_features}) to match weight, got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out_features, rank):  # a torch.Size against a tuple goes through sym_eq: slow
        raise ValueError(
            f"lora_b must have shape ({out_features}, {rank}) = (out_features, r of lora_a), got {tuple(lora_b.shape)}"
        )
    if rank == 0:
        raise ValueError("lora_a has rank r = 0; a LoRA adapter needs r >= 1")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """`x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T`.

    weight (out, in), lora_a (r, in), lora_b (out, r), x (..., in). lora_a and lora_b in x's dtype, or in float32 on
    a float16/bfloat16 x (PEFT's default: computed as PEFT does, the result in x's dtype). Dropout applies to the LoRA
    branch only and only when `training`. A weight with requires_grad=False gets no gradient computed at all. Under
    torch.autocast the inputs are cast to the autocast dtype first, as F.linear's are (the result is in that dtype).
    """
    if isinstance(x, torch.Tensor) and autocast_enabled(x.device.type):  # as F.linear under autocast
        x, weight, lora_a, lora_b, bias = cast_like_linear(x.device.type, x, weight, lora_a, lora_b, bias)
    _check_lora_args(x, weight, lora_a, lora_b, bias)
    scale = check_finite_number("scale", scale)
    dropout_p = check_dropout(dropout_p)
    return LoRALinearFunction.apply(x, weight, lora_a, lora_b, scale, bias, dropout_p, bool(training))


def self_test_cases(dtype: torch.dtype, device: str) -> list:
    """The doctor's self-test: odd token and feature counts, rank 8."""
    from torch_metal_fused.testing import SelfTestCase, sample

    x, w = sample((67, 72), dtype, device, 3), sample((40, 72), dtype, device, 4)
    a, b = sample((8, 72), dtype, device, 5), sample((40, 8), dtype, device, 6)
    return [
        SelfTestCase(
            lambda t: lora_linear(t[0], t[1], t[2], t[3], scale=2.0),
            lambda t: t[0] @ t[1].t() + 2.0 * (t[0] @ t[2].t()) @ t[3].t(),
            [x, w, a, b],
        )
    ]
