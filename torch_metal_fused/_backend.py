"""Which implementation serves a tensor: our Metal kernels, our CUDA kernels, the Metal-on-CPU
harness, or the plain-PyTorch reference."""

from __future__ import annotations

import functools
import platform
import threading
import warnings

import torch

from torch_metal_fused import _config

# Defined below the dispatcher, so that the harness (runner, compile_shader) can use them without importing this
# module (no import cycle _backend -> backends -> emulator -> _backend); re-exported here, where callers look for them.
from torch_metal_fused._errors import KernelUnavailable  # noqa: F401
from torch_metal_fused._families import FAMILIES, family_of_entry  # noqa: F401

BACKENDS = ("metal", "cuda", "reference", "metal-emulated")
ENV_VAR = _config.BACKEND.name
STRICT_ENV = _config.STRICT.name
# dtypes our kernels implement; anything else (float64) is served by the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
METAL_BACKENDS = ("metal", "metal-emulated")
REPORT_HINT = (
    "Please report it with the output of `python -m torch_metal_fused.doctor` "
    "(an issue on the torch-metal-fused tracker)"
)


class FallbackError(RuntimeError):
    """Under TORCH_METAL_FUSED_STRICT=1: our kernels could not serve a call (`reason` says why)."""

    def __init__(self, message: str, family: str, reason: str) -> None:
        super().__init__(message)
        self.family, self.reason = family, reason

    def __reduce__(self):
        return type(self), (str(self), self.family, self.reason)


@functools.cache
def _compiled_extension():
    """The built extension (`torch_metal_fused._C`), or None where nothing was compiled (CPU-only Linux)."""
    try:
        from torch_metal_fused import _C
    except ImportError:
        return None
    return _C


# torch.mps.compile_shader's kernels take `arg_casts` from PyTorch 2.9: our argument structs are bound as int32 words.
COMPILE_SHADER_MIN_TORCH = (2, 9)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@functools.cache
def has_compile_shader() -> bool:
    """Whether this torch compiles our shaders at run time on MPS (torch.mps.compile_shader, PyTorch 2.9+), from
    shaders/ beside the package (an editable or source-tree install: the wheel does not carry them yet)."""
    from torch_metal_fused.backends.metal_library import SHADERS

    return (
        SHADERS.is_dir()
        and torch_version() >= COMPILE_SHADER_MIN_TORCH
        and hasattr(torch.mps, "compile_shader")
        and torch.backends.mps.is_available()
    )


def has_metal_kernels() -> bool:
    """Whether MPS tensors can run on our Metal kernels (through torch.mps.compile_shader)."""
    return has_compile_shader()


def has_cuda_kernels() -> bool:
    ext = _compiled_extension()
    return ext is not None and getattr(ext, "HAS_CUDA", False)


def strict() -> bool:
    """TORCH_METAL_FUSED_STRICT=1: a fallback from our Metal kernels to the reference is an error, not a warning
    (the test suite and benchmarks/mps_run.sh set it, so a Mac run cannot pass by silently falling back)."""
    return _config.strict()


