"""Whole training steps of a Llama- or Gemma-2-shaped causal LM (random weights), per provider, each provider in a
process of its own: step time, tokens/s, peak memory and the first losses, in LoRA and full fine-tuning.

    python -m torch_metal_fused.bench --train                  # llama-1b on cuda/mps, the tiny preset on cpu
    python -m torch_metal_fused.bench --train --modes lora --providers hf,tmf,liger --batch 4 --seq 2048
    python -m torch_metal_fused.bench --train --fit 24         # the longest sequence (batch 1) that fits 24 GiB
    python -m torch_metal_fused.bench --train --memory         # where each provider's memory goes, by call site
    python -m torch_metal_fused.bench --train --profile        # one step's device and host time, op by op

Modes: lora (PEFT's defaults: r 16 on all seven projections, adapters kept in float32 on the bf16 model), lora-bf16
(`autocast_adapter_dtype=False`: adapters in bf16), full (every weight trained). Providers: hf (transformers + PEFT as
they are), tmf (patch_model with every option), tmf:<option> (patch_model with that option alone: what it buys),
liger (Liger-Kernel's apply_liger_kernel_to_<arch>, where it imports), torch_lce (the loss through torch's own
F.linear_cross_entropy, where this torch has it). AdamW; the median of --steps steps after --warmup. Peak memory:
torch.cuda.max_memory_allocated on CUDA, torch.mps.driver_allocated_memory after the steps on a Mac, and on a CPU an
allocation count over one more step: the weights' and optimizer state's bytes plus the most the step's tensors hold at
once (the profiler's allocation events), the memory side of a scaled-down model, not a device's memory.
--memory: after the timed steps, one more step whose tensors saved for backward are counted by the call site that
saved them, and on CUDA the allocations alive at the step's peak by the call site that made them (from
torch.cuda.memory's allocation history): what a peak-memory gap between providers consists of.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from torch_metal_fused.bench.host_cost import synchronize

PRESETS: dict[str, dict] = {
    # Llama-3.2-1B's shape.
    "llama-1b": dict(
        arch="llama", layers=16, hidden=2048, intermediate=8192, vocab=128256, heads=32, kv_heads=8, head_dim=64
    ),
    # Gemma-2-2B's shape (sliding-window layers, soft-capping).
    "gemma2-2b": dict(
        arch="gemma2", layers=26, hidden=2304, intermediate=9216, vocab=256000, heads=8, kv_heads=4, head_dim=256
    ),
    "tiny": dict(arch="llama", layers=2, hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=2, head_dim=16),
}
MODES = ("lora", "lora-bf16", "full")
PATCH_OPTIONS = ("rms_norm", "lora", "cross_entropy", "swiglu", "rope", "attention")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class StepResult:
    provider: str
    mode: str
    preset: str
    batch: int
    seq: int
    device: str
    ok: bool
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    peak_gib: float = 0.0
    losses: list[float] = field(default_factory=list)
    error: str = ""
    memory: dict = field(default_factory=dict)  # --memory: {"saved": sites, "peak": sites}, sites = [[where, bytes]]
    profile: dict = field(default_factory=dict)  # --profile: profile_step's findings


def _model(preset: str, mode: str, device: torch.device):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    common = dict(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"],
        max_position_embeddings=131072,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16
    with torch.device(device):
        config = Gemma2Config(**common) if p["arch"] == "gemma2" else LlamaConfig(**common)
        model = (Gemma2ForCausalLM if p["arch"] == "gemma2" else LlamaForCausalLM)(config).to(dtype)
    if mode != "full":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(model, config, autocast_adapter_dtype=mode == "lora")
    return model


def _apply_provider(model, provider: str, arch: str):
    """Returns a loss function (model, ids) -> loss."""
    if provider == "tmf" or provider.startswith("tmf:"):
        import torch_metal_fused as tmf

        options = dict.fromkeys(PATCH_OPTIONS, provider == "tmf")
        if provider.startswith("tmf:"):
            options[provider.split(":", 1)[1]] = True
        tmf.patch_model(model, **options)
    elif provider == "liger":
        import liger_kernel.transformers as liger

        apply = getattr(liger, f"apply_liger_kernel_to_{arch}")
        apply(model=model.get_base_model() if hasattr(model, "get_base_model") else model)
    elif provider == "torch_lce":
        fn = torch.nn.functional.linear_cross_entropy
        base = model.get_base_model() if hasattr(model, "get_base_model") else model

        def loss_fn(_, ids):
            hidden = base.model(input_ids=ids).last_hidden_state[:, :-1]
            return fn(hidden.reshape(-1, hidden.shape[-1]), base.lm_head.weight, ids[:, 1:].reshape(-1))

        return loss_fn
    elif provider != "hf":
        raise ValueError(f"unknown provider {provider!r}")
    return lambda m, ids: m(input_ids=ids, labels=ids).loss


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return torch.mps.driver_allocated_memory() / 2**30


def cpu_step_peak_bytes(step, model, opt: torch.optim.Optimizer) -> int:
    """An allocation count of one training step on the CPU (step() runs it): the bytes of the distinct storages held
    before it (weights, buffers, optimizer state) plus the highest running sum of the bytes the step allocates and
    frees (torch.profiler's allocation events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    held = [*model.parameters(), *model.buffers()]
    held += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return sum(resident.values()) + peak


# ---- --memory: where a step's memory goes, by call site --------------------------------------------------------
# Frames of autograd's, the allocator's and torch's dispatch machinery, and of this module: a site is the innermost
# frame outside them (a model's, PEFT's, Liger's or our op's code).
_MACHINERY = ("/torch/autograd/", "/torch/_", "/torch/utils/", "/torch/cuda/", "/torch/nn/modules/module.py")
SITES_SHOWN = 12


def call_site(frames) -> str:
    """'file.py:function:line' of the innermost frame outside the machinery; frames: (filename, line, function),
    innermost first."""
    for filename, line, name in frames:
        if filename != __file__ and not any(part in filename for part in _MACHINERY):
            return f"{Path(filename).name}:{name}:{line}"
    return "(torch internals)"


def _top_sites(sizes: dict[str, int]) -> list[list]:
    """[[site, bytes], ...], the largest SITES_SHOWN first, the rest summed as 'other sites', the total last."""
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])
    top = [[site, n] for site, n in ranked[:SITES_SHOWN]]
    rest = sum(n for _, n in ranked[SITES_SHOWN:])
    if rest:
        top.append(["other sites", rest])
    return top + [["total", sum(sizes.values())]]


