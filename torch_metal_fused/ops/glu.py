"""Gated activations of LLM MLPs: SwiGLU `silu(gate) * up` (Llama, Mistral, Qwen) and GeGLU `gelu_tanh(gate) * up`
(Gemma's `gelu_pytorch_tanh`), forward and backward in one kernel each.

Backward recomputes the activation from the saved inputs, so training keeps gate and up (which the projections'
outputs are anyway) and no activation tensor; it reads gate, up and the incoming gradient once and writes both
gradients once. Math in float32 for float16/bfloat16 (one rounding per output, where the unfused
`act_fn(gate) * up` rounds the activation too).

Kernel launch code: Metal `torch_metal_fused/backends/metal.py` (glu_*) (shared with the Metal-on-CPU
harness), shaders `shaders/glu.metal`; CUDA `csrc/cuda/glu.cu`; reference `reference.glu_forward/glu_backward`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.modules import module as nn_module

from torch_metal_fused import reference
from torch_metal_fused._validation import check_same_device_dtype, check_tensor
from torch_metal_fused.ops._dispatch import (
    call,
    can_overwrite_saved,
    create_graph_requested,
    mark_overwritten,
    run_kernel,
    saved_tensors_pass_through,
)
from torch_metal_fused.reference import GLU_GELU_TANH, GLU_SILU

ACTIVATIONS = {"silu": GLU_SILU, "gelu_tanh": GLU_GELU_TANH}


def _glu_forward_impl(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    return run_kernel("glu_forward", gate, up, activation)


glu_forward = torch.library.custom_op("torch_metal_fused::glu_forward", _glu_forward_impl, mutates_args=())


@glu_forward.register_fake
def _(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _glu_backward_impl(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel("glu_backward", dout, gate, up, activation, False)


glu_backward = torch.library.custom_op("torch_metal_fused::glu_backward", _glu_backward_impl, mutates_args=())


@glu_backward.register_fake
def _(dout, gate, up, activation):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(gate, memory_format=torch.contiguous_format),
    )


class GluFunction(torch.autograd.Function):
    """Double backward is supported: with create_graph=True backward is the reference formula in torch ops over the
    saved gate and up. `inputs_private`: the caller made gate and up for this op alone (the patched MLP's projection
    outputs); their gradients are then written over them where nothing else can read them afterwards
    (ops._dispatch.can_overwrite_saved), so the backward allocates no gate-sized tensor."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: int, inputs_private: bool) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.activation, ctx.inputs_private = activation, inputs_private
        return call(glu_forward, _glu_forward_impl, gate, up, activation)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        if create_graph_requested():
            dgate, dup = reference.glu_backward(dout, gate, up, ctx.activation)
            return dgate, dup, None, None
        if ctx.inputs_private and gate.shape == dout.shape and can_overwrite_saved(gate, up, grad=dout):
            dgate, dup = call(_glu_backward_in_place, _glu_backward_in_place, dout, gate, up, ctx.activation)
            mark_overwritten(gate, up)
            return dgate, dup, None, None
        dgate, dup = call(glu_backward, _glu_backward_impl, dout, gate, up, ctx.activation)
        return dgate, dup, None, None


