"""One place that routes a kernel entry point to the backend serving its tensors."""

from __future__ import annotations

import math

import torch

from torch_metal_fused import reference
from torch_metal_fused._autocast import autocast_device
from torch_metal_fused._backend import KernelUnavailable, fall_back, family_of_entry, kernels_for, select_backend


def run_kernel(entry_point: str, lead: torch.Tensor, *args):
    """Call `entry_point` (e.g. "softmax_forward") of the backend that serves `lead`. Where our kernels cannot
    serve the call (a shader that did not compile, a pipeline that could not be built, no launch plan for this
    shape), the reference serves it and the fallback is announced once (an error under TORCH_METAL_FUSED_STRICT=1):
    a training loop never crashes because of our shaders. Kernels raise KernelUnavailable before encoding
    anything, and every entry point returns fresh tensors, so calling the reference then is safe."""
    family = family_of_entry(entry_point)
    backend = select_backend(lead, family)
    if backend != "reference":
        try:
            return getattr(kernels_for(backend), entry_point)(lead, *args)
        except KernelUnavailable as exc:
            fall_back(backend, exc.family, exc.scope, exc.reason)
    return getattr(reference, entry_point)(lead, *args)


def call(op, impl, *args):
    """Call custom op `op` (whose body is `impl`) from an autograd.Function. Eager calls run `impl` directly,
    skipping the dispatcher round trip (host time per call, much of a small op's cost); under torch.compile
    the registered op is called, so tracing sees it with its fake implementation. Under torch.autocast the body
    runs with autocast off, in the dtypes the public function chose (torch_metal_fused/_autocast.py)."""
    if torch.compiler.is_compiling():
        return op(*args)
    device = autocast_device(*args)
    if device is None:
        return impl(*args)
    with torch.autocast(device, enabled=False):
        return impl(*args)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dimension), also where the last dimension is 0 (reshape(-1, 0) cannot infer the rows)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def none_to_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent gradient travels as a 0-element tensor."""
    return t if t is not None else like.new_empty(0)


def empty_to_none(t: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return t if wanted else None


# ---- double backward ------------------------------------------------------------------------------------------
# Autograd runs an autograd.Function's backward with grad mode on only when the caller asked for a differentiable
# backward (`create_graph=True`: gradient penalties, Hessian-vector products, MAML). Our kernels' backward is not
# differentiable, so ops that support double backward then compute their backward with the reference's backward
# formula in torch ops, from inputs that carry their autograd history (intermediates such as RMSNorm's rstd are
# recomputed from them): autograd differentiates that formula exactly, and the second-order pass runs our
# first-order kernels again where it flows back through an op. Explicit formulas, not a nested autograd.grad over
# a recomputed forward: that would also run the graph upstream of the inputs (total derivatives through a weight
# shared with an earlier op). Ops that do not support double backward say so (`refuse_double_backward`) rather
# than return gradients whose own gradient would be silently wrong or missing.
def create_graph_requested() -> bool:
    """Inside an autograd.Function's backward: whether the caller asked for create_graph=True."""
    return torch.is_grad_enabled()


def refuse_double_backward(op: str) -> None:
    """Raise a clear error when the caller asked for a differentiable backward of `op`, which it does not support."""
    if create_graph_requested():
        raise RuntimeError(
            f"torch_metal_fused.{op} does not support double backward (backward with create_graph=True): its fused "
            "backward is not differentiable. Use the unfused PyTorch op where second derivatives are needed."
        )