def saved_by_site(forward, exclude: set[int]) -> list[list]:
    """Runs forward() and counts the bytes of the distinct storages autograd saves for backward (those in exclude,
    the parameters' data pointers, left out) by the call site that saved them."""
    import traceback

    sizes: dict[str, int] = {}
    seen = set(exclude)

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            frames = [(f.filename, f.lineno, f.name) for f in reversed(traceback.extract_stack())]
            site = call_site(frames)
            sizes[site] = sizes.get(site, 0) + st.nbytes()
        return t

    pack.passes_tensors_through = True  # ops.glu.down_of_glu keeps recomputing under it: what a step saves
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return _top_sites(sizes)


def peak_by_site(trace: list[dict]) -> list[list]:
    """The allocations alive at the highest point of a CUDA allocator trace (torch.cuda.memory._snapshot()'s
    device_traces[i]: 'alloc' and 'free_requested'/'free_completed' events with addr, size and Python frames,
    innermost first), by the call site that made them. Memory allocated before the trace began is not in it."""
    live: dict[int, dict] = {}
    total = peak = peak_at = 0
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, peak_at = total, i
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    live.clear()
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] in ("free_requested", "free_completed"):
            live.pop(event["addr"], None)
    sizes: dict[str, int] = {}
    for event in live.values():
        site = call_site([(f["filename"], f["line"], f["name"]) for f in event.get("frames", [])])
        sizes[site] = sizes.get(site, 0) + event["size"]
    return _top_sites(sizes)


