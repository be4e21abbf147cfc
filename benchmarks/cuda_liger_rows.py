"""Liger-Kernel's row kernels (and torch's) timed as benchmarks/cuda_rowbench.cu times ours: CUDA events around each
launch after clearing a 512 MB buffer, median of 30. Kernel-level: softmax/RMSNorm forward and backward alone, and
the fused residual add + RMSNorm (liger_kernel.ops.fused_add_rms_norm) forward and backward."""

import statistics
import sys

import torch
from liger_kernel.ops import fused_add_rms_norm as lfa
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


def report(what, name, fn):
    try:
        print(f"{what} {name}: {time_us(fn):.1f} us", flush=True)
    except Exception as e:
        print(f"{what} {name}: failed ({type(e).__name__}: {str(e)[:120]})", flush=True)


# (rows, cols, what): the rows of the main comparison (8192x4096, 4096x8192: softmax/RMSNorm, and the fused
# add + RMSNorm), narrow rows (65536x256, 512x512) and vocabulary-wide softmax rows (2048x32768).
JOBS = [(8192, 4096, "softmax rmsnorm add"), (4096, 8192, "softmax rmsnorm add")]
JOBS += [(65536, 256, "softmax rmsnorm"), (512, 512, "softmax rmsnorm"), (2048, 32768, "softmax")]
if len(sys.argv) > 2:  # a subset: "narrow,wide,add"
    keep = sys.argv[2].split(",")
    JOBS = [
        (
            r,
            c,
            " ".join(
                w
                for w in what.split()
                if ("add" in keep and w == "add")
                or ("narrow" in keep and c <= 512)
                or ("wide" in keep and c > 8192)
                or ("main" in keep and 4096 <= c <= 8192 and w != "add")
            ),
        )
        for r, c, what in JOBS
    ]

for rows, cols, what in JOBS:
    for dtype in (torch.bfloat16, torch.float32):
        if not what:
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g)
        dy = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g)
        w = torch.rand(cols, device="cuda", dtype=dtype, generator=g) + 0.5
        name = f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {rows}x{cols}"
        if "softmax" in what:
            y, bs, nw, multi = ls._softmax_forward(x)
            report("liger softmax fwd", name, lambda: ls._softmax_forward(x))
            report("liger softmax bwd", name, lambda: ls._softmax_backward(dy, y, bs, nw, multi))
            report("torch softmax fwd", name, lambda: torch.softmax(x, -1))
        if "rmsnorm" in what:
            Y, X, RSTD, BS, NW, cm = lr.rms_norm_forward(x, w, 1e-6, 0.0, "llama", None)
            report("liger rmsnorm fwd", name, lambda: lr.rms_norm_forward(x, w, 1e-6, 0.0, "llama", None))
            report("torch rmsnorm fwd", name, lambda: torch.nn.functional.rms_norm(x, (cols,), w, 1e-6))
        if "add" in what:
            r = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g)
            dh = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g)
            _, S, RSTD2, BS2, NW2, ST2, cm2 = lfa.fused_add_rms_norm_forward(x, r, w, 1e-6, 0.0, "llama")
            report("liger add_rms_norm fwd", name, lambda: lfa.fused_add_rms_norm_forward(x, r, w, 1e-6, 0.0, "llama"))
            report(
                "liger add_rms_norm bwd (dx, dw)",
                name,
                lambda: lfa.fused_add_rms_norm_backward(dy, dh, S, w, RSTD2, 0.0, cm2, BS2, NW2, ST2, False),
            )
            report("torch add + rms_norm fwd", name, lambda: torch.nn.functional.rms_norm(x + r, (cols,), w, 1e-6))