def _glu_backward_in_place(dout, gate, up, activation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients written over gate and up. Eager only (can_overwrite_saved): not a registered op, whose schema
    would have to declare the mutation."""
    return run_kernel("glu_backward", dout, gate, up, activation, True)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """`act(gate) * up` with a fused forward and backward; activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gelu
    with the tanh approximation). gate and up: the same shape, dtype and device (e.g. the outputs of an MLP's
    gate and up projections, or the two halves of a fused gate_up projection: strided rows are read in place)."""
    return _glu(gate, up, activation, inputs_private=False)


def down_of_glu(
    down: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor, activation: str
) -> torch.Tensor:
    """`down(glu(gate, up, activation))` for a caller that made gate and up for this call alone and keeps no
    reference to them (patch_model's MLP, nn.SwiGLUMLP: `down` is the down projection). Two savings over the plain
    composition, same values:
    - glu's output is not kept for backward: what `down` saves of it (its input, for the weight's or the adapter's
      gradient) is recomputed from gate and up, which glu keeps anyway, when down's backward asks for it (one more
      elementwise pass per layer; an MLP's tokens x intermediate tensor less per layer held until backward);
    - glu's backward may write the gradients over gate and up (GluFunction's inputs_private).
    Without a graph (no grad), for tensor subclasses, under torch.compile, with forward hooks on `down`, or inside
    other saved-tensor hooks (non-reentrant gradient checkpointing, which already recomputes and lets each saved
    tensor be unpacked once; there the backward is not in place either), `down(glu(...))` as it is; hooks whose pack
    function is marked `passes_tensors_through` (it returns the tensor, as a memory counter's does) get everything
    else `down` saves. What `down` saves besides glu's output keeps autograd's check against in-place changes (which
    autograd skips for tensors that pass through hooks), and glu's output changed in place inside `down` (an in-place
    dropout) is saved as it is, not recomputed."""
    out = _glu(gate, up, activation, inputs_private=True)
    node = out.grad_fn
    if (
        node is None
        or type(out) is not torch.Tensor
        or torch.compiler.is_compiling()
        or not saved_tensors_pass_through()
        or _has_forward_hooks(down)
    ):
        return down(out)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    ptr, numel, dtype = out.data_ptr(), out.numel(), out.dtype  # not `out` itself: the hooks must not keep it alive
    version = out._version

    def pack(t: torch.Tensor):
        if (
            type(t) is torch.Tensor
            and t.data_ptr() == ptr
            and t.numel() == numel
            and t.dtype == dtype
            and t.is_contiguous()
            and t._version == version  # glu's values, not changed in place since
        ):
            return _RecomputedGlu(node, t.shape)
        return _Kept(t, t._version) if outer is None else _PackedByOuterHooks(outer[0](t))

    def unpack(packed):
        if isinstance(packed, _PackedByOuterHooks):
            return outer[1](packed.value)
        if isinstance(packed, _Kept):
            if packed.tensor._version != packed.version:  # autograd skips this check for hooked saved tensors
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: [{packed.tensor.type()} {list(packed.tensor.shape)}] is at version "
                    f"{packed.tensor._version}; expected version {packed.version} instead."
                )
            return packed.tensor
        return packed.recompute()

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return down(out)


def _has_forward_hooks(down) -> bool:
    """Forward hooks on `down` (or on every module) see glu's output and may build on it (a side loss whose own
    backward, after the step's, would find glu's saved gate and up already freed or overwritten): then `down` saves
    what it saves. Hooks on modules inside `down` are not looked for."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return isinstance(down, torch.nn.Module) and bool(down._forward_hooks or down._forward_pre_hooks)


class _RecomputedGlu:
    """What a down projection saved of glu's output: glu's node (whose saved gate and up make it again) and the
    shape it was saved in."""

    __slots__ = ("node", "shape")

    def __init__(self, node, shape: torch.Size) -> None:
        self.node, self.shape = node, shape

    def recompute(self) -> torch.Tensor:
        # Down's backward runs before glu's (glu's output feeds it), so gate and up still hold their values here.
        gate, up = self.node.saved_tensors
        activation = self.node.activation
        if torch.is_grad_enabled():  # create_graph: the recomputed output carries gate's and up's history
            return GluFunction.apply(gate, up, activation, False).view(self.shape)
        return call(glu_forward, _glu_forward_impl, gate, up, activation).view(self.shape)


class _Kept:
    """A tensor `down` saved, with its version then (autograd's own check is skipped for hooked saved tensors)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor, version) -> None:
        self.tensor, self.version = tensor, version


class _PackedByOuterHooks:
    """A saved tensor as the saved-tensor hooks in effect outside down_of_glu packed it."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


def _glu(gate: torch.Tensor, up: torch.Tensor, activation: str, inputs_private: bool) -> torch.Tensor:
    check_tensor("gate", gate)
    check_tensor("up", up)
    check_same_device_dtype("gate", gate, up=up)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.ndim == 0:
        return GluFunction.apply(gate.unsqueeze(0), up.unsqueeze(0), ACTIVATIONS[activation], False).squeeze(0)
    return GluFunction.apply(gate, up, ACTIVATIONS[activation], inputs_private)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` (the MLP activation of Llama, Mistral, Qwen), fused forward and backward."""
    return glu(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`gelu(gate, approximate="tanh") * up` (Gemma's MLP activation), fused forward and backward."""
    return glu(gate, up, "gelu_tanh")


__all__ = ["GluFunction", "geglu", "glu", "swiglu"]


def self_test_cases(dtype: torch.dtype, device: str) -> list:
    """The doctor's self-test: SwiGLU and GeGLU over odd-width rows."""
    from torch_metal_fused.testing import SelfTestCase, sample

    F = torch.nn.functional
    return [
        SelfTestCase(
            lambda t: swiglu(t[0], t[1]) + geglu(t[0], t[1]),
            lambda t: (F.silu(t[0]) + F.gelu(t[0], approximate="tanh")) * t[1],
            [sample((9, 1003), dtype, device, 9) * 3, sample((9, 1003), dtype, device, 10)],
        )
    ]
