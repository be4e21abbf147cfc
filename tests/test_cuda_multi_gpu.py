"""Every CUDA op on a second device after the first (runs on machines with two or more GPUs; skipped elsewhere).

The CUDA backend keeps per-kernel state that belongs to a device's context: the dynamic shared-memory limit raised by
cudaFuncSetAttribute and the occupancy counts of the launch rules (csrc/cuda/ops.cu: resident_blocks; lora_kernels.cuh:
lora_expand_blocks_per_sm). A cache keyed without the device would skip raising the limit on cuda:1 after cuda:0 and
the wide-row softmax would fail to launch there. Each case runs forward and backward on cuda:0, then on cuda:1 with
cuda:0 still the current device (the op must follow its inputs), and the two must agree: identical GPUs, inputs and
launch rules give the same values.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import torch_metal_fused as tmf
from torch_metal_fused import _backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

BF16 = torch.bfloat16


def _randn(*shape: int, dtype: torch.dtype = BF16, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype)


def _targets(rows: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(7))


def _lora_inputs(tokens: int) -> list[torch.Tensor]:
    """x (tokens, 1024), W (1024, 1024), A (16, 1024), B (1024, 16)."""
    shapes = ((tokens, 1024, 1.0), (1024, 1024, 0.03), (16, 1024, 0.03), (1024, 16, 0.03))
    return [_randn(rows, cols, seed=i, scale=scale) for i, (rows, cols, scale) in enumerate(shapes)]


def _lora(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return tmf.lora_linear(x, w, a, b, scale=2.0)


# name -> (CPU inputs, the op on inputs moved to the device). Floating inputs get gradients, but rope's tables.
CASES: dict[str, tuple[Callable[[], list[torch.Tensor]], Callable[..., object]]] = {
    # 64 KB rows: the shared-memory softmax (its limit raised past 48 KB), forward and backward
    "softmax_wide_rows_shared_memory": (lambda: [_randn(8, 32768, scale=3.0)], tmf.softmax),
    # 96 KB rows in float32: the shared-memory softmax forward (96 KB) and backward (y and dy staged: 192 KB)
    "softmax_fp32_wide_rows_shared_memory": (lambda: [_randn(4, 24576, dtype=torch.float32, scale=3.0)], tmf.softmax),
    "softmax": (lambda: [_randn(64, 4096, scale=3.0)], tmf.softmax),
    "rms_norm": (lambda: [_randn(128, 4096), _randn(4096, seed=1)], tmf.rms_norm),
    "add_rms_norm": (
        lambda: [_randn(128, 4096), _randn(128, 4096, seed=1), _randn(4096, seed=2)],
        tmf.add_rms_norm,
    ),
    "cross_entropy": (
        lambda: [_randn(64, 32000, scale=2.0), _targets(64, 32000)],
        tmf.cross_entropy,
    ),
    "swiglu": (lambda: [_randn(128, 4096), _randn(128, 4096, seed=1)], tmf.swiglu),
    "rope": (
        lambda: (
            [_randn(2, 8, 64, 128), _randn(2, 2, 64, 128, seed=1)]
            + [_randn(2, 64, 128, seed=2), _randn(2, 64, 128, seed=3)]
        ),  # q, k (GQA), cos, sin
        tmf.rope,
    ),
    # many tokens: the merged weight W' from our tensor-core kernel (its occupancy count cached per device)
    "lora_linear_merged_weight": (lambda: _lora_inputs(2048), _lora),
    # few tokens, rank 16: y written by the staged-store kernel
    "lora_linear_few_tokens": (lambda: _lora_inputs(64), _lora),
}


def _run(name: str, index: int) -> list[torch.Tensor]:
    make, op = CASES[name]
    device = torch.device("cuda", index)
    no_grad = 2 if name == "rope" else 0  # cos and sin take no gradient (the op refuses them)
    cpu = make()
    inputs = [t.to(device).requires_grad_(t.is_floating_point() and i < len(cpu) - no_grad) for i, t in enumerate(cpu)]
    with torch.cuda.device(0):
        out = op(*inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        for o in outs:
            assert o.device == device, f"{name}: output on {o.device}, inputs on {device}"
        weights = [_randn(*o.shape, dtype=o.dtype, seed=11 + i).to(device) for i, o in enumerate(outs)]
        loss = sum((o.float() * w.float()).sum() for o, w in zip(outs, weights))
        grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
        assert torch.cuda.current_device() == 0, f"{name}: the op changed the current device"
    torch.cuda.synchronize(device)
    return [o.detach().float().cpu() for o in outs] + [g.float().cpu() for g in grads]


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_second_device_matches_first(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Our CUDA kernels must serve both devices: no forced backend, and a fallback to the reference is an error.
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setenv(_backend.STRICT_ENV, "1")
    for index in (0, 1):
        probe = torch.zeros(1, device=torch.device("cuda", index))
        assert _backend.backend_for(probe) == "cuda", f"cuda:{index} is served by {_backend.backend_for(probe)}"
    first = _run(name, 0)
    second = _run(name, 1)
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.isfinite(a).all(), f"{name}: result {i} not finite on cuda:0"
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-3, msg=lambda m, i=i: f"{name}: result {i}: {m}")
