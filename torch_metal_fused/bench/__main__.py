"""Benchmark the fused ops: timed against native PyTorch on MPS or CUDA, else our Metal kernels' traffic on the harness.

    python -m torch_metal_fused.bench            # mps, else cuda: timed; else cpu: the emulated report
    python -m torch_metal_fused.bench --quick    # a subset that finishes in about a minute
    python -m torch_metal_fused.bench --timed    # cpu: time the plain-PyTorch reference instead
    python -m torch_metal_fused.bench --record   # also append the rows to benchmarks/results/ledger.csv
    python -m torch_metal_fused.bench --train    # whole training steps per provider (bench/train.py has its flags)
    python -m torch_metal_fused.bench --overhead # dispatch cost per call at tiny shapes, ours against native ops

Without an Apple or NVIDIA GPU the default is the emulated report: our Metal kernels run on the Metal-on-CPU harness,
which counts their device bytes, dispatches and threadgroup memory per op call, and projects a floor per Apple chip
(bytes ÷ the chip's copy bandwidth: a model, not a measurement). Where the harness is unavailable (no clang 19), the
CPU run times the plain-PyTorch reference, as --timed does.

Writes results.csv, results.json, summary.md and plots (PNG, with matplotlib) under --out. With --record, the rows also
go into the results ledger (torch_metal_fused/bench/ledger.py: its columns), and docs/results.md is regenerated from it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from torch_metal_fused.bench.cases import MODES, OPS, SUITES
from torch_metal_fused.bench.chips import CHIPS, DEFAULT_TABLE_CHIPS, by_name
from torch_metal_fused.bench.ledger import DEFAULT_LEDGER
from torch_metal_fused.bench.run import BenchConfig, harness_unavailable_reason, run_benchmarks

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Request:
    cfg: BenchConfig
    emulated_by_default: bool  # cpu without --emulated/--timed: emulated, or timed where the harness is missing
    suite_given: bool  # --suite or --quick


def _default_device() -> str:
    return "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"


def parse(argv: list[str] | None = None) -> Request:
    p = argparse.ArgumentParser(prog="python -m torch_metal_fused.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["mps", "cuda", "cpu"], help="default: mps, else cuda, else cpu")
    p.add_argument("--quick", action="store_true", help="a small subset of shapes (about a minute)")
    p.add_argument(
        "--suite",
        choices=SUITES,
        help="shape set (default: full on mps/cuda; emulated for the emulated report; quick with --quick or a timed "
        "cpu run)",
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated: {','.join(OPS)}")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--modes", default=",".join(MODES))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--emulated",
        action="store_true",
        help="cpu only (its default): the Metal kernels' device traffic, dispatches, threadgroup memory and "
        "per-chip floors from the Metal-on-CPU harness; an error if the harness is unavailable",
    )
    mode.add_argument(
        "--timed",
        action="store_true",
        help="time the ops (the default on mps/cuda); on cpu that times the plain-PyTorch reference against torch",
    )
    p.add_argument(
        "--chips",
        default=",".join(DEFAULT_TABLE_CHIPS),
        help="emulated: the Apple chips whose floors the table shows, or 'all' (results.csv has every chip: "
        f"{', '.join(c.name for c in CHIPS)})",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=0,
        help="timed repetitions per row, on MPS spans of back-to-back calls (default: by time budget)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench_results/<stamp>-<device>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--record",
        nargs="?",
        const=DEFAULT_LEDGER,
        type=Path,
        metavar="LEDGER",
        help="append the run's rows to the results ledger (default: this checkout's benchmarks/results/ledger.csv) "
        "and, for that ledger, regenerate docs/results.md",
    )
    a = p.parse_args(argv)
    if a.record == DEFAULT_LEDGER and not DEFAULT_LEDGER.exists():
        p.error(f"--record: no ledger at {DEFAULT_LEDGER} (an installed package has none): give its path")
    device = a.device or _default_device()
    if device == "mps" and not torch.backends.mps.is_available():
        p.error("--device mps: no MPS device on this machine")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine")
    if a.emulated and device != "cpu":
        p.error("--emulated runs the Metal kernels on the CPU harness: use it with --device cpu")
    ops = [o for o in a.ops.split(",") if o]
    for o in ops:
        if o not in OPS:
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
    try:
        chips = [c.name for c in CHIPS] if a.chips == "all" else [by_name(n).name for n in a.chips.split(",") if n]
    except KeyError as exc:
        p.error(f"--chips: {exc.args[0]}")
    emulated_by_default = device == "cpu" and not a.emulated and not a.timed
    emulated = a.emulated or emulated_by_default
    cfg = BenchConfig(torch.device(device), ops, dtypes, modes, "", emulated, a.reps, a.out, not a.no_plots, chips)
    cfg.record = a.record
    cfg.suite = a.suite or default_suite(cfg, a.quick)
    return Request(cfg, emulated_by_default, bool(a.suite or a.quick))


def default_suite(cfg: BenchConfig, quick: bool) -> str:
    # Emulation costs about a microsecond per element and pass on the CPU, so the emulated report has its own
    # small suite (one shape per launch variant). A timed CPU run times the reference path on CPU cores: the full
    # LLM-sized sweep would take hours there and say nothing about our kernels, so its default is the quick suite.
    if quick:
        return "quick"
    if cfg.emulated:
        return "emulated"
    return "quick" if cfg.device.type == "cpu" else "full"


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    return parse(argv).cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--train" in argv:  # whole training steps per provider: torch_metal_fused/bench/train.py
        from torch_metal_fused.bench import train

        return train.main([a for a in argv if a != "--train"])
    if "--overhead" in argv:  # dispatch cost per call at tiny shapes, ours against the native ops
        from torch_metal_fused.bench.host_cost import op_overhead_rows, op_overhead_table

        rest = [a for a in argv if a != "--overhead"]
        device = torch.device(rest[rest.index("--device") + 1] if "--device" in rest else _default_device())
        print(op_overhead_table(op_overhead_rows(device), device))
        return 0
    req = parse(argv)
    cfg = req.cfg
    notes = []
    if cfg.emulated:
        print("preparing the Metal-on-CPU harness (compiled on first use, then cached) ...", file=sys.stderr)
        reason = harness_unavailable_reason()
        if reason is not None and not req.emulated_by_default:
            print(f"--emulated: the Metal-on-CPU harness is unavailable here: {reason}", file=sys.stderr)
            return 2
        if reason is not None:
            line = (
                "the Metal-on-CPU harness is unavailable here, so this run times the plain-PyTorch reference on the "
                f"CPU instead of reporting our Metal kernels' traffic (as --timed does): {reason}"
            )
            print(line, file=sys.stderr)
            notes.append(line)
            cfg.emulated = False
            if not req.suite_given:
                cfg.suite = default_suite(cfg, False)
    run_benchmarks(cfg, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
