"""Fused RMSNorm over the last dimension: y = x * rsqrt(mean(x²) + eps) * (weight + offset).

Statistics are computed in float32 for float16/bfloat16 inputs; the forward saves a float32 rstd per row,
so the backward reads x, dy and rstd once: dx = rstd * (g - x * rstd² * mean(g * x)) with g = dy * (w + offset),
and dw = sum over rows of dy * x * rstd (not computed at all when the weight needs no gradient).
`offset=1` is Gemma's `(1 + weight)`.

`add_rms_norm(x, residual, weight)` fuses the residual add in front of it (as every pre-norm decoder layer does):
`h = x + residual` is written once and normalised in the same pass; backward adds h's incoming gradient (the residual
stream) to dx in the same kernel, and that sum is the gradient of both x and the residual.

Kernel launch code: Metal `torch_metal_fused/backends/metal.py` (rms_norm_*)
(shared with the Metal-on-CPU harness), shaders `shaders/rms_norm.metal`.
"""

from __future__ import annotations

import weakref

import torch

from torch_metal_fused import reference
from torch_metal_fused._validation import check_eps, check_finite_number, check_same_device_dtype, check_tensor
from torch_metal_fused.ops._dispatch import (
    call,
    create_graph_requested,
    empty_to_none,
    none_to_empty,
    run_kernel,
    saved_tensors_pass_through,
)


def _rstd_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rms_norm_forward_impl(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, rstd) with rstd of shape x.shape[:-1] in float32 (float64 for float64 x)."""
    return run_kernel("rms_norm_forward", x, weight, eps, offset)


rms_norm_forward = torch.library.custom_op(
    "torch_metal_fused::rms_norm_forward", _rms_norm_forward_impl, mutates_args=()
)


@rms_norm_forward.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x))


def _rms_norm_backward_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    needs_dx: bool,
    needs_dw: bool,
    offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dw); a gradient not asked for comes back as a 0-element tensor."""
    dx, dw = run_kernel("rms_norm_backward", dy, x, weight, rstd, needs_dx, needs_dw, offset)
    return none_to_empty(dx, x), none_to_empty(dw, x)


