"""`python -m torch_metal_fused.doctor`: on Linux it reports the Metal-on-CPU harness (the same shaders and launch
code as MPS) and self-tests every op through it; failures forced with TORCH_METAL_FUSED_EMU_FAULTS show in the
report and the exit status. The Mac-only part (reading the compiled extension's family and pipeline status) is run
against a fake extension. The JSON schema is documented in docs/doctor.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from torch_metal_fused import _backend, doctor
from torch_metal_fused.emulator import runner


def _run_doctor(tmp_path, faults: str = "") -> tuple[int, str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in (_backend.ENV_VAR, runner.FAULTS_ENV)}
    if faults:
        env[runner.FAULTS_ENV] = faults
    out = tmp_path / "doctor.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch_metal_fused.doctor", "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr, json.loads(out.read_text())


@pytest.mark.emulated
def test_doctor_on_linux_reports_the_harness_and_passes(tmp_path):
    rc, text, report = _run_doctor(tmp_path)
    assert rc == 0, text
    assert report["schema"] == doctor.SCHEMA_VERSION and report["ok"] and report["problems"] == []
    assert report["device"] == "cpu" and report["backend"] == "metal-emulated"
    assert {"os", "chip", "torch", "torch_metal_fused", "macos_version"} <= set(report["system"])
    kernels = report["kernels"]
    assert kernels["kind"] == "metal-emulated" and kernels["available"] and kernels["bfloat16"]
    assert set(kernels["families"]) == set(_backend.FAMILIES)
    every_kernel = set(runner.kernel_names())
    listed = {k for f in kernels["families"].values() for k in f["pipelines"]}
    assert listed == every_kernel
    for family in kernels["families"].values():
        assert family["ok"] and family["compiled"]
        assert all(p["execution_width"] == 32 and p["max_threads"] >= 32 for p in family["pipelines"].values())
    rows = report["self_test"]
    seen = {(r["op"], r["dtype"], r["direction"].split()[0]) for r in rows}
    assert seen == {
        (op, dt, direction)
        for op in _backend.FAMILIES
        for dt in ("float32", "float16", "bfloat16")
        for direction in ("forward", "backward")
    }
    assert all(r["ok"] and r["backend"] == "metal-emulated" and r["rel_error"] <= r["tolerance"] for r in rows)
    assert report["timing"] is None  # the harness is no GPU
    assert "self-test: " in text and "result   : OK" in text


@pytest.mark.emulated
def test_doctor_reports_forced_failures_and_exits_nonzero(tmp_path):
    rc, text, report = _run_doctor(tmp_path, "compile:softmax,pipeline:rms_norm_backward_dx_dw_single_row_half")
    assert rc == 1 and not report["ok"], text
    families = report["kernels"]["families"]
    assert not families["softmax"]["compiled"] and "compiling softmax.metal failed" in families["softmax"]["error"]
    bad = families["rms_norm"]["pipelines"]["rms_norm_backward_dx_dw_single_row_half"]
    assert not bad["ok"] and "building the pipeline" in bad["error"]
    assert families["lora_linear"]["ok"]
    failed = {(r["op"], r["dtype"]) for r in report["self_test"] if not r["ok"]}
    # softmax in every dtype; RMSNorm only where the broken half pipeline is needed; LoRA untouched.
    assert failed == {("softmax", d) for d in ("float32", "float16", "bfloat16")} | {("rms_norm", "float16")}
    assert all("served by the reference" in r["error"] for r in report["self_test"] if not r["ok"])
    assert "Please paste this output" in text


@pytest.mark.emulated
def test_metal_report_of_the_compile_shader_route(monkeypatch):
    """The Mac path's report, executed here: compile_shader's libraries (the harness's stand-in serving as the MPS
    one), with a family that does not compile and one whose pipelines run 16-wide SIMD-groups."""
    from torch_metal_fused.backends import metal_library
    from torch_metal_fused.emulator import runner

    stand_in = metal_library.libraries_for(torch.device("cpu"))
    monkeypatch.setattr(metal_library, "libraries_for", lambda device: stand_in)
    monkeypatch.setattr(torch._C, "_mps_get_name", lambda: "Apple M9", raising=False)
    with runner.faults("compile:rms_norm,simd_width:lora_linear=16"):
        report = doctor.metal_report()
    fams = report["families"]
    assert report["device_name"] == "Apple M9" and "compile_shader" in report["launch"]
    assert fams["softmax"]["ok"] and "stand-in" in fams["softmax"]["source"]
    assert not fams["rms_norm"]["ok"] and fams["rms_norm"]["pipelines"] == {}
    assert "injected fault" in fams["rms_norm"]["error"]
    assert not fams["lora_linear"]["ok"]
    assert all("threadExecutionWidth 16" in p["error"] for p in fams["lora_linear"]["pipelines"].values())
    full = {
        "schema": 1,
        "device": "mps",
        "backend": "metal",
        "system": doctor.system_info(),
        "kernels": report,
        "self_test": [],
        "timing": [
            {
                "case": "softmax",
                "fused_median_us": 10.0,
                "native_median_us": 20.0,
                "speedup": 2.0,
                "fused_first_call_ms": 30.0,
            }
        ],
        "problems": ["x"],
        "ok": False,
    }
    text = doctor.format_report(full)
    assert "Apple M9" in text and "library FAILED" in text and "threadExecutionWidth 16" in text
    assert "(2.00x)" in text


def test_self_test_catches_a_wrong_kernel(monkeypatch):
    """The self-test is not vacuous: an op that returns a wrong result fails it (and the exit status)."""
    from torch_metal_fused.ops import softmax as softmax_module

    real = softmax_module.softmax
    monkeypatch.setattr(softmax_module, "softmax", lambda x, dim=-1: real(x, dim) * 1.01)
    rows = doctor.self_test("cpu", (torch.float32,))
    bad = [r for r in rows if not r["ok"]]
    assert bad and {r["op"] for r in bad} == {"softmax"}
    assert all(r["rel_error"] > r["tolerance"] for r in bad)
