"""`python -m torch_metal_fused.doctor [--json FILE] [--device mps|cuda|cpu] [--no-timing]`: the one command a user
runs and pastes into an issue. It reports the system, which of our kernels this machine can build and run (per
kernel family: library compiled, compile time, each pipeline's limits), a self-test of every op forward and
backward in every supported dtype against a float64 reference, and a short fused-vs-native timing. Exit status 1
when anything failed. The JSON schema is documented in docs/doctor.md.

On a Mac it reports our Metal kernels on MPS; on an NVIDIA machine our CUDA kernels; on a CPU-only machine the
Metal-on-CPU harness (the same shaders and launch code, on the CPU) and its clang.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import torch_metal_fused as tmf
from torch_metal_fused import _backend, _config
from torch_metal_fused.testing import REL_TOL, rel_error, sample

SCHEMA_VERSION = 1
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- what this machine has --------------------------------------------------------------------------------
def _chip() -> str:
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            return out.stdout.strip() or platform.machine()
    return platform.processor() or platform.machine()


def system_info() -> dict[str, Any]:
    return {
        "os": platform.platform(),
        "macos_version": platform.mac_ver()[0] or None,
        "machine": platform.machine(),
        "chip": _chip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_metal_fused": tmf.__version__,
        "mps_available": torch.backends.mps.is_available(),
        "cuda_available": torch.cuda.is_available(),
        "compiled_extension": {
            "metal": _backend.has_metal_kernels(),
            "cuda": _backend.has_cuda_kernels(),
        },
    }


def default_device() -> str:
    if torch.backends.mps.is_available():
        return "mps"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _families_report(list_kernels: Callable[[str], list[str]], family_status, pipeline_info) -> dict[str, Any]:
    """Per family: its library (compiled?, from what, how long, the compiler's message) and each pipeline."""
    families: dict[str, Any] = {}
    for family in _backend.FAMILIES:
        status = dict(family_status(family))
        pipelines: dict[str, Any] = {}
        if status.get("compiled"):
            for kernel in list_kernels(family):
                try:
                    info = dict(pipeline_info(kernel))
                    problems = []
                    if info["execution_width"] != 32:
                        problems.append(f"threadExecutionWidth {info['execution_width']}, kernels assume 32")
                    info.update(ok=not problems, error="; ".join(problems))
                except _backend.KernelUnavailable as exc:
                    info = {"ok": False, "error": exc.reason}
                pipelines[kernel] = info
        status["pipelines"] = pipelines
        status["ok"] = bool(status.get("compiled")) and bool(pipelines) and all(p["ok"] for p in pipelines.values())
        families[family] = status
    return families


def compile_shader_families(device: torch.device) -> dict[str, Any]:
    """The families as torch.mps.compile_shader serves them (on "cpu": the harness's stand-in for it)."""
    from torch_metal_fused.backends.metal_library import libraries_for

    libs = libraries_for(device)

    def family_status(family: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            libs.library(family)
        except _backend.KernelUnavailable as exc:
            return {"compiled": False, "source": libs.name, "compile_ms": 0.0, "error": exc.reason}
        return {"compiled": True, "source": libs.name, "compile_ms": (time.perf_counter() - t0) * 1e3, "error": ""}

    def list_kernels(family: str) -> list[str]:
        return sorted(k for k in dir(libs.library(family)) if k.startswith(_backend.FAMILIES[family]))

    def pipeline_info(kernel: str) -> dict[str, int]:
        p = libs.pipeline(_backend.family_of_entry(kernel), kernel)
        return {"max_threads": p.max_threads, "execution_width": p.execution_width}

    return _families_report(list_kernels, family_status, pipeline_info)


def metal_report() -> dict[str, Any]:
    return {
        "kind": "metal",
        "device_name": getattr(torch._C, "_mps_get_name", lambda: "?")(),
        "launch": f"torch.mps.compile_shader (torch {torch.__version__})",
        "bfloat16": _backend.bfloat16_supported("metal"),
        "families": compile_shader_families(torch.device("mps")),
    }


def harness_report() -> dict[str, Any]:
    """The Metal-on-CPU harness: whether it builds here (clang 19, boost.context), then as for Metal."""
    from torch_metal_fused.backends import emulated

    ok, why = emulated.available()
    report: dict[str, Any] = {"kind": "metal-emulated", "available": ok, "error": why or None}
    if not ok:
        return report
    from torch_metal_fused.emulator import build, runner

    clang = build.find_clang()
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout.splitlines()
    faults = runner.active_faults()
    report.update(
        clang=f"{clang}: {version[0] if version else '?'}",
        faults=faults or None,
        metal_language_version="3.1 (clang's MSL subset, see docs/metal-on-cpu.md)",
        bfloat16=_backend.bfloat16_supported("metal-emulated"),
        # The route the metal-emulated backend takes: the compile_shader stand-in, faults applied.
        families=compile_shader_families(torch.device("cpu")),
    )
    return report


def cuda_report() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "kind": "cuda",
        "device_name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "kernels_built": _backend.has_cuda_kernels(),
    }


# ---- self-test --------------------------------------------------------------------------------------------
def _cases(device: str, dtype: torch.dtype):
    """(family, fn(inputs) -> output, reference, inputs): each kernel family's op module declares its cases
    (`self_test_cases`), small odd shapes that reach its kernels forward and backward."""
    for family in _backend.FAMILIES:
        module = importlib.import_module(f"torch_metal_fused.ops.{family}")
        for case in module.self_test_cases(dtype, device):
            yield family, case.fn, case.reference, case.inputs


def _check(op: str, dtype: torch.dtype, device: str, fn, ref_fn, inputs: list[torch.Tensor]) -> list[dict]:
    """Forward and backward of one case against float64 on the CPU: relative error vs the contract's tolerance."""
    shape = "x".join(str(s) for s in inputs[0].shape)
    rows = []
    tol = REL_TOL[dtype]
    try:
        ins = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(ins)
        dy = sample(tuple(out.shape), dtype, device, 7)
        grads = torch.autograd.grad(out, ins, dy)
        if device != "cpu":
            getattr(torch, device).synchronize()
        ref_ins = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
        ref = ref_fn(ref_ins)
        ref_grads = torch.autograd.grad(ref, ref_ins, dy.cpu().double())
        pairs = [("forward", out, ref)] + [(f"backward d{i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))]
        for direction, got, want in pairs:
            finite = bool(torch.isfinite(got).all())
            err = rel_error(got, want)
            rows.append(
                {
                    "op": op,
                    "dtype": str(dtype).removeprefix("torch."),
                    "shape": shape,
                    "direction": direction,
                    "rel_error": err,
                    "tolerance": tol,
                    "ok": finite and err <= tol,
                    "error": None if finite else "non-finite output",
                }
            )
    except Exception as exc:  # a crash is a result to report, not a reason to stop the report
        if isinstance(exc, _backend.FallbackError):
            error = f"served by the reference, not our kernels: {exc.reason}"
        else:
            error = f"{type(exc).__name__}: {exc}".strip()[:2000]
        rows.append(
            {
                "op": op,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": shape,
                "direction": "forward+backward",
                "rel_error": None,
                "tolerance": tol,
                "ok": False,
                "error": error,
                "traceback": None if isinstance(exc, _backend.FallbackError) else traceback.format_exc()[-4000:],
            }
        )
    return rows


def _failure(row: dict) -> str:
    if row["error"]:
        return row["error"]
    return f"relative error {row['rel_error']:.3g} above the tolerance {row['tolerance']:g}"


def self_test(device: str, dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[dict]:
    """Every op forward and backward in every dtype, strict: a fallback to the reference is a failure here."""
    rows: list[dict] = []
    with _config.overriding({_config.STRICT.name: "1"}):
        for dtype in dtypes:
            for op, fn, ref_fn, inputs in _cases(device, dtype):
                backend = _backend.backend_for(inputs[0], op)
                for row in _check(op, dtype, device, fn, ref_fn, inputs):
                    row["backend"] = backend
                    rows.append(row)
    return rows


# ---- timing ---------------------------------------------------------------------------------------------
def timing(device: str) -> list[dict]:
    """Fused vs native on one mid-size shape per op (float16), forward; the benchmark command does it properly."""
    from torch_metal_fused.bench.run import time_fn

    dev = torch.device(device)
    dt = torch.float16
    x = sample((2048, 4096), dt, device, 0)
    w = sample((4096,), dt, device, 1)
    lx, lw = sample((512, 1024), dt, device, 2), sample((1024, 1024), dt, device, 3)
    la, lb = sample((16, 1024), dt, device, 4), sample((1024, 16), dt, device, 5)
    pairs = {
        "softmax 2048x4096 float16 forward": (lambda: tmf.softmax(x, -1), lambda: torch.softmax(x, -1)),
        "rms_norm 2048x4096 float16 forward": (
            lambda: tmf.rms_norm(x, w, eps=1e-6),
            lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6),
        ),
        "lora_linear 512x1024->1024 r16 float16 forward": (
            lambda: tmf.lora_linear(lx, lw, la, lb, scale=2.0),
            lambda: lx @ lw.t() + 2.0 * (lx @ la.t()) @ lb.t(),
        ),
    }
    rows = []
    for name, (fused, native) in pairs.items():
        row: dict[str, Any] = {"case": name}
        try:
            for label, fn in (("fused", fused), ("native", native)):
                first, times = time_fn(fn, dev, budget_s=0.2)
                times.sort()
                row[f"{label}_median_us"] = times[len(times) // 2] * 1e3
                row[f"{label}_first_call_ms"] = first
            row["speedup"] = row["native_median_us"] / row["fused_median_us"]
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


# ---- the report ---------------------------------------------------------------------------------------------
def collect(device: str | None = None, run_timing: bool = True) -> dict[str, Any]:
    device = device or default_device()
    t0 = time.perf_counter()
    report: dict[str, Any] = {"schema": SCHEMA_VERSION, "device": device, "system": system_info()}
    problems: list[str] = []
    env: dict[str, str | None] = {}
    try:
        if device == "mps":
            kernels = metal_report() if _backend.has_metal_kernels() else {"kind": "none"}
            if not _backend.has_metal_kernels():
                problems.append(f"no Metal kernels: {_backend._no_metal_reason()}")
        elif device == "cuda":
            kernels = cuda_report()
            if not kernels["kernels_built"]:
                problems.append("the CUDA kernels were not built (a CUDA torch and nvcc are needed at install)")
        else:
            kernels = harness_report()
            if kernels["available"]:
                env[_config.BACKEND.name] = "metal-emulated"
    except Exception as exc:
        kernels = {"kind": "error", "error": f"{type(exc).__name__}: {exc}"}
        problems.append(f"inspecting the kernels failed: {kernels['error']}")
    report["kernels"] = kernels
    for family, status in kernels.get("families", {}).items():
        if not status["ok"]:
            bad = {k: p["error"] for k, p in status["pipelines"].items() if not p["ok"]}
            problems.append(f"{family}: {status.get('error') or bad}")
    dtypes = DTYPES
    if kernels.get("bfloat16") is False:
        dtypes = (torch.float32, torch.float16)
        problems.append("no bfloat16 kernels on this system (bfloat16 tensors use the reference)")
    with _config.overriding(env):
        report["backend"] = _backend.backend_for(torch.empty(0, device=device))
        report["self_test"] = self_test(device, dtypes)
        failed = [r for r in report["self_test"] if not r["ok"]]
        problems += [f"self-test {r['op']} {r['dtype']} {r['shape']} {r['direction']}: {_failure(r)}" for r in failed]
        if run_timing and device != "cpu":
            report["timing"] = timing(device)
        else:
            report["timing"] = None  # the harness is not a GPU: its speed means nothing
    report["problems"] = problems
    report["ok"] = not problems
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def format_report(report: dict[str, Any]) -> str:
    s = report["system"]
    lines = [
        f"torch_metal_fused doctor (schema {report['schema']})",
        f"  system   : {s['os']} | chip {s['chip']} | python {s['python']}",
        f"  versions : torch {s['torch']} | torch_metal_fused {s['torch_metal_fused']}",
        f"  device   : {report['device']} -> backend {report.get('backend')}",
    ]
    k = report["kernels"]
    if k.get("kind") in ("metal", "metal-emulated"):
        if k.get("kind") == "metal":
            lines.append(f"  metal    : {k['device_name']} | {k['launch']}")
        elif not k.get("available"):
            lines.append(f"  harness  : unavailable ({k['error']})")
        else:
            lines.append(f"  harness  : {k['clang']}" + (f" | faults {k['faults']}" if k.get("faults") else ""))
        if "bfloat16" in k:
            lines.append(f"  bfloat16 : {'yes' if k['bfloat16'] else 'no'}")
        for family, st in k.get("families", {}).items():
            built = sum(p["ok"] for p in st["pipelines"].values())
            state = "compiled" if st.get("compiled") else "FAILED"
            lines.append(
                f"  {family:<12}: library {state} ({st.get('source')}, {st.get('compile_ms', 0):.0f} ms), "
                f"{built}/{len(st['pipelines'])} pipelines ok"
            )
            if st.get("error"):
                lines.append(f"      {st['error']}")
            for kernel, p in st["pipelines"].items():
                if not p["ok"]:
                    lines.append(f"      {kernel}: {p['error']}")
            widths = {(p.get("max_threads"), p.get("execution_width")) for p in st["pipelines"].values() if p["ok"]}
            if widths:
                desc = ", ".join(f"{m} threads x width {w}" for m, w in sorted(widths))
                lines.append(f"      pipelines: {desc}")
    elif k.get("kind") == "cuda":
        lines.append(
            f"  cuda     : {k['device_name']} (sm {k['capability']}, CUDA {k['cuda']}), kernels built: "
            f"{k['kernels_built']}"
        )
    rows = report["self_test"]
    ok = sum(r["ok"] for r in rows)
    lines.append(f"  self-test: {ok}/{len(rows)} checks within tolerance (forward and backward vs float64)")
    for t in report.get("timing") or []:
        if "error" in t:
            lines.append(f"  timing   : {t['case']}: {t['error']}")
        else:
            lines.append(
                f"  timing   : {t['case']}: fused {t['fused_median_us']:.1f} us, native {t['native_median_us']:.1f} us "
                f"({t['speedup']:.2f}x); first call {t['fused_first_call_ms']:.1f} ms"
            )
    lines.append("  result   : " + ("OK" if report["ok"] else f"{len(report['problems'])} problem(s)"))
    lines += [f"    - {p}" for p in report["problems"]]
    if not report["ok"]:
        lines.append("  Please paste this output (or the --json file) into an issue on the torch-metal-fused tracker.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m torch_metal_fused.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON (docs/doctor.md)")
    p.add_argument("--device", choices=("mps", "cuda", "cpu"), help="default: mps, else cuda, else cpu")
    p.add_argument("--no-timing", action="store_true", help="skip the fused-vs-native timing")
    a = p.parse_args(argv)
    report = collect(a.device, run_timing=not a.no_timing)
    print(format_report(report))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
