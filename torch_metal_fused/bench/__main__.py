"""Benchmark every fused op against the native PyTorch ops on this machine's accelerator.

    python -m torch_metal_fused.bench            # mps, else cuda, else cpu (reference path)
    python -m torch_metal_fused.bench --quick    # a subset that finishes in about a minute
    python -m torch_metal_fused.bench --device cpu --emulated   # Metal kernels' device traffic via the harness

Writes results.csv, results.json, summary.md and plots (PNG, with matplotlib) under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from torch_metal_fused.bench.cases import MODES
from torch_metal_fused.bench.run import BenchConfig, run_benchmarks

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m torch_metal_fused.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["mps", "cuda", "cpu"], help="default: mps, else cuda, else cpu")
    p.add_argument("--quick", action="store_true", help="a small subset of shapes (about a minute)")
    p.add_argument("--suite", choices=["full", "quick", "cuda"], help="shape set (default: full, or quick)")
    p.add_argument("--ops", default="softmax,rms_norm,lora", help="comma-separated: softmax,rms_norm,lora")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument(
        "--emulated",
        action="store_true",
        help="cpu only: report the Metal kernels' device traffic and dispatches from the harness",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=0,
        help="timed repetitions per row, on MPS spans of back-to-back calls (default: by time budget)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench_results/<stamp>-<device>)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    device = a.device or (
        "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device == "mps" and not torch.backends.mps.is_available():
        p.error("--device mps: no MPS device on this machine")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine")
    if a.emulated and device != "cpu":
        p.error("--emulated runs the Metal kernels on the CPU harness: use it with --device cpu")
    ops = [o for o in a.ops.split(",") if o]
    for o in ops:
        if o not in ("softmax", "rms_norm", "lora"):
            p.error(f"--ops: unknown op {o!r}")
    dtypes = []
    for d in a.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}")
        dtypes.append(DTYPES[d])
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    # Without an accelerator the rows time the reference path on CPU cores: the full LLM-sized sweep would
    # take hours there and say nothing about our kernels, so the CPU default is the quick suite.
    suite = a.suite or ("quick" if a.quick or device == "cpu" else "full")
    return BenchConfig(torch.device(device), ops, dtypes, modes, suite, a.emulated, a.reps, a.out, not a.no_plots)


def main(argv: list[str] | None = None) -> int:
    run_benchmarks(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
