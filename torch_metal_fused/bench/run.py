"""Timing, device traffic, and the report files of the benchmark command."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import torch_metal_fused as tmf
from torch_metal_fused import _config
from torch_metal_fused.bench.cases import (
    LLM_ATTENTION,
    MODES,
    Case,
    attention_min_bytes_flops,
    attention_model,
    attention_saved_bytes,
    ce_rows_min_bytes,
    lora_lowrank_min_bytes,
    min_bytes,
    prepare,
    providers,
    shapes,
    training_step,
)
from torch_metal_fused.bench.chips import CHIPS, DEFAULT_TABLE_CHIPS, Chip, by_name
from torch_metal_fused.bench.host_cost import host_cost_rows, host_cost_table, synchronize

_KEY_COLUMNS = ["op", "provider", "backend", "mode", "dtype", "shape"]
_META_COLUMNS = ["device", "device_name", "torch_version", "project_version", "timestamp"]
CSV_COLUMNS = [
    *_KEY_COLUMNS,
    *["median_us", "p20_us", "p80_us", "first_call_us", "reps", "min_bytes", "gbps", "pct_copy_bw", "tflops"],
    *["fused_speedup", "peak_memory_mb"],
    *_META_COLUMNS,
]
FLOOR_COLUMNS = [f"floor_us_{c.key}" for c in CHIPS]  # bytes moved ÷ the chip's copy bandwidth (a model)
# attention: FLOPs ÷ the chip's peak matrix rate (a model; empty for chips without a citable clock and other ops)
COMPUTE_FLOOR_COLUMNS = [f"compute_floor_us_{c.key}" for c in CHIPS]
# attention only: the FLOPs (convention of cases.attention_min_bytes_flops), how often the kernels read K and V and q
# (counted ÷ one read), the launch plan's model of their bytes and products, and the bytes the forward keeps for
# backward, ours against the composite path's probabilities (cases.attention_saved_bytes)
ATTENTION_COLUMNS = [
    *["flops", "kv_reads", "q_reads", "model_device_bytes", "model_matrix_flops"],
    *["saved_for_backward_bytes", "composite_saved_bytes"],
]
EMULATED_COLUMNS = [
    *_KEY_COLUMNS,
    *["kernels", "dispatches", "threadgroup_bytes", "max_threadgroup_bytes"],
    *["device_bytes_read", "device_bytes_written", "bytes_moved", "min_bytes", "traffic_over_min"],
    *FLOOR_COLUMNS,
    *ATTENTION_COLUMNS,
    *COMPUTE_FLOOR_COLUMNS,
    *_META_COLUMNS,
]
PROJECTION_COLUMNS = [
    *["op", "mode", "dtype", "shape", "min_bytes", "model_device_bytes", "traffic_over_min", "kv_reads", "q_reads"],
    *["flops", "model_matrix_flops", "saved_for_backward_bytes", "composite_saved_bytes"],
    *[f"min_floor_us_{c.key}" for c in CHIPS],
    *FLOOR_COLUMNS,
    *COMPUTE_FLOOR_COLUMNS,
]
PLOT_HINT = "pip install matplotlib, or the package's extra: pip install -e '.[plot]'"


@dataclass
class BenchConfig:
    device: torch.device
    ops: list[str]
    dtypes: list[torch.dtype]
    modes: list[str]
    suite: str
    emulated: bool = False
    reps: int = 0
    out: Path | None = None
    plots: bool = True
    chips: list[str] = field(default_factory=lambda: list(DEFAULT_TABLE_CHIPS))  # floors in the terminal table
    record: Path | None = None  # the results ledger to append this run's rows to (--record)


@dataclass
class Environment:
    device: str
    device_name: str
    torch_version: str
    project_version: str
    timestamp: str
    copy_gbps: float | None = None
    notes: list[str] = field(default_factory=list)


# ---- timing -------------------------------------------------------------------------------------------
def _time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call from idle, synchronised: the latency a first call sees."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


_FLUSH: dict[str, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    # 1 GiB: clearing it (2 GiB of traffic at the device's copy bandwidth) takes longer than the host needs to queue a
    # forward+backward through autograd, so the events time device work rather than Python and launch overhead.
    if device.type not in _FLUSH:
        _FLUSH[device.type] = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    return _FLUSH[device.type]


# MPS: a batch long enough that the two synchronize() latencies around it (tens of µs each) are noise.
MIN_SPAN_MS = 20.0
# MPS: batches per row when --reps is not given; each spans >= MIN_SPAN_MS, so a row takes ~0.3 s or more.
MPS_SAMPLES = 15
_MAX_BATCH = 1 << 16  # a bound on N, should a call take no measurable time


def _time_back_to_back_ms(
    fn: Callable[[], object],
    sync: Callable[[], None],
    min_span_ms: float = MIN_SPAN_MS,
    samples: int = MPS_SAMPLES,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Per-call ms of `samples` batches. A batch is N back-to-back calls between two `sync()` calls, timed by the
    host clock; its sample is span / N. N comes from a probe: start at 1 and grow N by the shortfall until one
    batch spans at least `min_span_ms`, so that the sync and commit latency at the batch's ends is a small part
    of the span."""

    def batch(n: int) -> float:
        sync()
        t0 = clock()
        for _ in range(n):
            fn()
        sync()
        return (clock() - t0) * 1e3

    n = 1
    span = batch(n)
    while span < min_span_ms and n < _MAX_BATCH:
        # 10% headroom: a probe batch's fixed costs make a call look slower than it is, so scaling by the
        # shortfall alone may fall short again.
        grow = min_span_ms / span * 1.1 if span > 0 else 10.0
        n = min(_MAX_BATCH, max(n + 1, math.ceil(n * grow)))
        span = batch(n)
    return [batch(n) / n for _ in range(samples)]


