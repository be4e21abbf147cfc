"""Host cost of a Metal kernel launch: the launch plans' Python (backends/metal.py) with a do-nothing executor in
place of torch.mps.compile_shader's kernels, plans cached as on a Mac, outputs allocated but not NaN-filled. What is
timed is what a Mac's CPU spends per call before PyTorch's own binding encodes the dispatch."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from torch_metal_fused.backends import metal, metal_library


class _NullKernel:
    max_threads_per_threadgroup = 1024
    thread_execution_width = 32
    calls = 0  # dispatches "encoded", all kernels together

    def __call__(self, *args, **kwargs) -> None:
        _NullKernel.calls += 1


class _NullLibrary:
    def __getattr__(self, name: str) -> _NullKernel:
        if name.startswith("_"):
            raise AttributeError(name)
        return _NullKernel()

    def __dir__(self) -> list[str]:
        return []


@contextlib.contextmanager
def null_executor() -> Iterator[None]:
    """CPU tensors launch on kernels that do nothing, with pipelines and plans cached as on a Mac."""
    libs = metal_library.KernelLibraries(lambda source: _NullLibrary(), "do-nothing executor", cache=True)
    metal_library._planted.append(libs)
    poison, metal.POISON_OUTPUTS = metal.POISON_OUTPUTS, False
    try:
        yield
    finally:
        metal.POISON_OUTPUTS = poison
        metal_library._planted.remove(libs)


def _median_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(20):  # warm: plans built and cached
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _calls() -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    x, w, dy = r(64, 1000), r(1000), r(64, 1000)
    rstd = torch.ones(64)
    logits, target, row_scale = r(16, 4000), torch.randint(0, 4000, (16,), generator=g), torch.ones(16)
    q, k, cos, sin = r(2, 8, 64, 64), r(2, 2, 64, 64), r(1, 64, 64), r(1, 64, 64)
    xs, a, b = r(256, 512), r(16, 512), r(512, 16)
    h, out = torch.empty(256, 16), torch.empty(256, 512)
    # attention: (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim) projections, grouped heads
    aq, ak, av = (r(2, 64, n, 64).transpose(1, 2) for n in (8, 2, 2))
    a_out, a_lse = torch.empty(2, 8, 64, 64), torch.zeros(2, 8, 64)
    a_dout = r(2, 8, 64, 64)
    return {
        "softmax_forward": lambda: metal.softmax_forward(x),
        "softmax_backward": lambda: metal.softmax_backward(x, dy),
        "rms_norm_forward": lambda: metal.rms_norm_forward(x, w, 1e-6),
        "rms_norm_backward": lambda: metal.rms_norm_backward(dy, x, w, rstd, True, True),
        "rms_norm_add_forward": lambda: metal.rms_norm_add_forward(x, dy, w, 1e-6, 0.0),
        "cross_entropy_rows": lambda: metal.cross_entropy_rows(logits, target, -100, 0.0, 0.0, row_scale, True),
        "glu_forward": lambda: metal.glu_forward(x, dy, 0),
        "glu_backward": lambda: metal.glu_backward(dy, x, dy, 0),
        "rope_apply": lambda: metal.rope_apply(q, k, cos, sin, False, False),
        # The rank-r dispatches of lora_forward, without its native GEMMs (not launch cost).
        "lora_lowrank": lambda: metal._lora_lowrank(xs, a, b.t().contiguous(), None, h, out, 512, 512, 16, 2.0, True),
        "attention_forward": lambda: metal.attention_forward(aq, ak, av, None, True, 0, 0.125, 0.0, False),
        "attention_backward": lambda: metal.attention_backward(
            a_dout, aq, ak, av, a_out, a_lse, None, True, 0, 0.125, 0.0
        ),
    }


def host_cost_rows(calls: int = 2000) -> list[dict]:
    """Per entry point: the median host microseconds per call, its dispatches, and the cost per dispatch."""
    rows = []
    with null_executor():
        for name, fn in _calls().items():
            before = _NullKernel.calls
            fn()
            dispatches = _NullKernel.calls - before
            us = _median_us(fn, calls)
            rows.append(
                {
                    "entry_point": name,
                    "dispatches": dispatches,
                    "median_us": round(us, 2),
                    "per_dispatch_us": round(us / dispatches, 2),
                }
            )
    return rows


def host_cost_table(rows: list[dict]) -> str:
    lines = [
        "Host cost per call, do-nothing executor (planning, argument binding, output allocation; plans cached as on a "
        "Mac; this CPU, not a Mac's):",
        "",
        "| entry point | dispatches | median µs per call | per dispatch |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['entry_point']} | {r['dispatches']} | {r['median_us']:.1f} | {r['per_dispatch_us']:.1f} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


# ---- dispatch overhead of the public ops against the native ones ----------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (the benchmarks' one helper: bench/run.py and bench/train.py use it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def _per_call_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Wall time per call over back-to-back calls at tiny shapes (the device's work is negligible: the host's cost
    of the call is what is left), median of 5 spans."""
    for _ in range(10):
        fn()
    synchronize(device)
    spans = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        spans.append((time.perf_counter() - t0) / calls)
    return statistics.median(spans) * 1e6