class _Fallbacks:
    """What this process has learnt about our Metal kernels: families that cannot be used (never retried) and
    which fallbacks were already announced."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.unavailable: dict[tuple[str, str], str] = {}  # (backend, family) -> reason
        self.warned: set[tuple[str, str, str]] = set()


_fallbacks = _Fallbacks()


def reset_fallbacks() -> None:
    """Forget unusable families and announced fallbacks (for tests; a real process never retries)."""
    global _fallbacks
    _fallbacks = _Fallbacks()


def unavailable_families(backend: str = "metal") -> dict[str, str]:
    """Families of `backend` this process serves by the reference, with the reason."""
    return {f: r for (b, f), r in _fallbacks.unavailable.items() if b == backend}


def system_description(backend: str) -> str:
    """The system in a warning: macOS and Metal versions on a Mac, the harness elsewhere."""
    if backend == "metal":
        return f"macOS {platform.mac_ver()[0] or '?'} on {platform.machine()}, torch {torch.__version__}"
    if backend == "metal-emulated":
        return f"Metal-on-CPU harness on {platform.system()} {platform.machine()}"
    return f"{backend} on {platform.platform()}"


def fall_back(backend: str, family: str, scope: str, reason: str) -> None:
    """Record that a call of `family` is served by the reference instead of `backend`, and say so once.

    scope "family" makes the family unusable for the rest of the process; other scopes ("call", "dtype") affect
    this call only. With TORCH_METAL_FUSED_STRICT=1 this raises instead."""
    where = system_description(backend)
    if scope == "family":
        head = f"the {family} kernels ({backend}) are unusable on this system ({where}): {reason}."
        what = f"For the rest of this process the {family} ops are served by the plain-PyTorch reference"
    else:
        head = f"the {family} kernels ({backend}) cannot serve a call on this system ({where}): {reason}."
        what = "Such calls are served by the plain-PyTorch reference (this warning is shown once)"
    message = f"torch_metal_fused: {head} {what}: correct, not fused. {REPORT_HINT}."
    if strict():
        raise FallbackError(f"{message} {STRICT_ENV}=1 makes this an error.", family, reason)
    key = (backend, family, scope)
    with _fallbacks.lock:
        if scope == "family":
            _fallbacks.unavailable[(backend, family)] = reason
        first = key not in _fallbacks.warned
        _fallbacks.warned.add(key)
    if first:
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def bfloat16_supported(backend: str) -> bool:
    """bfloat kernels need Metal 3.1 (macOS 14+); the harness emulates their absence with the no_bfloat fault."""
    if backend == "metal":
        # compile_shader compiles with the Metal language version PyTorch pins (3.1 in 2.9, so bfloat); a library
        # without bfloat kernels would be found at the first bfloat16 call and served by the reference.
        return has_compile_shader()
    if backend == "metal-emulated":
        from torch_metal_fused.emulator import runner

        return not runner.fault_active("no_bfloat")
    return True


def _metal_unavailable_reason(backend: str, family: str, dtype: torch.dtype) -> tuple[str, str] | None:
    """(scope, reason) when our Metal kernels cannot serve `family` in `dtype` here, else None."""
    reason = _fallbacks.unavailable.get((backend, family))
    if reason is not None:
        return "family", reason
    if dtype == torch.bfloat16 and not bfloat16_supported(backend):
        return "dtype", "this system's Metal lacks bfloat (Metal 3.1, macOS 14+), so bfloat16 tensors cannot be served"
    return None


def select_backend(x: torch.Tensor, family: str) -> str:
    """backend_for(x, family), announcing (once) or, when strict, raising for a fallback to the reference."""
    backend = backend_for(x)
    if backend == "reference" and x.device.type == "mps" and x.dtype in KERNEL_DTYPES and forced_backend() is None:
        fall_back("metal", family, "torch", _no_metal_reason())
        return backend
    if backend in METAL_BACKENDS:
        why = _metal_unavailable_reason(backend, family, x.dtype)
        if why is not None:
            if why[0] != "family":  # a family already found unusable was announced when it was found
                fall_back(backend, family, *why)
            return "reference"
    return backend


def _no_metal_reason() -> str:
    if torch_version() < COMPILE_SHADER_MIN_TORCH:
        return (
            f"torch {torch.__version__} cannot launch them: they are compiled and launched through "
            "torch.mps.compile_shader with arg_casts, from PyTorch 2.9 (pip install -U torch)"
        )
    from torch_metal_fused.backends.metal_library import SHADERS

    return f"their shader sources are missing ({SHADERS}): reinstall torch-metal-fused"


def forced_backend() -> str | None:
    """The backend TORCH_METAL_FUSED_BACKEND forces: "reference", "metal-emulated" or None (_config.BACKEND)."""
    return _config.backend()


def backend_for(x: torch.Tensor, family: str | None = None) -> str:
    """The implementation that serves tensor `x`: "metal", "cuda", "metal-emulated" or "reference".

    `TORCH_METAL_FUSED_BACKEND=reference` forces the reference everywhere;
    `TORCH_METAL_FUSED_BACKEND=metal-emulated` runs CPU tensors through the Metal-on-CPU harness.
    float64 tensors are always served by the reference (no Apple GPU has float64). With `family` (a key of
    FAMILIES, e.g. "softmax"), also says "reference" where that family's Metal kernels turned out unusable in this
    process, or cannot take x's dtype here.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"backend_for expects a torch.Tensor, got {type(x).__name__}")
    forced = forced_backend()
    if forced == "reference" or x.dtype not in KERNEL_DTYPES:
        return "reference"
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    device = x.device.type
    backend = "reference"
    if device == "mps" and has_metal_kernels():
        backend = "metal"
    elif device == "cuda" and has_cuda_kernels():
        backend = "cuda"
    elif device == "cpu" and forced == "metal-emulated":
        backend = "metal-emulated"
    if family is not None and backend in METAL_BACKENDS and _metal_unavailable_reason(backend, family, x.dtype):
        return "reference"
    return backend


def kernels_for(backend: str):
    """The module implementing the kernel entry points for a non-reference backend.

    Every backend exposes the same functions (softmax_forward, rms_norm_backward, lora_forward, ...),
    so each op dispatches with one line.
    """
    if backend == "cuda":
        from torch_metal_fused.backends import cuda

        return cuda
    if backend in METAL_BACKENDS:
        from torch_metal_fused.backends import metal

        return metal
    raise ValueError(f"no kernels for backend {backend!r}")