def memory_report(step, forward, model, dev: torch.device) -> dict:
    """--memory: what one step's forward saves for backward, by site; on CUDA also the allocations alive at the
    step's peak (over what was allocated before it: weights, optimizer states), by site."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    report: dict = {"saved": saved_by_site(forward, params)}
    step()  # the forward above was the step's: finish it (backward, optimizer)
    if dev.type == "cuda":
        synchronize(dev)
        report["before_gib"] = round(torch.cuda.memory_allocated(dev) / 2**30, 3)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        try:
            forward()
            step()
            synchronize(dev)
            trace = torch.cuda.memory._snapshot()["device_traces"][dev.index or 0]
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        report["peak"] = peak_by_site(trace)
    return report


PROFILE_ROWS = 15


def profile_step(forward, step, dev: torch.device) -> dict:
    """--profile: one more step under torch.profiler: its wall time, the device's busy time (its kernels, copies and
    fills summed) and their count, and the ops taking the most device time and the most host time (self time, ms per
    step, calls): whether the step waits on the GPU or on the host that launches its work, and on what."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    synchronize(dev)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        forward()
        step()
        synchronize(dev)
    wall = time.perf_counter() - t0
    device_work = [e for e in prof.profiler.kineto_results.events() if e.device_type() != DeviceType.CPU]
    averages = prof.key_averages()

    def top(key: str) -> list[list]:
        rows = sorted(averages, key=lambda a: -getattr(a, key, 0.0))[:PROFILE_ROWS]
        return [[a.key, round(getattr(a, key, 0.0) / 1e3, 3), a.count] for a in rows if getattr(a, key, 0.0) > 0]

    return {
        "wall_ms": round(wall * 1e3, 2),
        "device_busy_ms": round(sum(e.duration_ns() for e in device_work) / 1e6, 2),
        "device_launches": len(device_work),
        "top_device": top("self_device_time_total") if device_work else [],
        "top_host": top("self_cpu_time_total"),
    }