def _op_pairs(device: torch.device) -> dict[str, tuple[Callable, Callable, Callable[[], tuple]]]:
    """op -> (ours, native, make inputs): tiny shapes, float32, inputs requiring grad as in training."""
    import torch.nn.functional as F

    import torch_metal_fused as tmf
    from torch_metal_fused.bench.cases import _rotate_half

    g = torch.Generator().manual_seed(0)

    def r(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    def native_rope(q, k, cos, sin):  # Hugging Face's formula, as the benchmark's hf_eager provider
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    target = torch.randint(0, 64, (8,), generator=g).to(device)
    return {
        "softmax": (tmf.softmax, lambda x: torch.softmax(x, -1), lambda: (r(8, 64),)),
        "rms_norm": (tmf.rms_norm, lambda x, w: F.rms_norm(x, (64,), w, 1e-6), lambda: (r(8, 64), r(64))),
        "add_rms_norm": (
            lambda x, res, w: tmf.add_rms_norm(x, res, w)[0],
            lambda x, res, w: F.rms_norm(x + res, (64,), w, 1e-6),
            lambda: (r(8, 64), r(8, 64), r(64)),
        ),
        "cross_entropy": (
            lambda x: tmf.cross_entropy(x, target),
            lambda x: F.cross_entropy(x, target),
            lambda: (r(8, 64),),
        ),
        "glu": (lambda a, b: tmf.glu(a, b, "silu"), lambda a, b: F.silu(a) * b, lambda: (r(8, 64), r(8, 64))),
        "rope": (
            lambda q, k, c, s: tmf.rope(q, k, c, s)[0],
            lambda q, k, c, s: native_rope(q, k, c, s)[0],
            lambda: (r(1, 4, 8, 32), r(1, 2, 8, 32), r(1, 8, 32, grad=False), r(1, 8, 32, grad=False)),
        ),
        "lora_linear": (
            lambda x, w, a, b: tmf.lora_linear(x, w, a, b, 2.0),
            lambda x, w, a, b: F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0,
            lambda: (r(8, 64), r(64, 64, grad=False), r(8, 64), r(64, 8)),
        ),
        "attention": (
            lambda q, k, v: tmf.attention(q, k, v, causal=True),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda: (r(1, 4, 8, 32), r(1, 4, 8, 32), r(1, 4, 8, 32)),
        ),
    }


def op_overhead_rows(device: torch.device, calls: int = 200) -> list[dict]:
    """Per op, the wall time per call at tiny shapes of ours and of the native op(s) it replaces: forward (building
    the autograd graph, as in training) and forward + backward."""
    rows = []
    for op, (ours, native, make) in _op_pairs(device).items():
        row = {"op": op}
        for name, fn in (("ours", ours), ("native", native)):
            inputs = make()
            row[f"{name}_forward_us"] = round(_per_call_us(lambda: fn(*inputs), device, calls), 1)
            row[f"{name}_forward_backward_us"] = round(
                _per_call_us(lambda: fn(*inputs).sum().backward(), device, calls), 1
            )
        rows.append(row)
    return rows


def op_overhead_table(rows: list[dict], device: torch.device) -> str:
    lines = [
        f"Dispatch cost per call at tiny shapes on {device.type} (wall µs per call back to back; the device's work is "
        "negligible there), ours against the native ops:",
        "",
        "| op | ours forward | native forward | ours fwd+bwd | native fwd+bwd |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['op']} | {r['ours_forward_us']:.1f} | {r['native_forward_us']:.1f} | "
        f"{r['ours_forward_backward_us']:.1f} | {r['native_forward_backward_us']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"