def _time_calls_ms(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    """`reps` per-call times (ms), by the device's method (`timing_method` says it in words).

    CUDA (as triton's do_bench): each call is bracketed by device events, nothing synchronises between calls,
    and a 1 GiB buffer is cleared before each call: the caches start cold and the host queues the call while
    the GPU clears, so the events time the call's device work (gaps between its own kernels included).

    MPS: `reps` batches of back-to-back calls (`_time_back_to_back_ms`). Events don't time kernels there:
    `torch.mps.Event.record()` ends PyTorch's kernel coalescing and commits the command buffer, and
    `elapsed_time` is the difference of CPU-side completion-notification times, so for 5-50 µs kernels it
    mostly measures commit and notification latency. No cache flush on MPS: a flush inside a batch would be
    timed with the calls (span / N would include it), and a flush per call needs a sync per call, which is
    what back-to-back timing avoids. The cases already rotate over up to 8 input sets (cases._n_sets, up to
    256 MB in all), which keeps large shapes out of the caches; small shapes, whose sets together fit in the
    system-level cache, are timed warm. If the host issues a call slower than the GPU runs it (Python and
    autograd overhead on tiny shapes), span / N is the host's issue rate: an upper bound on the device time.
    Nothing here allocates on the MPS device.

    CPU: the host clock around each call."""
    if device.type == "mps":
        return _time_back_to_back_ms(fn, torch.mps.synchronize, MIN_SPAN_MS, reps)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        flush = _flush_buffer(device)
        synchronize(device)
        for start, end in events:
            flush.zero_()  # evict the caches and give the host time to queue the call
            start.record()
            fn()
            end.record()
        synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def timing_method(device: torch.device, reps: int = 0) -> str:
    """How `time_fn` times on `device`, in words, for the report header."""
    if device.type == "mps":
        samples = reps if reps > 0 else MPS_SAMPLES
        return (
            "N back-to-back calls between two torch.mps.synchronize(), per-call = span/N; first call separate "
            f"(host clock; N from a probe so that a span is >= {MIN_SPAN_MS:g} ms; median and p20/p80 over "
            f"{samples} spans; no cache flush, inputs rotate over up to 8 sets)"
        )
    if device.type == "cuda":
        return (
            "CUDA events around each call, a 1 GiB buffer cleared before each call (cold caches), no sync between "
            "calls; median and p20/p80 over the calls; first call separate"
        )
    return "host clock around each call; median and p20/p80 over the calls; first call separate"


def time_fn(
    fn: Callable[[], object], device: torch.device, reps: int = 0, budget_s: float = 0.5
) -> tuple[float, list[float]]:
    """(first-call ms, per-repetition ms). The first call (shader/pipeline compilation, allocator warm-up)
    is reported on its own and excluded; then a warm-up, then timed repetitions (on MPS: batches, each
    giving one per-call time)."""
    first = _time_once_ms(fn, device)
    for _ in range(3):
        fn()
    if reps <= 0:
        if device.type == "mps":
            reps = MPS_SAMPLES  # each sample already spans >= MIN_SPAN_MS: no per-call probe needed
        else:
            probe = max(statistics.median(_time_calls_ms(fn, device, 5)), 1e-3)
            reps = int(min(500, max(10, budget_s * 1e3 / probe)))
    return first, _time_calls_ms(fn, device, reps)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    n = (256 << 20) if device.type != "cpu" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    _, times = time_fn(lambda: dst.copy_(src), device, reps=20)
    return 2 * n / (statistics.median(times) * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU ({platform.machine()}, macOS {platform.mac_ver()[0]})"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _peak_memory_mb(device: torch.device, fn) -> float | None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type == "mps":  # no peak API on MPS: sample the allocation after the call
        synchronize(device)
        base = torch.mps.current_allocated_memory()
        out = fn()
        synchronize(device)
        used = (torch.mps.current_allocated_memory() - base) / 2**20
        del out
        return used
    return None


# ---- progress ---------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.time()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {time.time() - self.t0:5.0f}s {label}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                sys.stderr.write("\n")
        elif self.done == self.total or self.done % 10 == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# ---- runs ---------------------------------------------------------------------------------------------
def _cases(cfg: BenchConfig) -> list[Case]:
    return [
        Case(op, shape, dtype, mode)
        for op in cfg.ops
        for shape in shapes(op, cfg.suite)
        for dtype in cfg.dtypes
        for mode in cfg.modes
    ]


def _timed_rows(cfg: BenchConfig, env: Environment) -> list[dict]:
    rows: list[dict] = []
    jobs = [
        (c, p)
        for c in _cases(cfg)
        for p in providers(c.op, cfg.device)
        if not (c.op == "lora" and p == "matmul" and c.mode != "forward")
    ]
    progress = Progress(len(jobs))
    for case, provider in jobs:
        row = _row_base(case, provider, env, cfg.device)
        try:
            prep = prepare(case, provider, cfg.device)
            first, times = time_fn(prep.run, cfg.device, cfg.reps)
            med = statistics.median(times)
            row.update(
                median_us=med * 1e3,
                p20_us=percentile(times, 0.2) * 1e3,
                p80_us=percentile(times, 0.8) * 1e3,
                first_call_us=first * 1e3,
                reps=len(times),
                min_bytes=prep.min_bytes,
                gbps=prep.min_bytes / (med * 1e-3) / 1e9,
                tflops=(prep.flops / (med * 1e-3) / 1e12) if prep.flops else None,
                peak_memory_mb=_peak_memory_mb(cfg.device, prep.run),
            )
            if env.copy_gbps:
                row["pct_copy_bw"] = 100 * row["gbps"] / env.copy_gbps
            del prep
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        progress.step(f"{case.op} {case.shape_str} {str(case.dtype)[6:]} {case.mode} {provider}")
    # speedup of the fused op over each row's provider (naming the baseline: the row's provider)
    fused = {(r["op"], r["mode"], r["dtype"], r["shape"]): r.get("median_us") for r in rows if r["provider"] == "fused"}
    for r in rows:
        f = fused.get((r["op"], r["mode"], r["dtype"], r["shape"]))
        if f and r.get("median_us"):
            r["fused_speedup"] = r["median_us"] / f
    return rows


def _row_base(case: Case, provider: str, env: Environment, device: torch.device) -> dict:
    probe = torch.empty(0, device=device, dtype=case.dtype)
    backend = tmf.backend_for(probe) if provider == "fused" else "native"
    return {
        "op": case.op,
        "provider": provider,
        "backend": backend,
        "mode": case.mode,
        "dtype": str(case.dtype).removeprefix("torch."),
        "shape": case.shape_str,
        "device": env.device,
        "device_name": env.device_name,
        "torch_version": env.torch_version,
        "project_version": env.project_version,
        "timestamp": env.timestamp,
    }


def _emulated_rows(cfg: BenchConfig, env: Environment) -> list[dict]:
    """Device traffic, dispatches and threadgroup memory per op call of the Metal kernels, from the Metal-on-CPU
    harness, and the floor each chip's copy bandwidth puts under that traffic (a model). Per (op, shape, dtype):
    one forward and one backward, each recorded on its own; the forward_backward row is the two together."""
    from torch_metal_fused.emulator import runner

    rows: list[dict] = []
    groups = [(op, shape, dtype) for op in cfg.ops for shape in shapes(op, cfg.suite) for dtype in cfg.dtypes]
    modes = [m for m in MODES if m in cfg.modes]
    progress = Progress(len(groups))
    with _config.overriding({_config.BACKEND.name: "metal-emulated"}):
        for op, shape, dtype in groups:
            cases = [Case(op, shape, dtype, m) for m in modes]
            try:
                step = training_step(op, shape, dtype, cfg.device)
                with runner.record() as forward:
                    y = step.forward()
                backward: list = []
                if modes != ["forward"]:
                    with runner.record() as backward:
                        step.backward(y)
                del y, step
                per_mode = {"forward": forward, "backward": backward, "forward_backward": forward + backward}
                rows += [_emulated_row(case, per_mode[case.mode], env, cfg.device) for case in cases]
            except Exception as exc:
                for case in cases:
                    row = _row_base(case, "fused", env, cfg.device)
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    rows.append(row)
            progress.step(f"{op} {'x'.join(map(str, shape))} {str(dtype)[6:]}")
    return rows


def _emulated_row(case: Case, dispatches: list, env: Environment, device: torch.device) -> dict:
    row = _row_base(case, "fused", env, device)
    read = sum(d.bytes_read for d in dispatches)
    written = sum(d.bytes_written for d in dispatches)
    minimum = {"lora": lora_lowrank_min_bytes, "cross_entropy": ce_rows_min_bytes}.get(case.op, min_bytes)(case)
    row.update(
        kernels=" + ".join(d.kernel for d in dispatches),
        dispatches=len(dispatches),
        # per dispatch, in order: the bytes of threadgroup memory each of its threadgroups uses
        threadgroup_bytes=" + ".join(str(d.threadgroup_memory) for d in dispatches),
        max_threadgroup_bytes=max((d.threadgroup_memory for d in dispatches), default=None),
        device_bytes_read=read,
        device_bytes_written=written,
        bytes_moved=read + written,
        min_bytes=minimum,
        traffic_over_min=(read + written) / minimum if minimum and dispatches else None,
    )
    if dispatches:
        row.update({f"floor_us_{c.key}": c.floor_us(read + written) for c in CHIPS})
    if case.op == "attention" and dispatches:
        row.update(_attention_counts(case, dispatches))
    if case.op == "lora":
        row["note"] = "LoRA: the low-rank kernels against their own minimum; the native GEMMs are not counted"
    if case.op == "cross_entropy":
        row["note"] = (
            "cross_entropy: the row-pass kernel against its own minimum (logits read once, gradient written once); "
            "the native GEMMs are not counted"
        )
    if not dispatches:
        row["note"] = "no Metal dispatch: served by the native matmul or the plain-PyTorch reference"
        if case.op == "cross_entropy" and case.mode == "backward":
            row["note"] = "no Metal dispatch: the forward computed the gradients, backward only scales them"
    return row


# The buffer indices of q, k and v in the attention kernels that take them (shaders/attention.metal: the forward, dQ
# and dK/dV kernels); the delta pass reads out and dout only.
_ATTENTION_Q, _ATTENTION_K, _ATTENTION_V = 0, 1, 2


def _attention_model_columns(case: Case) -> dict:
    """The columns the FLOPs convention and the launch plan's model give (no kernel run needed)."""
    model = attention_model(case.shape, case.dtype, case.mode)
    flops = attention_min_bytes_flops(case)[1]
    ours, composite = attention_saved_bytes(case.shape, case.dtype)
    return {
        "flops": flops,
        "model_device_bytes": model["device_bytes"],
        "model_matrix_flops": model["matrix_flops"],
        "saved_for_backward_bytes": ours,
        "composite_saved_bytes": composite,
        **{f"compute_floor_us_{c.key}": c.compute_floor_us(flops) for c in CHIPS},
    }


def _attention_counts(case: Case, dispatches: list) -> dict:
    """Attention rows: how often the kernels read K and V, and q, counted by the harness per buffer (bytes read ÷ the
    tensor's bytes), beside the model's columns and the compute floors."""
    batch, seq, heads, kv, d = case.shape
    es = torch.finfo(case.dtype).bits // 8
    q_bytes, kv_bytes = batch * heads * seq * d * es, 2 * batch * kv * seq * d * es
    staged = [x for x in dispatches if not x.kernel.startswith("attention_backward_delta")]

    def read(x, buffer: int) -> int:
        return x.traffic.get(buffer, (0, 0))[0]

    kv_read = sum(read(x, _ATTENTION_K) + read(x, _ATTENTION_V) for x in staged)
    return {
        **_attention_model_columns(case),
        "kv_reads": kv_read / kv_bytes,
        "q_reads": sum(read(x, _ATTENTION_Q) for x in staged) / q_bytes,
    }


def attention_projection_rows(cfg: BenchConfig) -> list[dict]:
    """The launch plan's model at the LLM shapes (cases.LLM_ATTENTION), which the harness is too slow to run: per
    mode, the kernels' device bytes and products, and per chip the floors of the minimum bytes, of the modelled bytes
    and of the FLOPs. One dtype: bfloat16 where asked for (else the first asked for)."""
    dtype = torch.bfloat16 if torch.bfloat16 in cfg.dtypes else cfg.dtypes[0]
    rows = []
    for shape in LLM_ATTENTION:
        for mode in [m for m in MODES if m in cfg.modes]:
            case = Case("attention", shape, dtype, mode)
            model = attention_model(shape, dtype, mode)
            minimum = attention_min_bytes_flops(case)[0]
            row = {
                "op": "attention",
                "mode": mode,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": case.shape_str,
                "min_bytes": minimum,
                "traffic_over_min": model["device_bytes"] / minimum,
                "kv_reads": model["kv_reads"],
                "q_reads": model["q_reads"],
                **_attention_model_columns(case),
            }
            row.update({f"min_floor_us_{c.key}": c.floor_us(minimum) for c in CHIPS})
            row.update({f"floor_us_{c.key}": c.floor_us(model["device_bytes"]) for c in CHIPS})
            rows.append(row)
    return rows


def harness_unavailable_reason() -> str | None:
    """Why the Metal-on-CPU harness cannot run here (no clang 19 or boost.context, or a platform without the
    pieces it needs), or None once it is built (the first call compiles it, then it is cached)."""
    try:
        from torch_metal_fused.emulator import runner
        from torch_metal_fused.emulator.build import HarnessUnavailable
    except ImportError as exc:  # e.g. no fcntl (Windows)
        return f"{type(exc).__name__}: {exc}"
    try:
        runner.kernel_names()  # builds the libraries on first use, and loads one
    except (HarnessUnavailable, OSError) as exc:
        return str(exc)
    return None


# ---- reports -------------------------------------------------------------------------------------------
def _fmt(v, digits=1) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _first_line(text: str | None) -> str:
    """A message fit for a table cell: its first line, without the table's separator."""
    return (text or "").strip().split("\n")[0].replace("|", "/") or "–"


def _short_kernel(name: str, dtype: str) -> str:
    """A kernel's host name without its element-type suffix (the table has a dtype column)."""
    suffix = {"float32": "_float", "float16": "_half", "bfloat16": "_bfloat"}.get(dtype, "")
    return name.removesuffix(suffix)


def _table(rows: list[dict], emulated: bool, chips: list[Chip] | None = None) -> str:
    if emulated:
        chips = chips if chips is not None else [by_name(n) for n in DEFAULT_TABLE_CHIPS]
        head = [
            *["op", "mode", "dtype", "shape", "dispatches", "MB moved", "minimum MB", "x minimum", "threadgroup B"],
            *[f"{c.name} floor µs (model)" for c in chips],
            "kernels",
        ]
        body = [
            [
                r["op"],
                r["mode"],
                r["dtype"],
                r["shape"],
                _fmt(r.get("dispatches")),
                _fmt(r["bytes_moved"] / 1e6, 2) if "bytes_moved" in r else "–",
                _fmt(r["min_bytes"] / 1e6, 2) if "min_bytes" in r else "–",
                _fmt(r.get("traffic_over_min"), 2),
                (r.get("threadgroup_bytes") or "–").replace(" + ", ", "),
                *[_fmt(r.get(f"floor_us_{c.key}"), 1) for c in chips],
                " + ".join(_short_kernel(k, r["dtype"]) for k in r["kernels"].split(" + "))
                if r.get("kernels")
                else _first_line(r.get("error") or r.get("note")),
            ]
            for r in rows
        ]
    else:
        head = [
            "op",
            "mode",
            "dtype",
            "shape",
            "provider",
            "backend",
            "median µs",
            "p20-p80 µs",
            "first µs",
            "GB/s",
            "% copy bw",
            "fused speedup",
        ]
        peak = any(r.get("peak_memory_mb") is not None for r in rows)  # measured on CUDA and MPS only
        if peak:
            head.insert(-1, "peak MB")
        body = [
            [
                r["op"],
                r["mode"],
                r["dtype"],
                r["shape"],
                r["provider"],
                r["backend"],
                _fmt(r.get("median_us")),
                f"{_fmt(r.get('p20_us'))}-{_fmt(r.get('p80_us'))}",
                _fmt(r.get("first_call_us"), 0),
                _fmt(r.get("gbps")),
                _fmt(r.get("pct_copy_bw")),
                *([_fmt(r.get("peak_memory_mb"), 0)] if peak else []),
                (_fmt(r.get("fused_speedup"), 2) + "x") if r.get("fused_speedup") else _first_line(r.get("error")),
            ]
            for r in rows
        ]
    return _grid(head, body)


def _grid(head: list[str], body: list[list]) -> str:
    """A markdown table, columns padded to their widest cell."""
    widths = [max(len(str(h)), *(len(str(b[i])) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [
        "| " + " | ".join(str(h).ljust(w) for h, w in zip(head, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    return "\n".join(lines)


ATTENTION_NOTES = [
    "K/V reads: the forward and the dQ kernel stage K and V in threadgroup memory once per threadgroup of query rows "
    "(8 per SIMD-group, up to ATTENTION_SIMD_GROUPS = 8 of them: 64 rows) and per query head, up to the group's last "
    "visible key, in blocks of kAttentionTileFloats / head_dim rows (32 at head_dim 64, 16 at 128); the dK/dV kernel "
    "reads its key rows once and q and dout once per threadgroup of 64 key rows. So a causal call reads K and V "
    "about (q_heads / kv_heads) x (seq / 64 + 1) / 2 times in the forward, and once more than that in the backward. "
    "`K/V reads` = the bytes of K and V the kernels read ÷ their size, counted per buffer by the harness (model: the "
    "launch plan's count, cases.attention_model, which the harness's counts match at these shapes: exactly in the "
    "forward, within ~1 % in the backward, whose dQ kernel loads each row's lse and delta once per lane).",
    "These are device-memory accesses, not DRAM traffic: a GPU serves most re-reads of K and V from its L2 and "
    "system-level cache (one kv head's K and V at 4096 tokens x 128 in bf16 are 2 MiB). The floor of the counted "
    "bytes is a pessimistic bandwidth bound, the floor of the minimum bytes (q, k, v read and out, lse written "
    "once; backward: q, k, v, out, dout, lse read, dq, dk, dv and delta written once) an optimistic one.",
    "compute floor (model) = FLOPs ÷ the chip's peak rate: GPU cores x clock x 256 FLOPs per core-cycle (FP32, which "
    "FP16 matches; simdgroup_matrix runs on these ALUs, and our kernels multiply float32 8x8 matrices in every "
    "dtype). FLOPs: forward 4·B·Hq·S·Sk·D, halved for causal; backward 2.5 x the forward (the FlashAttention "
    "convention). Our kernels issue more products (`model_matrix_flops` in the CSV): whole staged blocks, and the "
    "backward recomputes the probabilities and dP in both the dQ and the dK/dV kernel (7 block products against 5). "
    "Measured matmul kernels reach 80-93 % of this peak. M4-generation chips: no citable GPU clock, no compute floor "
    "(–). Neither floor is a measurement: a call takes at least the larger of the two, and small shapes far more.",
]


def _pair(a, b, digits: int = 1) -> str:
    return f"{_fmt(a, digits)} / {_fmt(b, digits)}"


def _attention_tables(rows: list[dict], projection: list[dict], chips: list[Chip]) -> str:
    """The attention section of the emulated summary: the emulated rows' reads and floors, the model at the LLM
    shapes, and the bytes the forward keeps for backward."""
    mib = 2**20
    floors = [h for c in chips for h in (f"{c.name} bandwidth floor µs (min / counted)", f"{c.name} compute floor µs")]
    head = ["mode", "dtype", "shape", "x minimum", "K/V reads (counted / model)", "q reads", *floors]
    emulated = [r for r in rows if r["op"] == "attention" and r.get("kv_reads") is not None]
    body = [
        [
            r["mode"],
            r["dtype"],
            r["shape"],
            _fmt(r.get("traffic_over_min"), 2),
            _pair(r["kv_reads"], attention_model(_shape(r), _dtype(r), r["mode"])["kv_reads"], 2),
            _fmt(r["q_reads"], 2),
            *[
                v
                for c in chips
                for v in (
                    _pair(c.floor_us(r["min_bytes"]), r.get(f"floor_us_{c.key}")),
                    _fmt(r.get(f"compute_floor_us_{c.key}")),
                )
            ],
        ]
        for r in emulated
    ]
    lines = ["## attention: K/V reads and floors per chip (models, not measurements)", ""]
    lines += [f"- {n}" for n in ATTENTION_NOTES]
    if body:
        lines += ["", "Emulated (the harness ran the kernels):", "", _grid(head, body)]
    if projection:
        head_p = ["mode", "dtype", "shape", "min MB", "x minimum (model)", "K/V reads (model)", "q reads", *floors]
        head_p = [h.replace("min / counted", "min / model") for h in head_p]
        body_p = [
            [
                r["mode"],
                r["dtype"],
                r["shape"],
                _fmt(r["min_bytes"] / 1e6, 1),
                _fmt(r["traffic_over_min"], 1),
                _fmt(r["kv_reads"], 1),
                _fmt(r["q_reads"], 1),
                *[
                    v
                    for c in chips
                    for v in (
                        _pair(r[f"min_floor_us_{c.key}"], r[f"floor_us_{c.key}"], 0),
                        _fmt(r[f"compute_floor_us_{c.key}"], 0),
                    )
                ],
            ]
            for r in projection
        ]
        lines += [
            "",
            "Projected at the LLM shapes (the launch plan's model, cases.attention_model; no kernel ran at these "
            "shapes; results.json `attention_projection`, attention_projection.csv):",
            "",
            _grid(head_p, body_p),
        ]
        kept = {}
        for r in projection:
            kept.setdefault(r["shape"], (r["dtype"], r["saved_for_backward_bytes"], r["composite_saved_bytes"]))
        lines += [
            "",
            "Bytes the forward keeps for backward besides q, k and v: ours = out + lse = B·Hq·S·(D·element size + 4); "
            "the composite path (SDPA on MPS under autograd, Hugging Face's eager attention) at least the "
            "probabilities, B·Hq·S·Sk·element size. At B=1, Hq=32, S=Sk=4096, D=128, bf16: "
            f"{_saved_mib((1, 4096, 32, 8, 128))}.",
            "",
            _grid(
                ["shape", "dtype", "ours MiB (out + lse)", "composite MiB (probabilities)", "ratio"],
                [
                    [shape, dtype, _fmt(ours / mib, 1), _fmt(comp / mib, 0), f"{comp / ours:.0f}x"]
                    for shape, (dtype, ours, comp) in kept.items()
                ],
            ),
        ]
    return "\n".join(lines) + "\n"


def _saved_mib(shape: tuple[int, ...]) -> str:
    batch, seq, heads, _, d = shape
    ours, composite = attention_saved_bytes(shape, torch.bfloat16)
    return (
        f"{batch}·{heads}·{seq}·({d}·2 + 4) B = {ours / 2**20:.1f} MiB against {batch}·{heads}·{seq}·{seq}·2 B = "
        f"{composite / 2**20:.0f} MiB ({composite / 2**30:.0f} GiB)"
    )


def _shape(row: dict) -> tuple[int, ...]:
    return tuple(int(v) for v in row["shape"].split("x"))


def _dtype(row: dict) -> torch.dtype:
    return getattr(torch, row["dtype"])


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*columns, "error", "note"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in [*columns, "error", "note"]})


def table_chips(cfg: BenchConfig) -> list[Chip]:
    return [by_name(n) for n in cfg.chips]


EMULATED_NOTES = [
    "emulated: the Metal kernels ran on the Metal-on-CPU harness (no Apple GPU here), through the same launch code "
    "as on MPS. Per op call: the device bytes the kernels read and wrote (MB moved) against the minimum (each input "
    "read once, each output written once: x minimum), the dispatches, and the threadgroup memory per threadgroup of "
    "each dispatch in order (threadgroup B). No timings: CPU time of an emulation says nothing about an Apple GPU.",
    "<chip> floor µs (model) = MB moved ÷ that chip's copy bandwidth: the time the kernels would take if they moved "
    "their bytes at the speed of a large device-to-device copy. A floor from a bandwidth model, NOT a measurement: "
    "real kernels take longer (dispatch and synchronisation latency, occupancy, caches), and small shapes are "
    "latency-bound, far above it. results.csv has the floor for every chip below (floor_us_<chip>).",
    "threadgroup B: what the harness allocated for each dispatch's last threadgroup: the kernel's own threadgroup "
    "arrays (allocated when a threadgroup reaches their declaration) plus setThreadgroupMemoryLength arguments (the "
    "LoRA kernels' tiles, sized by the launch plan). Apple GPUs allow 32 KiB per threadgroup, about 64 KiB per core; "
    "every kernel stays within 16 KiB per 256 threads (tests/test_emulator_kernels.py).",
]


def _summary(
    cfg: BenchConfig, env: Environment, rows: list[dict], fused_backend: str, projection: list[dict] | None = None
) -> str:
    lines = [
        "# torch_metal_fused benchmark",
        "",
        f"- device: {env.device} — {env.device_name}",
        f"- torch {env.torch_version}, torch_metal_fused {env.project_version}, {env.timestamp}",
        f"- fused backend on this device: {fused_backend}",
        f"- shapes: the {cfg.suite} suite",
    ]
    if not cfg.emulated:
        lines.append(f"- timing: {timing_method(cfg.device, cfg.reps)}")
    if env.copy_gbps:
        lines.append(f"- measured device copy bandwidth: {env.copy_gbps:.1f} GB/s (bytes read + written)")
    lines += [f"- {n}" for n in env.notes]
    if cfg.emulated:
        lines += [f"- {n}" for n in EMULATED_NOTES]
        lines.append("- copy bandwidth behind each floor (torch_metal_fused/bench/chips.py cites the sources):")
        lines += [f"  - {c.describe()}" for c in CHIPS]
    lines += ["", _table(rows, cfg.emulated, table_chips(cfg) if cfg.emulated else None), ""]
    if cfg.emulated and "attention" in cfg.ops:
        lines += ["- compute rate behind each compute floor (torch_metal_fused/bench/chips.py cites the sources):"]
        lines += [f"  - {c.describe_compute()}" for c in CHIPS]
        lines += ["", _attention_tables(rows, projection or [], table_chips(cfg))]
    return "\n".join(lines)


def _shape_key(shape: str) -> int:
    return math.prod(int(v) for v in shape.split("x"))


def _bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    """Grouped bars: one group per x label, one bar per series (missing values left out)."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        if pts:
            ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=7)


def _plots(out: Path, rows: list[dict], emulated: bool) -> tuple[list[Path], str | None]:
    """One figure per op: bars per shape of x minimum (emulated; one panel per mode, one bar per dtype) or of %
    of the device's copy bandwidth (timed; one panel per dtype and mode, one bar per provider). Returns the
    files and, when matplotlib is missing, a one-line message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], f"plots skipped: matplotlib is not installed ({PLOT_HINT})"
    value = "traffic_over_min" if emulated else "pct_copy_bw"
    paths = []
    for op in sorted({r["op"] for r in rows}):
        sub = [r for r in rows if r["op"] == op and r.get(value) is not None]
        if not sub:
            continue
        dtypes = list(dict.fromkeys(r["dtype"] for r in sub))
        modes = [m for m in MODES if any(r["mode"] == m for r in sub)]
        panels = [(None, m) for m in modes] if emulated else [(d, m) for d in dtypes for m in modes]
        ncols = len(modes)
        nrows = len(panels) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
        for ax, (dtype, mode) in zip(axes.flat, panels):
            pts = [r for r in sub if r["mode"] == mode and (dtype is None or r["dtype"] == dtype)]
            shape_list = sorted({r["shape"] for r in pts}, key=_shape_key)
            key = "dtype" if emulated else "provider"
            kinds = list(dict.fromkeys(r[key] for r in pts))  # in the order of the run
            found = {(r[key], r["shape"]): r[value] for r in pts}
            _bars(ax, shape_list, {k: [found.get((k, sh)) for sh in shape_list] for k in kinds})
            if emulated:
                ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
                ax.set_title(f"{op} {mode}: bytes moved / minimum", fontsize=9)
                ax.set_ylabel("x minimum (harness count)")
            else:
                ax.set_title(f"{op} {dtype} {mode}", fontsize=9)
                ax.set_ylabel("% of copy bandwidth (median)")
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths, None


def run_benchmarks(cfg: BenchConfig, notes: list[str] | None = None) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = Environment(cfg.device.type, device_name(cfg.device), torch.__version__, tmf.__version__, stamp)
    env.notes += notes or []
    out = cfg.out or Path("bench_results") / f"{stamp.replace(':', '')}-{cfg.device.type}"
    out.mkdir(parents=True, exist_ok=True)
    fused_backend = tmf.backend_for(torch.empty(0, device=cfg.device))
    projection: list[dict] = []
    if cfg.emulated:
        fused_backend = "metal-emulated"
        rows = _emulated_rows(cfg, env)
        columns = EMULATED_COLUMNS
        if "attention" in cfg.ops:
            projection = attention_projection_rows(cfg)
            _write_csv(out / "attention_projection.csv", projection, PROJECTION_COLUMNS)
    else:
        if fused_backend == "reference":
            env.notes.append(
                f"fused = the plain-PyTorch reference path on {cfg.device.type} (no Metal or CUDA kernels here): "
                "these rows time the reference, not our kernels"
            )
        env.copy_gbps = copy_bandwidth_gbps(cfg.device)
        rows = _timed_rows(cfg, env)
        columns = CSV_COLUMNS
    _write_csv(out / "results.csv", rows, columns)
    meta = {"environment": env.__dict__, "suite": cfg.suite, "emulated": cfg.emulated, "fused_backend": fused_backend}
    if cfg.emulated:
        meta["projection"] = {
            "what": "floor_us_<chip> = bytes_moved / the chip's copy bandwidth: a floor from a bandwidth model, "
            "not a measurement",
            "chips": [{**c.__dict__, "column": f"floor_us_{c.key}"} for c in CHIPS],
            "compute": "compute_floor_us_<chip> (attention) = FLOPs / the chip's peak rate, GPU cores x clock x 256 "
            "FLOPs per core-cycle: a floor from a compute model, not a measurement",
            "peak_tflops": {c.name: c.peak_tflops for c in CHIPS},
        }
        if projection:
            meta["attention_projection"] = projection
    else:
        meta["timing"] = timing_method(cfg.device, cfg.reps)
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    summary = _summary(cfg, env, rows, fused_backend, projection)
    if cfg.emulated:  # the launch plans' own cost, the part of a Mac's per-call time this CPU can measure
        host_rows = host_cost_rows()
        _write_csv(out / "host_cost.csv", host_rows, ["entry_point", "dispatches", "median_us", "per_dispatch_us"])
        summary += "\n" + host_cost_table(host_rows)
    (out / "summary.md").write_text(summary)
    plots, plot_message = _plots(out, rows, cfg.emulated) if cfg.plots else ([], None)
    print(summary)
    print(
        f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'summary.md'}" + "".join(f", {p}" for p in plots)
    )
    if plot_message:
        print(plot_message)
    if cfg.record is not None:
        record_run(cfg, env, rows)
    return out


def record_run(cfg: BenchConfig, env: Environment, rows: list[dict]) -> int:
    """Append the run's rows to the ledger (--record); for the checkout's own ledger, regenerate docs/results.md."""
    from torch_metal_fused.bench import ledger, results

    assert cfg.record is not None
    new = ledger.bench_rows(rows, emulated=cfg.emulated, copy_gbps=env.copy_gbps, commit=ledger.current_commit())
    n = ledger.append(new, cfg.record)
    print(f"recorded {n} rows in {cfg.record}")
    if cfg.record.resolve() == ledger.DEFAULT_LEDGER and ledger.DEFAULT_RESULTS_MD.exists():
        ledger.DEFAULT_RESULTS_MD.write_text(results.render(ledger.read(cfg.record)))
        print(f"regenerated {ledger.DEFAULT_RESULTS_MD} from it")
    return n
