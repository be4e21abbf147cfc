from __future__ import annotations

import os
import sys
from pathlib import Path

import kernel_coverage
import pytest
import torch
from helpers import harness_required

from torch_metal_fused import _backend, testing

# A fallback from our Metal kernels to the reference fails the test instead of passing silently (tests of the
# fallback itself turn it off).
os.environ.setdefault(_backend.STRICT_ENV, "1")


def _emulator_available() -> tuple[bool, str]:
    try:
        from torch_metal_fused.backends import emulated
    except ImportError as exc:  # the emulated backend not present at all
        return False, str(exc)
    return emulated.available()


def _harness_skip_marks() -> list:
    ok, why = _emulator_available()
    if ok or harness_required():
        return []
    return [pytest.mark.skip(reason=f"Metal-on-CPU harness unavailable: {why}")]


def pytest_collection_modifyitems(config, items):
    kernel_coverage.suite["collected_files"] = {Path(str(item.fspath)).name for item in items}
    # The coverage rule judges what every other test recorded: it runs last.
    items.sort(key=lambda item: Path(str(item.fspath)).name == "test_zz_kernel_coverage.py")
    marks = None
    for item in items:
        if "emulated" in item.keywords and "backend" not in getattr(item, "fixturenames", ()):
            marks = _harness_skip_marks() if marks is None else marks
            for mark in marks:
                item.add_marker(mark)


def pytest_deselected(items):
    kernel_coverage.suite["deselected"] = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Record the harness kernels a passing test dispatched, and whether it checked a result numerically."""
    runner = sys.modules.get("torch_metal_fused.emulator.runner")
    if runner is not None:
        runner.take_dispatched_kernels()
    checks = testing.numerical_check_count()
    outcome = yield
    runner = sys.modules.get("torch_metal_fused.emulator.runner")
    if runner is not None and outcome.excinfo is None:
        kernel_coverage.record(item.nodeid, runner.take_dispatched_kernels(), testing.numerical_check_count() > checks)


def _backend_params():
    params = [pytest.param(("reference", "cpu"), id="reference")]
    marks = _harness_skip_marks()
    params.append(pytest.param(("metal-emulated", "cpu"), id="metal-emulated", marks=[pytest.mark.emulated, *marks]))
    # The same kernels under the checker (instrumented build): races, uninitialised threadgroup reads,
    # out-of-bounds accesses and barrier misuse fail the test with the .metal file and line.
    params.append(
        pytest.param(
            ("metal-emulated-checked", "cpu"), id="metal-emulated-checked", marks=[pytest.mark.emulated, *marks]
        )
    )
    params.append(
        pytest.param(
            ("metal", "mps"),
            id="metal",
            marks=[pytest.mark.mps, pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS device")],
        )
    )
    params.append(
        pytest.param(
            ("cuda", "cuda"),
            id="cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
        )
    )
    return params


class Backend:
    """The backend under test: its name, the device its tensors live on."""

    def __init__(self, name: str, device: str) -> None:
        self.name = name
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=_backend_params())
def backend(request, monkeypatch) -> Backend:
    name, device = request.param
    if name == "metal-emulated-checked":
        monkeypatch.setenv("TORCH_METAL_FUSED_EMU_CHECK", "1")
        name = "metal-emulated"
    if name in ("reference", "metal-emulated"):
        monkeypatch.setenv(_backend.ENV_VAR, name)
    else:
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    b = Backend(name, device)
    probe = torch.zeros(1, device=b.device)
    assert _backend.backend_for(probe) == name, f"backend_for serves {_backend.backend_for(probe)}, not {name}"
    return b


def pytest_configure(config):
    for marker, text in (
        ("emulated", "runs Metal kernels through the Metal-on-CPU harness"),
        ("mps", "needs an Apple GPU (MPS)"),
        ("cuda", "needs an NVIDIA GPU"),
        ("slow", "long-running"),
    ):
        config.addinivalue_line("markers", f"{marker}: {text}")
