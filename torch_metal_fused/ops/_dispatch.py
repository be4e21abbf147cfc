"""One place that routes a kernel entry point to the backend serving its tensors."""

from __future__ import annotations

import torch

from torch_metal_fused import reference
from torch_metal_fused._backend import backend_for, kernels_for


def run_kernel(entry_point: str, lead: torch.Tensor, *args):
    """Call `entry_point` (e.g. "softmax_forward") of the backend that serves `lead`."""
    backend = backend_for(lead)
    impl = reference if backend == "reference" else kernels_for(backend)
    return getattr(impl, entry_point)(lead, *args)


def call(op, impl, *args):
    """Call custom op `op` (whose body is `impl`) from an autograd.Function. Eager calls run `impl` directly,
    skipping the dispatcher round trip (several µs per call: much of a small op's cost); under torch.compile
    the registered op is called, so tracing sees it with its fake implementation."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


def none_to_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent gradient travels as a 0-element tensor."""
    return t if t is not None else like.new_empty(0)


def empty_to_none(t: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return t if wanted else None