rms_norm_backward = torch.library.custom_op(
    "torch_metal_fused::rms_norm_backward", _rms_norm_backward_impl, mutates_args=()
)


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, needs_dx, needs_dw, offset):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_dx else x.new_empty(0)
    dw = torch.empty_like(weight) if (needs_dw and weight is not None) else x.new_empty(0)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Double backward is supported: with create_graph=True backward is the reference formula in torch ops, with rstd
    recomputed from x (torch_metal_fused/ops/_dispatch.py says why)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float) -> torch.Tensor:
        y, rstd = call(rms_norm_forward, _rms_norm_forward_impl, x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps, ctx.offset = eps, offset
        # For NormOutput.of: y's version now, so a consumer sees y unchanged in place since; None where y may not be
        # remade from the saved x and weight (under torch.compile; under checkpointing, whose hooks let each saved
        # tensor be unpacked once; inference tensors have no version, nor a node)
        remakeable = not torch.compiler.is_compiling() and saved_tensors_pass_through() and not y.is_inference()
        ctx.remakeable_version = y._version if remakeable else None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[0]
        needs_dw = weight is not None and ctx.needs_input_grad[1]
        if not (needs_dx or needs_dw):
            return None, None, None, None
        if create_graph_requested():
            rstd = reference.rms_norm_rstd(x, ctx.eps)
            dx, dw = reference.rms_norm_backward(dy, x, weight, rstd, needs_dx, needs_dw, ctx.offset)
            return dx, dw, None, None
        dx, dw = call(rms_norm_backward, _rms_norm_backward_impl, dy, x, weight, rstd, needs_dx, needs_dw, ctx.offset)
        return empty_to_none(dx, needs_dx), empty_to_none(dw, needs_dw), None, None


class NormOutput:
    """An RMSNorm output that a consumer's backward reads (the LoRA op's input, for the adapter's and the weight's
    gradients), made again from the norm's node when that backward asks for it instead of being kept from forward to
    backward: the node keeps the norm's input and weight for its own backward anyway, so keeping the output too holds
    one more activation-sized tensor per norm (the q/k/v and the gate/up projections' input in a decoder layer). The
    same kernel on the same inputs gives the same bits (a family that fell back to the reference between forward and
    backward remakes it there: rounding-level differences). The consumers of one output share one remake per backward
    (the last to ask, or to be freed without asking, releases it).

    Where it differs from keeping the output: a backward that asks only for a projection's parameters' gradients
    still needs the norm's saved tensors (an error, naming this, where an earlier backward freed them or the norm's
    input changed in place since); the output changed in place after a projection read it gives that projection's
    gradients of the values it read, where a kept output would raise autograd's in-place error."""

    __slots__ = ("__weakref__", "consumers", "node", "value")

    def __init__(self, node) -> None:
        self.node, self.consumers, self.value = node, 0, None

    @classmethod
    def of(cls, y: torch.Tensor) -> NormOutputClaim | None:
        """For a consumer about to save `y`: a claim to save instead, where y is an rms_norm output as the norm made
        it (y's node is the norm's, so not a view; not changed in place since: its values are the node's to remake)
        and nothing stands in the way: tensor subclasses, torch.compile, and saved-tensor hooks other than
        pass-through ones when the norm ran (non-reentrant checkpointing lets each saved tensor be unpacked once, and
        the norm's own backward unpacks its input too). Hooks around the consumer alone do not matter: it saves no
        output for them to pack."""
        node = y.grad_fn
        if (
            not isinstance(node, RMSNormFunction._backward_cls)
            or type(y) is not torch.Tensor
            or y._version != node.remakeable_version
            or torch.compiler.is_compiling()
        ):
            return None
        shared = getattr(node, "tmf_output", None)  # a weak reference: the node does not keep its consumers' state
        handle = shared() if shared is not None else None
        if handle is None:
            handle = cls(node)
            node.tmf_output = weakref.ref(handle)
        handle.consumers += 1
        return NormOutputClaim(handle)

    def _get(self) -> torch.Tensor:
        if create_graph_requested():  # made by the op, with history to the norm's input and weight; not shared
            x, weight = self._norm_inputs()
            return RMSNormFunction.apply(x, weight, self.node.eps, self.node.offset)
        value = self.value
        if value is None:
            x, weight = self._norm_inputs()
            value = call(rms_norm_forward, _rms_norm_forward_impl, x, weight, self.node.eps, self.node.offset)[0]
        self.value = value
        self._release()
        return value

    def _release(self) -> None:
        self.consumers -= 1  # below 0 in a retained graph's later backward: each consumer then remakes its own
        if self.consumers <= 0:
            self.value = None

    def _norm_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            x, weight, _ = self.node.saved_tensors
        except RuntimeError as exc:  # freed by an earlier backward through the norm, or its input changed in place
            raise RuntimeError(
                "torch_metal_fused: a LoRA projection's input, an RMSNorm output, is made again for its backward from "
                f"the norm's saved input and weight (ops.rms_norm.NormOutput), which autograd cannot give back: {exc}"
            ) from exc
        return x, weight


class NormOutputClaim:
    """One consumer's share of a NormOutput, saved by the consumer in place of the output. A consumer whose backward
    never runs (called under no_grad, its output dropped) gives its share back when it is freed, so the remade
    output is not held for the graph's lifetime."""

    __slots__ = ("handle", "used")

    def __init__(self, handle: NormOutput) -> None:
        self.handle, self.used = handle, False

    def get(self) -> torch.Tensor:
        """The output, inside the consumer's backward (once per backward)."""
        self.used = True
        return self.handle._get()

    def __del__(self) -> None:
        if not self.used:
            self.handle._release()


def _add_forward_impl(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h, rstd), h = x + residual (contiguous)."""
    return run_kernel("rms_norm_add_forward", x, residual, weight, eps, offset)


add_rms_norm_forward = torch.library.custom_op(
    "torch_metal_fused::add_rms_norm_forward", _add_forward_impl, mutates_args=()
)


@add_rms_norm_forward.register_fake
def _(x, residual, weight, eps, offset):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x))


def _add_backward_impl(
    dy: torch.Tensor,
    dh: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    needs_dw: bool,
    offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dw): dx is the gradient of both x and the residual; dw a 0-element tensor when not asked for."""
    dx, dw = run_kernel("rms_norm_add_backward", dy, dh, h, weight, rstd, needs_dw, offset)
    return dx, none_to_empty(dw, h)


add_rms_norm_backward = torch.library.custom_op(
    "torch_metal_fused::add_rms_norm_backward", _add_backward_impl, mutates_args=()
)


@add_rms_norm_backward.register_fake
def _(dy, dh, h, weight, rstd, needs_dw, offset):
    return torch.empty_like(h), torch.empty_like(weight) if needs_dw else h.new_empty(0)


class AddRMSNormFunction(torch.autograd.Function):
    """x and residual get one gradient tensor, as torch's own `x + residual` hands one to both (leaves' .grad are
    separate copies, autograd's rule). Double backward is supported: with create_graph=True backward is the reference
    formula in torch ops over the saved h (an output of this Function, so the second-order pass flows back through
    it), with rstd recomputed from h."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps: float, offset: float):
        y, h, rstd = call(add_rms_norm_forward, _add_forward_impl, x, residual, weight, eps, offset)
        ctx.save_for_backward(h, weight, rstd)
        ctx.eps, ctx.offset = eps, offset
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, rstd = ctx.saved_tensors
        needs_dw = ctx.needs_input_grad[2]
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or needs_dw):
            return None, None, None, None, None
        if create_graph_requested():
            rstd = reference.rms_norm_rstd(h, ctx.eps)
            dx, dw = reference.rms_norm_add_backward(dy, dh, h, weight, rstd, needs_dw, ctx.offset)
            return dx, dx, dw, None, None
        dx, dw = call(add_rms_norm_backward, _add_backward_impl, dy, dh, h, weight, rstd, needs_dw, ctx.offset)
        return dx, dx, empty_to_none(dw, needs_dw), None, None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual, weight, eps, offset), x + residual)` in one kernel forward and one backward: the
    residual add of a pre-norm decoder layer fused with the RMSNorm that follows it. Returns (normed, new_residual);
    new_residual = x + residual in x's dtype (rounded as the unfused add rounds it). x and residual: the same shape
    and dtype; weight (hidden,); `offset=1.0` for Gemma's `(1 + weight)`."""
    check_tensor("x", x)
    check_tensor("residual", residual)
    check_tensor("weight", weight)
    check_same_device_dtype("x", x, residual=residual, weight=weight)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (RMSNorm normalises the last one)")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match x's last dimension, got {tuple(weight.shape)}"
        )
    eps = check_eps(eps)
    offset = check_finite_number("offset", offset)
    return AddRMSNormFunction.apply(x, residual, weight, eps, offset)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, offset: float = 0.0
) -> torch.Tensor:
    """`x * rsqrt(mean(x², -1) + eps) * (weight + offset)` over the last dimension; output dtype = x's.

    Statistics in float32 for float16/bfloat16. `offset=1.0` gives Gemma's `(1 + weight)`, added in float32
    inside the kernel (no rounding of `1 + weight` to x's dtype)."""
    check_tensor("x", x)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (RMSNorm normalises the last one)")
    eps = check_eps(eps)
    offset = check_finite_number("offset", offset)
    if weight is not None:
        check_same_device_dtype("x", x, weight=weight)
        if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"weight must have shape ({x.shape[-1]},) to match x's last dimension, got {tuple(weight.shape)}"
            )
    elif offset != 0.0:
        raise ValueError("offset applies to a weight: pass weight, or offset=0")
    return RMSNormFunction.apply(x, weight, eps, offset)


def self_test_cases(dtype: torch.dtype, device: str) -> list:
    """The doctor's self-test: with a weight on rows over 256 wide, without one on short rows, and add + RMSNorm."""
    from torch_metal_fused.testing import SelfTestCase, sample

    def norm64(x, w=None):
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
        return y if w is None else y * w

    x, xs, w = (
        sample((37, 300), dtype, device, 0),
        sample((5, 3, 19), dtype, device, 1),
        sample((300,), dtype, device, 2),
    )
    residual = sample((37, 300), dtype, device, 3)
    return [
        SelfTestCase(lambda t: rms_norm(t[0], t[1], eps=1e-6), lambda t: norm64(t[0], t[1]), [x, w]),
        SelfTestCase(lambda t: rms_norm(t[0], None, eps=1e-6), lambda t: norm64(t[0]), [xs]),
        SelfTestCase(
            lambda t: add_rms_norm(t[0], t[1], t[2], eps=1e-6)[0],
            lambda t: norm64(t[0] + t[1], t[2]),
            [x, residual, w],
        ),
    ]
