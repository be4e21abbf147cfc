"""SwiGLU and RoPE on CUDA: ours vs HF's eager formulas (torch) and Liger-Kernel's, forward and forward+backward,
median µs per call over CUDA-event-timed repetitions of 10 back-to-back calls, so the host's per-call Python
overhead (which a single call's events include while the GPU waits) overlaps the kernels as in a training step.
One device run: `python3 benchmarks/cuda_glu_rope.py` (the kernels alone: benchmarks/cuda_glu_rope_bench.cu)."""

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


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)


def hf_rope(q, k, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        LigerSiLUMulFunction = LigerRopeFunction = None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, median us")
    for tokens, inter in ((8192, 11008), (16384, 14336)):
        g = torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True)
        u = torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(tokens, inter, device=dev, dtype=dt)
        floor_f = 3 * g.numel() * 2 / 4.1e12 * 1e6
        floor_b = floor_f + 5 * g.numel() * 2 / 4.1e12 * 1e6
        fns = {"ours": tmf.swiglu, "torch": lambda a, b: F.silu(a) * b}
        if LigerSiLUMulFunction is not None:
            fns["liger"] = LigerSiLUMulFunction.apply
        for name, fn in fns.items():
            fwd = median_us(lambda: fn(g, u))
            fb = median_us(lambda: torch.autograd.grad(fn(g, u), (g, u), dy))
            print(
                f"swiglu {tokens}x{inter} {name:6s} fwd {fwd:8.1f} ({floor_f / fwd:4.0%})  fwd+bwd {fb:8.1f} "
                f"({floor_b / fb:4.0%})"
            )
    for batch, seq in ((4, 4096), (8, 2048)):
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
            fwd = median_us(lambda: fn(q, k))
            fb = median_us(lambda: torch.autograd.grad(fn(q, k), (q, k), (gq, gk)))
            print(
                f"rope {batch}x{seq}x32/8x128 {name:6s} fwd {fwd:8.1f} ({floor_f / fwd:4.0%})  fwd+bwd {fb:8.1f} "
                f"({2 * floor_f / fb:4.0%})"
            )


if __name__ == "__main__":
    main()
