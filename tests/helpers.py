"""Inputs for the correctness contract: random (never zeros), in every layout the ops must accept."""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_metal_fused._families import OPS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Last-dimension sizes of the contract, with a row count that keeps each case quick on the CPU harness.
ROW_SIZES = {1: 300, 7: 257, 31: 65, 32: 2048, 33: 129, 1000: 9, 1023: 3, 4096: 5, 4097: 3, 8192: 2, 8193: 2, 10000: 2}
LAYOUTS = ("contiguous", "offset_view", "strided_rows", "transposed")


def randn(shape, dtype, device, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def draws(seed: int = 0) -> Callable[..., torch.Tensor]:
    """r(*shape): successive float32 CPU tensors from one generator (distinct values for every call)."""
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def make_layout(shape: tuple[int, ...], dtype, device, layout: str, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A tensor of `shape` laid out as asked: contiguous; a view with a storage offset; rows spaced wider
    than their length (a column slice); or a transposed (non-contiguous last dim) view."""
    if layout == "contiguous":
        return randn(shape, dtype, device, scale, seed)
    if layout == "offset_view":
        flat = randn((3 + _numel(shape),), dtype, device, scale, seed)
        t = flat[3:].view(shape)
        assert t.storage_offset() == 3
        return t
    if layout == "strided_rows":
        wide = randn((*shape[:-1], shape[-1] + 5), dtype, device, scale, seed)
        return wide[..., 2 : 2 + shape[-1]]
    if layout == "transposed":
        t = randn((*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else shape, dtype, device, scale, seed)
        return t.transpose(-1, -2) if len(shape) >= 2 else t
    raise ValueError(layout)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def record_kernel_calls(monkeypatch, modules: tuple[str, ...], entry=lambda name, lead: name) -> list:
    """Every kernel call the ops of `modules` (torch_metal_fused.ops.<module>) make from now on, each recorded as
    entry(entry point name, lead tensor), in call order; the calls themselves go through unchanged. Attention's SDPA
    route (CUDA) is recorded as its kernels would be."""
    from torch_metal_fused.ops import _dispatch

    calls = []
    real = _dispatch.run_kernel

    def record(name, lead, *args):
        calls.append(entry(name, lead))
        return real(name, lead, *args)

    for mod in modules:
        monkeypatch.setattr(f"torch_metal_fused.ops.{mod}.run_kernel", record)
    if "attention" in modules:  # on CUDA the op runs PyTorch's SDPA: its route's calls, under the kernels' names
        from torch_metal_fused.ops import attention

        real_sdpa = attention._sdpa

        def sdpa(q, *args):
            out = real_sdpa(q, *args)
            if out is not None:
                calls.append(entry("attention_forward", q))
                if out.requires_grad:
                    out.register_hook(lambda grad: calls.append(entry("attention_backward", grad)))
            return out

        monkeypatch.setattr(attention, "_sdpa", sdpa)
    return calls


def harness_required() -> bool:
    """In CI on Linux (.ci/run sets CI; tools/setup.sh installs clang 19 and boost there) the Metal-on-CPU harness
    must work, so its tests fail rather than skip; elsewhere (macOS, Linux without root) they skip without it."""
    return bool(os.environ.get("CI")) and sys.platform.startswith("linux")


# Every public op of the package: the autograd/IEEE contract (tests/nan_inf.py, tests/test_autograd_contract.py) must
# cover each, and a test there fails when torch_metal_fused exports an op missing here.
PUBLIC_OPS = tuple(op.name for op in OPS)  # the manifest's (torch_metal_fused/_families.py)
# The ops' contract files, each once (one file may hold several ops).
CONTRACT_FILES = tuple(dict.fromkeys(op.contract for op in OPS))


def contract_module(contract: str) -> types.ModuleType:
    """tests/<contract> (an op's contract file in the manifest), imported: it declares the op's cases of the shared
    tests (autograd_case, every_kernel, plan_cache_calls, its test_nan_inf* tests)."""
    return importlib.import_module(contract.removesuffix(".py"))


@dataclass
class AutogradCase:
    """op(*grad_inputs, *fixed) and the same computed by torch's unfused ops (`composite`), for the autograd contract
    (tests/test_autograd_contract.py). Each op's contract file declares its case: autograd_case(name, device, dtype,
    reduction), so a new op's file must."""

    op: Callable
    composite: Callable
    grad_inputs: list[torch.Tensor]
    fixed: tuple = ()
    double_backward: bool = True
    scalar_output: bool = False  # a reduced loss: backward() with no gradient argument (an output gradient of 1)


def bytes_alive_after(fn) -> int:
    """Bytes allocated by fn() and still allocated when it returns (the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()
    del kept
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def rms64(x: torch.Tensor, w: torch.Tensor | None, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm as torch's unfused ops compute it (the contracts' composite): times w + offset, or no weight."""
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y * (w + offset) if w is not None else y


# A tiny decoder config (head_dim 32: the attention kernels' smallest) for the Hugging Face integration tests.
TINY_DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)
