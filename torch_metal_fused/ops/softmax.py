"""Fused softmax: forward y = softmax(x, dim), backward dx = y * (dy - sum(dy * y)).

Kernel launch code: Metal `torch_metal_fused/backends/metal.py` (softmax_forward/backward)
(shared with the Metal-on-CPU harness), shaders `shaders/softmax.metal`; CUDA `csrc/cuda/softmax.cu`.
"""

from __future__ import annotations

import torch

from torch_metal_fused import reference
from torch_metal_fused._validation import check_dim, check_tensor
from torch_metal_fused.ops._dispatch import call, create_graph_requested, run_kernel


def _softmax_forward_impl(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension."""
    return run_kernel("softmax_forward", x)


softmax_forward = torch.library.custom_op("torch_metal_fused::softmax_forward", _softmax_forward_impl, mutates_args=())


@softmax_forward.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _softmax_backward_impl(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y, -1)) over the last dimension."""
    return run_kernel("softmax_backward", y, dy)


softmax_backward = torch.library.custom_op(
    "torch_metal_fused::softmax_backward", _softmax_backward_impl, mutates_args=()
)


@softmax_backward.register_fake
def _(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


class SoftmaxFunction(torch.autograd.Function):
    """Softmax over `dim`. A dim other than the last is moved last by a transposing copy (one extra read and
    write of x and of y); the kernels themselves always reduce contiguous rows. Double backward is supported: with
    create_graph=True, backward is the composite y·(dy - Σ dy·y) of torch ops on the saved output, whose own
    gradient flows back through this Function (as torch's softmax does it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        last = x.ndim - 1
        y = call(softmax_forward, _softmax_forward_impl, x if dim == last else x.movedim(dim, -1))
        out = y if dim == last else y.movedim(-1, dim).contiguous()
        ctx.save_for_backward(out)  # the output itself (not a copy), so double backward can differentiate through it
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (out,) = ctx.saved_tensors
        dim, last = ctx.dim, dy.ndim - 1
        y, dy_rows = (out, dy) if dim == last else (out.movedim(dim, -1), dy.movedim(dim, -1))
        if create_graph_requested():
            dx = reference.softmax_backward(y, dy_rows)
        else:
            dx = call(softmax_backward, _softmax_backward_impl, y, dy_rows)
        return (dx if dim == last else dx.movedim(-1, dim).contiguous()), None


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Same result as `torch.softmax(x, dim)`, with a fused forward and backward."""
    check_tensor("x", x)
    dim = check_dim(dim, x.ndim)
    if x.ndim == 0:
        return SoftmaxFunction.apply(x.unsqueeze(0), 0).squeeze(0)
    return SoftmaxFunction.apply(x, dim)


__all__ = ["SoftmaxFunction", "softmax"]


def self_test_cases(dtype: torch.dtype, device: str) -> list:
    """The doctor's self-test: rows over 256 wide (one threadgroup per row) and short ones (a SIMD-group per row)."""
    from torch_metal_fused.testing import SelfTestCase, sample

    def fn(t):
        return softmax(t[0], -1)

    def ref(t):
        return torch.softmax(t[0], -1)

    return [
        SelfTestCase(fn, ref, [sample((37, 300), dtype, device, 0)]),
        SelfTestCase(fn, ref, [sample((5, 3, 19), dtype, device, 1)]),
    ]
