"""Liger-Kernel's row kernels (and torch's) timed as benchmarks/cuda_rowbench.cu times ours: CUDA events around each
launch after clearing a 512 MB buffer, median of 30. Kernel-level: softmax/RMSNorm forward and backward alone."""

import statistics
import sys

import torch
from liger_kernel.ops import rms_norm as lr
from liger_kernel.ops import softmax as ls

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
flush = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")


def time_us(fn):
    fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPS)]
    for a, b in ev:
        flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in ev)


for rows, cols in ((8192, 4096), (4096, 8192)):
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g)
        dy = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g)
        w = torch.rand(cols, device="cuda", dtype=dtype, generator=g) + 0.5
        name = f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {rows}x{cols}"
        y, bs, nw, multi = ls._softmax_forward(x)
        print(f"liger softmax fwd {name}: {time_us(lambda: ls._softmax_forward(x)):.1f} us")
        print(f"liger softmax bwd {name}: {time_us(lambda: ls._softmax_backward(dy, y, bs, nw, multi)):.1f} us")
        print(f"torch softmax fwd {name}: {time_us(lambda: torch.softmax(x, -1)):.1f} us")
        Y, X, RSTD, BS, NW, cm = lr.rms_norm_forward(x, w, 1e-6, 0.0, "llama", None)
        t = time_us(lambda: lr.rms_norm_forward(x, w, 1e-6, 0.0, "llama", None))
        print(f"liger rmsnorm fwd {name}: {t:.1f} us")
        dyc = dy.clone()
        t = time_us(lambda: lr.rms_norm_backward(dyc, X, w, RSTD, 0.0, cm, BS, NW, False, None))
        print(f"liger rmsnorm bwd (not in place) {name}: {t:.1f} us")
        t = time_us(lambda: lr.rms_norm_backward(dyc, X, w, RSTD, 0.0, cm, BS, NW, True, None))
        print(f"liger rmsnorm bwd (in place) {name}: {t:.1f} us")
