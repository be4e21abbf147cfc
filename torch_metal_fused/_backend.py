"""Which implementation serves a tensor: our Metal kernels, our CUDA kernels, the Metal-on-CPU
harness, or the plain-PyTorch reference."""

from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("metal", "cuda", "reference", "metal-emulated")
ENV_VAR = "TORCH_METAL_FUSED_BACKEND"
# dtypes our kernels implement; anything else (float64) is served by the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _compiled_extension():
    """The built extension (`torch_metal_fused._C`), or None where nothing was compiled (CPU-only Linux)."""
    try:
        from torch_metal_fused import _C
    except ImportError:
        return None
    return _C


def has_metal_kernels() -> bool:
    ext = _compiled_extension()
    return ext is not None and getattr(ext, "HAS_METAL", False)


def has_cuda_kernels() -> bool:
    ext = _compiled_extension()
    return ext is not None and getattr(ext, "HAS_CUDA", False)


@functools.cache
def metal_supports_bfloat16() -> bool:
    """bfloat kernels exist only where the Metal compiler supports Metal 3.1 (macOS 14+)."""
    ext = _compiled_extension()
    supported = bool(ext is not None and ext.metal_supports_bfloat16())
    if not supported:
        warnings.warn(
            "torch_metal_fused: this system's Metal lacks bfloat (Metal 3.1, macOS 14+); "
            "bfloat16 tensors use the reference implementation",
            stacklevel=3,
        )
    return supported


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def backend_for(x: torch.Tensor) -> str:
    """The implementation that serves tensor `x`: "metal", "cuda", "metal-emulated" or "reference".

    `TORCH_METAL_FUSED_BACKEND=reference` forces the reference everywhere;
    `TORCH_METAL_FUSED_BACKEND=metal-emulated` runs CPU tensors through the Metal-on-CPU harness.
    float64 tensors are always served by the reference (no Apple GPU has float64).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"backend_for expects a torch.Tensor, got {type(x).__name__}")
    forced = forced_backend()
    if forced == "reference" or x.dtype not in KERNEL_DTYPES:
        return "reference"
    device = x.device.type
    if device == "mps" and has_metal_kernels():
        if x.dtype == torch.bfloat16 and not metal_supports_bfloat16():
            return "reference"
        return "metal"
    if device == "cuda" and has_cuda_kernels():
        return "cuda"
    if device == "cpu" and forced == "metal-emulated":
        return "metal-emulated"
    return "reference"


def kernels_for(backend: str):
    """The module implementing the kernel entry points for a non-reference backend.

    Every backend exposes the same functions (softmax_forward, rms_norm_backward, lora_forward, ...),
    so each op dispatches with one line.
    """
    if backend in ("metal", "cuda"):
        return _compiled_extension()
    if backend == "metal-emulated":
        from torch_metal_fused.backends import emulated

        return emulated
    raise ValueError(f"no kernels for backend {backend!r}")
