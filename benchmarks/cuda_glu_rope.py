"""SwiGLU and RoPE on CUDA: ours vs HF's eager formulas (torch) and Liger-Kernel's, forward and forward+backward,
bf16. Two numbers per row: "wall", the median µs per call over CUDA-event-timed repetitions of 10 back-to-back calls
(what a loop of calls takes, host overhead included where the host is slower than the GPU: the forward+backward rows
with autograd are host-bound for every provider), and "gpu", the kernels' own time per call from the profiler (the
device time the op takes in a training step whose host runs ahead). Percentages: of the bandwidth floor (minimal
bytes at 4.1 TB/s, the copy bandwidth measured on the H200). One device run: `python3 benchmarks/cuda_glu_rope.py`
(the kernel variants alone: benchmarks/cuda_glu_rope_bench.cu)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_metal_fused as tmf


def median_us(fn, reps: int = 30, calls: int = 10) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def gpu_us(fn, calls: int = 20) -> float:
    """The CUDA kernels' total time per call (profiler device time), without the host's gaps between them."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls


def timings(fn, backward) -> tuple[float, float, float, float]:
    return median_us(fn), gpu_us(fn), median_us(backward), gpu_us(backward)


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)


def hf_rope(q, k, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def report(what: str, provider: str, t: tuple[float, float, float, float], floor_f: float, floor_b: float) -> None:
    fwd, fwd_gpu, fb, fb_gpu = t
    print(
        f"{what} {provider:6s} fwd wall {fwd:7.1f} gpu {fwd_gpu:7.1f} ({floor_f / fwd_gpu:4.0%})   "
        f"fwd+bwd wall {fb:7.1f} gpu {fb_gpu:7.1f} ({floor_b / fb_gpu:4.0%})"
    )


def main(ops: tuple[str, ...] = ("swiglu", "rope")) -> None:
    dev, dt = "cuda", torch.bfloat16
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        LigerSiLUMulFunction = LigerRopeFunction = None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, us per call")
    for tokens, inter in ((8192, 11008), (16384, 14336)) if "swiglu" in ops else ():
        g = torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True)
        u = torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(tokens, inter, device=dev, dtype=dt)
        floor_f = 3 * g.numel() * 2 / 4.1e12 * 1e6
        floor_b = floor_f + 5 * g.numel() * 2 / 4.1e12 * 1e6
        fns = {"ours": tmf.swiglu, "torch": lambda a, b: F.silu(a) * b}
        if LigerSiLUMulFunction is not None:
            fns["liger"] = LigerSiLUMulFunction.apply
        for name, fn in fns.items():
            t = timings(lambda: fn(g, u), lambda: torch.autograd.grad(fn(g, u), (g, u), dy))
            report(f"swiglu {tokens}x{inter}", name, t, floor_f, floor_b)
    for batch, seq in ((4, 4096), (8, 2048)) if "rope" in ops else ():
        heads, kv, d = 32, 8, 128
        q = torch.randn(batch, seq, heads, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_(True)
        k = torch.randn(batch, seq, kv, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_(True)
        ang = torch.rand(1, seq, d // 2, device=dev) * 100
        emb = torch.cat((ang, ang), -1)
        cos, sin = emb.cos().to(dt), emb.sin().to(dt)
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        nbytes = (q.numel() + k.numel()) * 2
        floor_f = 2 * nbytes / 4.1e12 * 1e6
        fns = {"ours": lambda a, b: tmf.rope(a, b, cos, sin), "torch": lambda a, b: hf_rope(a, b, cos, sin)}
        if LigerRopeFunction is not None:
            fns["liger"] = lambda a, b: LigerRopeFunction.apply(a, b, cos, sin)
        for name, fn in fns.items():
            t = timings(lambda: fn(q, k), lambda: torch.autograd.grad(fn(q, k), (q, k), (gq, gk)))
            report(f"rope {batch}x{seq}x32/8x128", name, t, floor_f, 2 * floor_f)


if __name__ == "__main__":
    import sys

    main(tuple(sys.argv[1].split(",")) if len(sys.argv) > 1 else ("swiglu", "rope"))