def run_worker(
    provider: str,
    mode: str,
    preset: str,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    device: str,
    memory: bool = False,
    profile: bool = False,
):
    """One provider's steps in this process (python -m torch_metal_fused.bench.train --worker ...)."""
    dev = torch.device(device)
    result = StepResult(provider, mode, preset, batch, seq, device, ok=False)
    try:
        model = _model(preset, mode, dev)
        loss_fn = _apply_provider(model, provider, PRESETS[preset]["arch"])
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        g = torch.Generator().manual_seed(1)
        losses: list[torch.Tensor] = []

        def forward() -> None:
            ids = torch.randint(0, PRESETS[preset]["vocab"], (batch, seq), generator=g).to(dev)
            losses.append(loss_fn(model, ids))

        def step() -> None:  # the rest of the step whose forward ran last
            losses[-1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for i in range(warmup + steps):
            synchronize(dev)
            t0 = time.perf_counter()
            forward()
            step()
            synchronize(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            result.losses.append(round(float(losses.pop().detach()), 4))
        result.step_ms = statistics.median(times) * 1e3
        result.tokens_per_s = batch * seq / statistics.median(times)
        if dev.type == "cpu":

            def whole_step() -> None:
                forward()
                step()
                losses.pop()

            result.peak_gib = cpu_step_peak_bytes(whole_step, model, opt) / 2**30
        else:
            result.peak_gib = _peak_gib(dev)
        if memory:
            result.memory = memory_report(step, forward, model, dev)
        if profile:
            result.profile = profile_step(forward, step, dev)
        result.ok = True
    except Exception as exc:  # an out-of-memory or a provider that does not run here: reported, not raised
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return result


def _spawn(
    args: argparse.Namespace, provider: str, mode: str, seq: int, batch: int, steps: int, limit_gib: float = 0.0
) -> StepResult:
    """One provider's run in a process of its own; limit_gib (--fit's trials) caps its CUDA memory."""
    cmd = [sys.executable, "-m", "torch_metal_fused.bench.train", "--worker", provider, "--modes", mode]
    cmd += ["--preset", args.preset, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps)]
    cmd += ["--warmup", str(args.warmup), "--device", args.device, "--fit", str(limit_gib)]
    if not limit_gib:
        cmd += ["--memory"] * args.memory + ["--profile"] * args.profile
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return StepResult(provider, mode, args.preset, batch, seq, args.device, ok=False, error=tail[0][:300])
    return StepResult(**json.loads(lines[-1]))


def _fits(result: StepResult, gib: float) -> bool:
    return result.ok and result.peak_gib <= gib


def fit(args: argparse.Namespace, provider: str, mode: str) -> tuple[int, list[StepResult]]:
    """The longest sequence at batch 1 whose steps fit args.fit GiB: doubling from 512, then bisecting to 256."""
    tried, lo, hi, seq = [], 0, None, 512
    while hi is None and seq <= 1 << 20:
        r = _spawn(args, provider, mode, seq, 1, 1, args.fit)
        tried.append(r)
        if _fits(r, args.fit):
            lo, seq = seq, seq * 2
        else:
            hi = seq
    while hi is not None and hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        r = _spawn(args, provider, mode, mid, 1, 1, args.fit)
        tried.append(r)
        lo, hi = (mid, hi) if _fits(r, args.fit) else (lo, mid)
    return lo, tried


def _gib(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.4f}"  # a scaled-down model's megabytes stay visible


def table(results: list[StepResult]) -> str:
    lines = [
        "| mode | provider | step ms | tokens/s | peak GiB | first losses |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.ok:
            losses = " ".join(f"{x:.4f}" for x in r.losses[:2])
            lines.append(
                f"| {r.mode} | {r.provider} | {r.step_ms:.1f} | {r.tokens_per_s:,.0f} | {_gib(r.peak_gib)} | {losses} |"
            )
        else:
            lines.append(f"| {r.mode} | {r.provider} | - | - | - | did not run: {r.error} |")
    return "\n".join(lines)


def memory_tables(results: list[StepResult]) -> str:
    """--memory's findings: per mode, each provider's MiB by call site (saved for backward; alive at the peak)."""
    parts = []
    for what, key in (("saved for backward by one forward", "saved"), ("alive at the step's peak", "peak")):
        for mode in dict.fromkeys(r.mode for r in results):
            ran = [r for r in results if r.mode == mode and r.memory.get(key)]
            if not ran:
                continue
            head = f"\n{mode}: MiB {what}"
            if key == "peak":
                head += (
                    " (beyond what was allocated before the step: "
                    + ", ".join(f"{r.provider} {r.memory['before_gib']} GiB" for r in ran)
                    + ")"
                )
            lines = [head, ""]
            for r in ran:
                sites = (f"{site} {n / 2**20:.2f}" for site, n in r.memory[key])
                lines.append(f"- {r.provider}: " + "; ".join(sites))
            parts.append("\n".join(lines))
    return "\n".join(parts)


def profile_tables(results: list[StepResult]) -> str:
    """--profile's findings per mode and provider: wall against device-busy time, then the top ops."""
    parts = []
    for r in results:
        if not r.profile:
            continue
        f = r.profile
        lines = [
            f"\n{r.mode} {r.provider}: one profiled step {f['wall_ms']} ms wall, device busy {f['device_busy_ms']} ms "
            f"over {f['device_launches']} kernels, copies and fills",
        ]
        for what, key in (("device time", "top_device"), ("host self time", "top_host")):
            if f[key]:
                lines.append(f"- most {what} (ms, calls): " + "; ".join(f"{n} {ms} ({c})" for n, ms, c in f[key]))
        parts.append("\n".join(lines))
    return "\n".join(parts)


def _plot(results: list[StepResult], path: Path, title: str) -> str:
    """Tokens/s and peak memory per mode and provider, side by side (matplotlib, an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    ran = [r for r in results if r.ok]
    labels = [f"{r.mode}\n{r.provider}" for r in ran]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.9 * len(ran)) * 2, 4))
    for ax, values, what in (
        (axes[0], [r.tokens_per_s for r in ran], "tokens/s"),
        (axes[1], [r.peak_gib for r in ran], "peak GiB"),
    ):
        ax.bar(range(len(ran)), values)
        ax.set_xticks(range(len(ran)), labels, fontsize=7)
        ax.set_ylabel(what)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def _ledger_rows(results: list[StepResult], commit: str) -> list[dict]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else results[0].device if results else ""
    return [
        dict(
            run=stamp,
            date=stamp[:10],
            commit=commit,
            device=name,
            torch=torch.__version__,
            source="bench --train",
            op="train_step",
            # The ledger's conventions: ours is "fused", a training step is forward_backward; the training mode
            # (lora, lora-bf16, full) belongs to what is measured, so it goes with the shape.
            provider="fused" + r.provider[3:] if r.provider.startswith("tmf") else r.provider,
            backend=r.device,
            dtype="bfloat16",
            shape=f"{r.preset} {r.mode} {r.batch}x{r.seq}",
            mode="forward_backward",
            level="op",
            method="wall",
            p50_us=round(r.step_ms * 1e3, 1),
            peak_mb=round(r.peak_gib * 1024, 1),
            note=f"tokens/s {r.tokens_per_s:.0f}; first losses {' '.join(map(str, r.losses[:2]))}",
        )
        for r in results
        if r.ok
    ]


def default_providers() -> list[str]:
    providers = ["hf", "tmf", *(f"tmf:{o}" for o in PATCH_OPTIONS)]
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        providers.append("torch_lce")
    try:
        import liger_kernel  # noqa: F401

        providers.append("liger")
    except ImportError:
        pass
    return providers


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torch_metal_fused.bench --train", description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    device = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=device)
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: llama-1b on a GPU, tiny on cpu")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--providers", default=None, help="comma-separated (default: every one that runs here)")
    p.add_argument("--batch", type=int, default=None, help="default 4 (1 on cpu)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (128 on cpu)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fit", type=float, default=0.0, help="GiB: also find the longest sequence at batch 1 that fits")
    p.add_argument("--memory", action="store_true", help="also: where each provider's memory goes, by call site")
    p.add_argument("--profile", action="store_true", help="also: one step's device and host time, op by op")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per provider process")
    p.add_argument("--out", type=Path, default=None, help="write results.json and summary.md there")
    p.add_argument("--record", nargs="?", const="default", default=None, metavar="LEDGER")
    a = p.parse_args(argv)
    gpu = a.device != "cpu"
    a.preset = a.preset or ("llama-1b" if gpu else "tiny")
    a.batch = a.batch or (4 if gpu else 1)
    a.seq = a.seq or (2048 if gpu else 128)
    for m in a.modes.split(","):
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    a.providers = a.providers.split(",") if a.providers else default_providers()
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        if args.fit and args.device == "cuda":  # --fit: an allocation past the budget fails as out-of-memory
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.fit / total))
        shape = (args.preset, args.batch, args.seq, args.steps, args.warmup)
        r = run_worker(args.worker, args.modes, *shape, args.device, args.memory, args.profile)
        print(json.dumps(asdict(r)))
        return 0
    results, fits = [], []
    jobs = [(m, prov) for m in args.modes.split(",") for prov in args.providers]
    for i, (mode, provider) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {mode} {provider} ...", file=sys.stderr, flush=True)
        results.append(_spawn(args, provider, mode, args.seq, args.batch, args.steps))
        print("    " + table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)  # a cut run keeps its rows
        if args.fit:
            seq, _ = fit(args, provider, mode)
            fits.append((mode, provider, seq))
            print(f"    longest sequence within {args.fit:g} GiB: {seq}", file=sys.stderr, flush=True)
    head = (
        f"{args.preset}, bf16, batch {args.batch} x seq {args.seq}, device {args.device}, torch {torch.__version__}; "
        f"median of {args.steps} steps after {args.warmup}"
        + (
            "; peak = an allocation count (weights, optimizer state, the step's live tensors)"
            if args.device == "cpu"
            else ""
        )
    )
    text = head + "\n\n" + table(results)
    if args.memory:
        text += "\n" + memory_tables(results)
    if args.profile:
        text += "\n" + profile_tables(results)
    if fits:
        text += f"\n\nlongest sequence at batch 1 within {args.fit:g} GiB:\n" + "\n".join(
            f"- {m} {prov}: {seq}" for m, prov, seq in fits
        )
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text(text + "\n")
        (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
        print(_plot(results, args.out / "train.png", head))
    if args.record:
        from torch_metal_fused.bench import ledger

        path = ledger.DEFAULT_LEDGER if args.record == "default" else Path(args.record)
        ledger.append(_ledger_rows(results, ledger.current_commit()), path)
    return 0 if all(r.ok for r in results if r.provider in ("hf", "tmf")) else 1


if __name__ == "__main__":
    sys.exit(main())
