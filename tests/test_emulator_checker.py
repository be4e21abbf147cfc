"""Bugs planted in copies of our real kernels: the checker (or the strict address-space pass) must report
each one at the right .metal file and line. And containment (tests/emulator_shaders/planted_bugs.metal): an
out-of-bounds access in a plain run, a barrier some threads never reach, an endless loop end as exceptions that
name the kernel and line, never as a crash or a hang of the test process; a race that index order hides shows in
plain runs."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torch_metal_fused import _config
from torch_metal_fused.backends import metal, metal_library
from torch_metal_fused.emulator import runner
from torch_metal_fused.emulator.build import (
    SHADERS,
    ShaderCompileError,
    compile_libraries,
    lint_address_spaces,
    lint_bfloat_conversions,
    shader_paths,
)

pytestmark = pytest.mark.emulated


def _plant(tmp_path: Path, file: str, old: str, new: str) -> tuple[Path, int]:
    """Copy shaders/ to tmp_path with `old` replaced by `new` (once) in `file`; return the copy of
    softmax.metal and the 1-based line of the planted change."""
    dst = tmp_path / "shaders"
    shutil.copytree(SHADERS, dst)
    text = (dst / file).read_text()
    assert text.count(old) >= 1, f"the planted pattern is not in {file}"
    index = text.index(old)
    (dst / file).write_text(text[:index] + new + text[index + len(old) :])
    return dst / "softmax.metal", text.count("\n", 0, index) + 1


def _run_softmax(tmp_path, source, rows, cols):
    """softmax over the planted copy, through the launch plans (backends/metal.py), under the checker."""
    x = torch.randn(rows, cols)
    with metal_library.shaders_from(source.parent), runner.checking():
        return metal.softmax_forward(x)


def _findings(exc_info) -> list[str]:
    return [str(f) for f in exc_info.value.findings]


def test_unmodified_kernels_are_clean(tmp_path):
    source, _ = _plant(tmp_path, "softmax.metal", "", "")
    y = _run_softmax(tmp_path, source, 3, 1000)
    assert torch.isfinite(y).all()


def test_missing_barrier_is_a_race(tmp_path):
    # threadgroup_sum without the barrier between writing the per-SIMD-group partials and reading them.
    old = """    scratch[simd_group] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return Op::simd"""
    new = """    scratch[simd_group] = v;
  }

  return Op::simd"""
    source, line = _plant(tmp_path, "reduce.h", old, new)
    with pytest.raises(runner.KernelCheckError) as exc:
        _run_softmax(tmp_path, source, 2, 1000)
    read_line = line + 3
    assert any(f"reduce.h:{read_line}:" in f and ("race" in f or "uninitialised" in f) for f in _findings(exc)), (
        _findings(exc)
    )


def test_off_by_one_read_is_out_of_bounds(tmp_path):
    old = "      v[i] = c0 + i < cols ? float(row[c0 + i]) : fill;"
    new = "      v[i] = c0 + i <= cols ? float(row[c0 + i]) : fill;"
    source, line = _plant(tmp_path, "row_io.h", old, new)
    with pytest.raises(runner.KernelCheckError) as exc:
        _run_softmax(tmp_path, source, 2, 1001)  # the tail thread of the last row reads element 1001
    assert any(f"row_io.h:{line}: device-out-of-bounds" in f for f in _findings(exc)), _findings(exc)


def test_uninitialised_scratch_read(tmp_path):
    # Reading all 32 scratch slots although only n_simd of them were written.
    old = "  return Op::simd(lane < n_simd ? scratch[lane] : Op::identity());"
    new = "  return Op::simd(scratch[lane]);"
    source, line = _plant(tmp_path, "reduce.h", old, new)
    with pytest.raises(runner.KernelCheckError) as exc:
        _run_softmax(tmp_path, source, 2, 1000)  # 256 threads: 8 of 32 slots written
    assert any(f"reduce.h:{line}: uninitialised-read" in f for f in _findings(exc)), _findings(exc)


def test_uninitialised_scratch_shows_as_nan_without_the_checker(tmp_path):
    old = "  return Op::simd(lane < n_simd ? scratch[lane] : Op::identity());"
    source, _ = _plant(tmp_path, "reduce.h", old, "  return Op::simd(scratch[lane]);")
    x = torch.randn(2, 1000)
    y = torch.zeros_like(x)  # not the plans' NaN-poisoned output: the NaN must come from the kernel
    with metal_library.shaders_from(source.parent):
        launcher = metal.Launcher("softmax", x.device)
        pipeline, groups, threads, rows_per_group = metal.plan_rows(launcher, "softmax_forward", x.dtype, 2, 1000)
        params = metal._row_params("softmax", 2, 1000, 1000, 0, rows_per_group)
        launcher.encode(metal_library.Dispatch(pipeline, (x, y, params), groups, threads))
    assert torch.isnan(y).all()  # threadgroup memory starts poisoned


def test_missing_restaging_barrier_in_the_lora_kernel_is_a_race(tmp_path):
    # The LoRA reduce kernel (h = x·Aᵀ) without the barrier between using a staged chunk and staging the next:
    # fast threads restage the A tile while slow ones still read it.
    old = """    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are restaged by the next chunk"""
    _, line = _plant(tmp_path, "lora_linear.metal", old, "")
    tokens, fin, fout, r = 20, 70, 30, 8  # 70 inputs: several staged chunks of reduce_tile columns
    x, w, a, b = torch.randn(tokens, fin), torch.randn(fout, fin), torch.randn(r, fin), torch.randn(fout, r)
    with pytest.raises(runner.KernelCheckError) as exc, runner.checking():
        with metal_library.shaders_from(tmp_path / "shaders"):
            metal.lora_forward(x, w, None, a, b, 1.0, None)
    text = (tmp_path / "shaders" / "lora_linear.metal").read_text().splitlines()
    # Reported where a thread restages a tile element that another thread read since the last barrier, or reads
    # one that another thread has already restaged.
    use_lines = [
        i + 1 for i, ln in enumerate(text) if "factor_tile[e] = v;" in ln or "simdgroup_load(f_tile, factor_tile" in ln
    ]
    assert len(use_lines) == 2 and all(u < line for u in use_lines)
    assert any(f"lora_linear.metal:{u}: threadgroup-race" in f for u in use_lines for f in _findings(exc)), _findings(
        exc
    )


def _cross_entropy_in_place(shaders: Path, rows, vocab, target, checked):
    """The cross-entropy kernel of `shaders` with the gradient written over the logits (one storage bound at buffers
    0 and 4, as the in-place chunked loss binds it); returns (logits after, loss)."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3))
    with metal_library.shaders_from(shaders), runner.checking(checked):
        loss, _ = metal.cross_entropy_rows(logits, target, -100, 0.0, 0.0, torch.ones(rows), True)
    return logits, loss


def _gradient_store_line(source: Path) -> int:
    """The 1-based line of the cross-entropy kernel's gradient store (pass 2) in `source`."""
    return 1 + next(i for i, ln in enumerate(source.read_text().splitlines()) if "gr[c] = static_cast<T>(g);" in ln)


def test_in_place_gradient_race_in_the_cross_entropy_kernel(tmp_path):
    # Thread 0 re-reading z[target] for the loss after the reductions, instead of reducing what pass 1 read: with the
    # gradient written over the logits, the thread that owns column `target` may already have overwritten it in pass 2
    # (no barrier between). A race on the GPU whatever the order the harness runs the SIMD-groups in: the checker
    # tracks device memory between barriers, and the storage bound twice is one copy, as on the GPU.
    old = "      row_loss = lse - (1.0f - eps) * z_target;"
    new = "      row_loss = lse - (1.0f - eps) * capped_logit(float(zr[t]), p.softcap);"
    _, line = _plant(tmp_path, "cross_entropy.metal", old, new)
    source = tmp_path / "shaders" / "cross_entropy.metal"
    target = torch.tensor([5, 517, 999], dtype=torch.int32)  # columns owned by threads other than thread 0
    with pytest.raises(runner.KernelCheckError) as exc:
        _cross_entropy_in_place(source.parent, 3, 1000, target, checked=True)
    # Reported at the second access of the pair: thread 0's read (planted) or the owner's overwrite in pass 2.
    store = _gradient_store_line(source)
    assert any(f"cross_entropy.metal:{n}: device-race" in f for n in (line, store) for f in _findings(exc)), _findings(
        exc
    )


def test_in_place_cross_entropy_kernel_is_clean(tmp_path):
    """The unmodified kernel in place, under the checker: no device-memory race (each thread re-reads and overwrites
    only its own columns, and the loss uses the reduced z[target]); the gradient and loss match torch's."""
    target = torch.tensor([5, 517, 999], dtype=torch.int32)
    logits0 = torch.randn(3, 1000, generator=torch.Generator().manual_seed(3))
    grad, loss = _cross_entropy_in_place(SHADERS, 3, 1000, target, checked=True)
    want = torch.nn.functional.cross_entropy(logits0.double(), target.long(), reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    want_grad = torch.softmax(logits0.double(), -1) - torch.nn.functional.one_hot(target.long(), 1000).double()
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_device_race_between_threadgroups(tmp_path):
    """Two threadgroups of one dispatch writing the same device memory race (nothing orders threadgroups): the
    row kernel made to write every row's gradient into row 0."""
    old = "  device T* gr = grad + ulong(row) * p.vocab;"
    new = "  device T* gr = grad;"
    _plant(tmp_path, "cross_entropy.metal", old, new)
    source = tmp_path / "shaders" / "cross_entropy.metal"
    target = torch.tensor([5, 517, 999], dtype=torch.int32)
    with pytest.raises(runner.KernelCheckError) as exc:
        _cross_entropy_in_place(source.parent, 3, 1000, target, checked=True)
    store = _gradient_store_line(source)
    findings = _findings(exc)
    assert any(f"cross_entropy.metal:{store}: device-race" in f and "between threadgroups" in f for f in findings), (
        findings
    )


def test_barrier_in_divergent_code(tmp_path):
    old = """  v = Op::simd(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);"""
    new = """  v = Op::simd(v);
  if (simd_group == 0) { threadgroup_barrier(mem_flags::mem_threadgroup); }"""
    source, line = _plant(tmp_path, "reduce.h", old, new)
    with pytest.raises(runner.KernelCheckError) as exc:
        _run_softmax(tmp_path, source, 2, 1000)
    # Threads wait at two different barriers: the planted one and the next one of the function.
    assert any(f"reduce.h:{line + 1} " in f and "divergent-barrier" in f for f in _findings(exc)), _findings(exc)


def _strict_pass_error(tmp_path, lint, file: str, old: str, new: str, shader: str = "softmax.metal") -> tuple[str, int]:
    """Plant `new` for `old` in a copy of `file`, check that the plain build accepts it, and return the strict pass's
    error on `shader` and the planted line."""
    source, line = _plant(tmp_path, file, old, new)
    compile_libraries(tmp_path / "build", [source.parent / shader])  # the plain build does not notice
    with pytest.raises(ShaderCompileError) as exc:
        lint(source.parent / shader, tmp_path / "lint")
    return str(exc.value), line


def test_address_space_mixup_fails_the_strict_pass(tmp_path):
    # threadgroup_sum taking a device pointer: a plain C++ build accepts the threadgroup scratch argument,
    # Apple's compiler (and our strict pass) does not.
    old = "inline float threadgroup_sum(float v, threadgroup float* scratch,"
    new = "inline float threadgroup_sum(float v, device float* scratch,"
    error, _ = _strict_pass_error(tmp_path, lint_address_spaces, "reduce.h", old, new)
    text = (tmp_path / "shaders" / "softmax.metal").read_text().splitlines()
    call_line = next(i + 1 for i, ln in enumerate(text) if "threadgroup_sum(s, scratch" in ln)
    assert f"softmax.metal:{call_line}:" in error and "address_space(3)" in error


@pytest.mark.parametrize("shader", [p.name for p in shader_paths()])
def test_our_shaders_pass_the_strict_address_space_pass(tmp_path, shader):
    lint_address_spaces(SHADERS / shader, tmp_path)


def test_implicit_conversion_to_bfloat_fails_the_strict_bfloat_pass(tmp_path):
    # The row stores rounding a float to T without a cast: clang's __bf16 (the plain build) converts implicitly,
    # Apple's compiler does not ("cannot initialize a variable of type 'bfloat' with an rvalue of type 'float'"), so
    # every bfloat kernel of the family would fail to compile on a Mac and fall back to the reference.
    old = "      row[c0 + i] = static_cast<T>(v[i]);"
    error, line = _strict_pass_error(tmp_path, lint_bfloat_conversions, "row_io.h", old, "      row[c0 + i] = v[i];")
    assert f"row_io.h:{line}:" in error
    # A bfloat initialised from a float expression (add + RMSNorm's residual sum), the form of Apple's error above.
    old = "const T sum = static_cast<T>(v[i] + float(residual[ulong(row) * p.residual_row_stride + c]));"
    new = "const T sum = v[i] + float(residual[ulong(row) * p.residual_row_stride + c]);"
    error, line = _strict_pass_error(
        tmp_path / "initialised", lint_bfloat_conversions, "rms_norm.metal", old, new, shader="rms_norm.metal"
    )
    assert f"rms_norm.metal:{line}:" in error


@pytest.mark.parametrize("shader", [p.name for p in shader_paths()])
def test_our_shaders_pass_the_strict_bfloat_pass(tmp_path, shader):
    lint_bfloat_conversions(SHADERS / shader, tmp_path)


# ---- containment: kernel bugs end as exceptions, never as a crash or a hang of the test process ----------------
BUGS = Path(__file__).parent / "emulator_shaders" / "planted_bugs.metal"


@pytest.fixture(scope="module")
def bugs(tmp_path_factory):
    return runner.Harness(compile_libraries(tmp_path_factory.mktemp("planted_bugs"), [BUGS]))


def _bug_line(marker: str) -> int:
    lines = BUGS.read_text().splitlines()
    return next(i + 1 for i, ln in enumerate(lines) if ln.rstrip().endswith(f"// BUG: {marker}"))


def _shifted(bugs, kernel: str, shift: int, out: torch.Tensor, n: int = 64):
    params = torch.tensor([shift], dtype=torch.int64)
    buffers = {0: out, 1: params} if kernel == "store_shifted" else {0: torch.ones(n), 1: out, 2: params}
    return bugs.dispatch(kernel, buffers, (1, 1, 1), (n, 1, 1))


def _still_works(bugs):
    """The process survived: the next dispatch runs and writes its output."""
    out = torch.full((64,), -1.0)
    _shifted(bugs, "store_shifted", 0, out)
    assert torch.equal(out, torch.arange(64, dtype=torch.float32))


@pytest.mark.parametrize("kernel", ["store_shifted", "load_shifted"])
@pytest.mark.parametrize("shift", [1, 1 << 18], ids=["one-past-the-end", "1MiB-away"])
def test_out_of_bounds_access_in_a_plain_run_is_an_exception(bugs, kernel, shift):
    # Thread 63 (one past the end) or every thread (1 MiB away) accesses outside the 64 floats of a buffer: a
    # fault in the plain build, reported at the kernel's line with the buffer it overran.
    out = torch.full((64,), -1.0)
    with runner.checking(False), pytest.raises(runner.KernelAbortedError) as exc:
        _shifted(bugs, kernel, shift, out)
    (f,) = exc.value.findings
    assert f.kind == "device-out-of-bounds" and f.kernel == kernel, f
    assert f.location.endswith(f"planted_bugs.metal:{_bug_line(kernel)}"), f
    assert f.buffer == 0 and "past its end" in f.message, f
    assert f"byte offset {256 + 4 * (shift - 1) if shift == 1 else 4 * shift}" in f.message, f
    assert ("store to" if kernel == "store_shifted" else "load from") in f.message, f
    assert torch.equal(out, torch.full((64,), -1.0))  # an abandoned dispatch writes nothing back
    _still_works(bugs)


def test_wild_pointer_in_a_plain_run_is_an_exception(bugs):
    # 2**62 bytes away: not even a valid address (a general-protection fault, which carries no address).
    with runner.checking(False), pytest.raises(runner.KernelAbortedError) as exc:
        _shifted(bugs, "store_shifted", 1 << 60, torch.empty(64))
    (f,) = exc.value.findings
    assert f.kind == "wild-access" and f.location.endswith(f"planted_bugs.metal:{_bug_line('store_shifted')}"), f
    _still_works(bugs)


def test_stores_next_to_a_buffer_that_do_not_fault_are_found_by_the_poison_check(bugs):
    # A plain run's copy ends at a guard page but starts mid-page: a store just before the start lands in poisoned
    # bytes, found after the dispatch (without the line: the checker has it).
    with runner.checking(False), pytest.raises(runner.KernelCheckError) as exc:
        _shifted(bugs, "store_shifted", -1, torch.empty(64))
    (f,) = exc.value.findings
    assert f.kind == "device-out-of-bounds" and f.buffer == 0 and "bytes -4..-1" in f.message, f
    assert "before its start" in f.message and "TORCH_METAL_FUSED_EMU_CHECK=1" in f.message, f
    # A 255-byte buffer bound as float*: the copy keeps the 4-byte alignment, so its end is 1 byte short of the
    # guard page; the last float store straddles the end.
    with runner.checking(False), pytest.raises(runner.KernelCheckError) as exc:
        _shifted(bugs, "store_shifted", 0, torch.zeros(255, dtype=torch.uint8))
    (f,) = exc.value.findings
    assert f.kind == "device-out-of-bounds" and f.buffer == 0 and "bytes 255..255" in f.message, f
    with runner.checking(), pytest.raises(runner.KernelCheckError) as exc:
        _shifted(bugs, "store_shifted", -1, torch.empty(64))
    assert any(f"planted_bugs.metal:{_bug_line('store_shifted')}: device-out-of-bounds" in s for s in _findings(exc))


@pytest.mark.parametrize(
    "shift", [1 << 18, 5000, -5000, 1 << 60], ids=["1MiB-away", "20KB-past-the-end", "20KB-before", "wild"]
)
def test_checker_reports_accesses_far_from_every_buffer(bugs, shift):
    # Accesses more than 4 KiB from every buffer used to go unreported by the checked build. Now every access
    # outside the memory a kernel may touch is reported, and one beyond the checked copy's slack is not executed.
    with runner.checking(), pytest.raises(runner.KernelAbortedError) as exc:
        _shifted(bugs, "store_shifted", shift, torch.empty(64))
    (f,) = exc.value.findings
    assert f.location.endswith(f"planted_bugs.metal:{_bug_line('store_shifted')}"), f
    if shift == 1 << 60:
        assert f.kind == "wild-access" and f.buffer is None, f
    else:
        assert f.kind == "device-out-of-bounds" and f.buffer == 0, f
        assert f"byte offset {4 * shift}" in f.message, f
    _still_works(bugs)


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [("barrier_not_reached", "barrier-not-reached"), ("barriers_diverge", "divergent-barrier")],
)
def test_barrier_some_threads_never_reach_is_an_exception_in_a_plain_run(bugs, kernel, kind):
    out = torch.full((64,), -1.0)
    with runner.checking(False), pytest.raises(runner.KernelAbortedError) as exc:
        bugs.dispatch(kernel, {0: out}, (1, 1, 1), (64, 1, 1))
    assert any(f"planted_bugs.metal:{_bug_line(kernel)}: {kind}" in s for s in _findings(exc)), _findings(exc)
    assert torch.equal(out, torch.full((64,), -1.0))
    _still_works(bugs)


@pytest.mark.parametrize("checked", [False, True], ids=["plain", "checked"])
@pytest.mark.parametrize("kernel", ["spin_before_barrier", "spin_in_simd_ops"])
def test_watchdog_ends_an_endless_dispatch(bugs, monkeypatch, kernel, checked):
    # Thread 0 loops for ever while the others wait at a barrier; or every thread loops through SIMD-group
    # operations. The watchdog (default 120 s) abandons the dispatch and names the loop.
    monkeypatch.setenv("TORCH_METAL_FUSED_EMU_TIMEOUT_S", "0.3")
    start = time.monotonic()
    with runner.checking(checked), pytest.raises(runner.KernelAbortedError) as exc:
        bugs.dispatch(kernel, {0: torch.ones(64), 1: torch.zeros(64)}, (1, 1, 1), (64, 1, 1))
    assert time.monotonic() - start < 10
    (f,) = exc.value.findings
    line = _bug_line(kernel)
    assert f.kind == "watchdog-timeout" and f.kernel == kernel and "longer than 0.3 s" in f.message, f
    assert any(f.location.endswith(f"planted_bugs.metal:{n}") for n in (line, line + 1, line + 2)), f  # the loop
    _still_works(bugs)  # with the short timeout still set: a normal dispatch is not cut short


def test_the_watchdog_outlives_many_harness_libraries(bugs, tmp_path):
    """A process loads many harness libraries (every source the compile_shader stand-in builds, plain and checked, and
    the tests' planted copies): more than there are real-time signals. The watchdog must still end an endless dispatch
    after 25 other libraries have dispatched (each library once claimed a signal of its own, and the 23rd found none:
    a hang). In a subprocess, so that a regression fails instead of hanging the suite."""
    script = f"""
import shutil, sys, torch
from pathlib import Path
from torch_metal_fused.emulator import runner
from torch_metal_fused.emulator.build import Libraries
plain = Path({str(bugs.libs.plain)!r})
harnesses = []
for i in range(25):
    copy = Path({str(tmp_path)!r}) / f"copy{{i}}.so"
    shutil.copy(plain, copy)
    h = runner.Harness(Libraries(copy, copy, plain.parent))
    out = torch.zeros(64)
    h.dispatch("store_shifted", {{0: out, 1: torch.tensor([0])}}, (1, 1, 1), (64, 1, 1))
    harnesses.append(h)
try:
    runner.Harness(Libraries(plain, plain, plain.parent)).dispatch(
        "spin_before_barrier", {{0: torch.ones(64), 1: torch.zeros(64)}}, (1, 1, 1), (64, 1, 1))
except runner.KernelAbortedError as exc:
    print("aborted:", exc.findings[0].kind)
"""
    env = {**os.environ, "TORCH_METAL_FUSED_EMU_TIMEOUT_S": "0.3"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert "aborted: watchdog-timeout" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("symbolized", "expected"),
    [("k.metal:66", "k.metal:66"), ("k.metal:0", "k.metal:65"), ("lib.so+0x40", "k.metal:65")],
    ids=["pc-line", "pc-line-0", "pc-unresolved"],
)
def test_a_watchdog_pc_without_a_line_falls_back_to_the_threads_last_call(symbolized, expected):
    # A tick can land in compiler-generated code (line 0) of a loop of SIMD-group operations; the runtime then sends
    # the thread's latest SIMD-group call's line beside the pc (CI once reported planted_bugs.metal:0).
    report = "dispatch\tk\t1,1,1\t64,1,1\t0\nerror\twatchdog-timeout\tk.metal\t65\t4096\t1\tran too long\n"
    (d,) = runner._parse(report, lambda pc: symbolized, [])
    assert d.findings[0].location == expected
    # A pc alone is symbolized as it comes; a file:line alone is kept.
    (d,) = runner._parse(report.replace("k.metal\t65", "\t0"), lambda pc: symbolized, [])
    assert d.findings[0].location == symbolized
    (d,) = runner._parse(report.replace("\t4096\t", "\t0\t"), lambda pc: symbolized, [])
    assert d.findings[0].location == "k.metal:65"


@pytest.mark.parametrize("checked", [False, True], ids=["plain", "checked"])
def test_the_watchdog_report_carries_the_threads_last_call(bugs, monkeypatch, checked):
    # The runtime's half of the fallback above: with every pc unsymbolizable (as a tick on a line-0 instruction is),
    # the report still names the loop, from the SIMD-group operation the runtime sends beside the pc.
    monkeypatch.setenv("TORCH_METAL_FUSED_EMU_TIMEOUT_S", "0.3")
    monkeypatch.setattr(runner, "symbolize", lambda library, pc: f"{library.name}+{pc:#x}")
    with runner.checking(checked), pytest.raises(runner.KernelAbortedError) as exc:
        bugs.dispatch("spin_in_simd_ops", {0: torch.ones(64), 1: torch.zeros(64)}, (1, 1, 1), (64, 1, 1))
    (f,) = exc.value.findings
    line = _bug_line("spin_in_simd_ops")
    assert f.kind == "watchdog-timeout" and f.location.endswith(f"planted_bugs.metal:{line}"), f


def test_halo_read_overwritten_by_the_next_threadgroup_is_a_race(bugs):
    # Threadgroup 0 reads row 1, threadgroup 1 reads and then overwrites it: a race whichever threadgroup runs first
    # on the GPU (the shadow remembers that several threadgroups read the row).
    x = torch.arange(96, dtype=torch.float32)
    with pytest.raises(runner.KernelCheckError) as exc, runner.checking():
        bugs.dispatch("halo_in_place", {0: x}, (2, 1, 1), (32, 1, 1))
    line = _bug_line("halo_in_place")
    assert any(f"planted_bugs.metal:{line}: device-race" in f and "another threadgroup" in f for f in _findings(exc)), (
        _findings(exc)
    )


@pytest.mark.parametrize("device_barrier", [0, 1], ids=["mem_threadgroup", "mem_device"])
def test_device_memory_needs_a_mem_device_barrier(bugs, device_barrier):
    # A neighbour's device-memory write read after a barrier: ordered by mem_flags::mem_device only.
    x, out = torch.zeros(64), torch.zeros(64)
    buffers = {0: x, 1: out, 2: torch.tensor([device_barrier], dtype=torch.int32)}
    if device_barrier:
        with runner.checking():
            bugs.dispatch("neighbour_after_threadgroup_barrier", buffers, (1, 1, 1), (64, 1, 1))
        assert torch.equal(out, ((torch.arange(64) + 1) % 64).float())
        return
    with pytest.raises(runner.KernelCheckError) as exc, runner.checking():
        bugs.dispatch("neighbour_after_threadgroup_barrier", buffers, (1, 1, 1), (64, 1, 1))
    line = _bug_line("neighbour_after_threadgroup_barrier")
    assert any(f"planted_bugs.metal:{line}: device-race" in f and "mem_device" in f for f in _findings(exc)), _findings(
        exc
    )


# (memory, barrier, mask, ordered): which barrier orders an exchange between thread tid and thread tid ^ mask (mask 1:
# the same SIMD-group; 32: the other one). Barriers: simdgroup_barrier with mem_none / mem_device / mem_threadgroup,
# threadgroup_barrier with mem_device / mem_threadgroup, and a simd_sum (planted_bugs.metal: exchange_after_barrier).
SIMD_NONE, SIMD_DEVICE, SIMD_TG, TG_DEVICE, TG_TG, SIMD_SUM = range(6)
EXCHANGES = [
    ("threadgroup", SIMD_TG, 1, True),
    ("threadgroup", SIMD_NONE, 1, False),
    ("threadgroup", SIMD_DEVICE, 1, False),
    ("threadgroup", SIMD_TG, 32, False),  # a simdgroup_barrier orders its own SIMD-group only
    ("threadgroup", TG_DEVICE, 1, False),  # mem_device does not order threadgroup memory
    ("threadgroup", TG_TG, 32, True),
    ("threadgroup", SIMD_SUM, 1, False),  # lanes meeting at a reduction order no memory
    ("device", SIMD_DEVICE, 1, True),
    ("device", SIMD_TG, 1, False),
    ("device", SIMD_DEVICE, 32, False),
    ("device", TG_DEVICE, 32, True),
    ("device", TG_TG, 1, False),
    ("device", SIMD_SUM, 1, False),
]


BARRIER_NAMES = ["simd-none", "simd-device", "simd-threadgroup", "tg-device", "tg-threadgroup", "simd-sum"]


@pytest.mark.parametrize(
    ("memory", "barrier", "mask", "ordered"),
    EXCHANGES,
    ids=[f"{m}-{BARRIER_NAMES[b]}-{'same' if k == 1 else 'other'}-simdgroup" for m, b, k, _ in EXCHANGES],
)
def test_barriers_order_what_their_mem_flags_name(bugs, memory, barrier, mask, ordered):
    # Metal's memory model: a barrier orders the kinds of memory its mem_flags name, a simdgroup_barrier only between
    # the lanes of its SIMD-group. The checker must report exactly the unordered exchanges.
    x, out = torch.zeros(64), torch.full((64,), -1.0)
    params = [torch.tensor([v], dtype=torch.int32) for v in (int(memory == "device"), barrier, mask)]
    buffers = {0: x, 1: out, 2: params[0], 3: params[1], 4: params[2]}
    if ordered:
        with runner.checking():
            bugs.dispatch("exchange_after_barrier", buffers, (1, 1, 1), (64, 1, 1), {0: 64 * 4})
        assert torch.equal(out, (torch.arange(64) ^ mask).float())
        return
    with pytest.raises(runner.KernelCheckError) as exc, runner.checking():
        bugs.dispatch("exchange_after_barrier", buffers, (1, 1, 1), (64, 1, 1), {0: 64 * 4})
    kind = "device-race" if memory == "device" else "threadgroup-race"
    site = f"planted_bugs.metal:{_bug_line('exchange_after_barrier')}: {kind}"
    assert any(site in f for f in _findings(exc)), _findings(exc)


@pytest.mark.parametrize("checked", [False, True], ids=["plain", "checked"])
def test_a_storage_bound_twice_is_one_buffer(bugs, checked):
    # Writes through one binding are seen through the other (as on the GPU); the traffic rows count the loads on the
    # binding read and the stores on the binding written.
    x, seen = torch.zeros(64), torch.zeros(64)
    buffers = {0: x, 1: x, 2: seen}
    if checked:
        with runner.checking():
            (d,) = bugs.dispatch("write_then_read_an_alias", buffers, (1, 1, 1), (64, 1, 1))
        assert d.traffic[0] == (256, 0) and d.traffic[1] == (0, 256), d.traffic
    else:
        bugs.dispatch("write_then_read_an_alias", buffers, (1, 1, 1), (64, 1, 1))
    assert torch.equal(seen, torch.full((64,), 7.0)) and torch.equal(x, torch.full((64,), 7.0))


def test_watchdog_and_schedule_settings_are_validated(bugs, monkeypatch):
    monkeypatch.setenv("TORCH_METAL_FUSED_EMU_SEED", "often")
    with pytest.raises(RuntimeError, match="TORCH_METAL_FUSED_EMU_SEED=often is not an integer"):
        _still_works(bugs)
    monkeypatch.setenv("TORCH_METAL_FUSED_EMU_SEED", "7")
    monkeypatch.setenv("TORCH_METAL_FUSED_EMU_TIMEOUT_S", "soon")
    with pytest.raises(RuntimeError, match="TORCH_METAL_FUSED_EMU_TIMEOUT_S=soon"):
        _still_works(bugs)
    monkeypatch.setenv("TORCH_METAL_FUSED_EMU_TIMEOUT_S", "0")  # no watchdog
    _still_works(bugs)


@pytest.mark.parametrize(
    ("setting", "values"),
    [
        (_config.EMU_SEED, ["7", "0x1f", "010", "often", "-1", "+5", " 5", "5 ", "1.5"]),
        (_config.EMU_TIMEOUT_S, ["100", "1e3", ".5e3", "100.", "soon", "-1", "+100", " 100", "inf", "nan", "0x10"]),
    ],
    ids=lambda v: v.name if isinstance(v, _config.Setting) else None,
)
def test_the_harness_takes_the_values_config_takes(bugs, monkeypatch, setting, values):
    """The C++ reader (csrc/emu/runtime.cpp) and _config's parser, which checks the value at import, agree."""
    for value in values:
        monkeypatch.setenv(setting.name, value)
        try:
            setting.value()
        except _config.ConfigError:
            with pytest.raises(RuntimeError, match=re.escape(f"{setting.name}={value}")):
                _still_works(bugs)
        else:
            _still_works(bugs)


def test_race_that_index_order_hides_shows_in_a_plain_run(bugs, monkeypatch):
    # Later SIMD-groups read what SIMD-group 0 wrote, without a barrier: right only if SIMD-group 0 runs first.
    groups, threads = 16, 64
    expected = (torch.arange(threads) % 32 + 1).float().repeat(groups)

    def run(seed: str | None) -> torch.Tensor:
        if seed is None:
            monkeypatch.delenv("TORCH_METAL_FUSED_EMU_SEED", raising=False)
        else:
            monkeypatch.setenv("TORCH_METAL_FUSED_EMU_SEED", seed)
        out = torch.zeros(groups * threads)
        with runner.checking(False):
            bugs.dispatch("read_without_barrier", {0: out}, (groups, 1, 1), (threads, 1, 1))
        return out

    assert torch.equal(run("0"), expected)  # index order: the schedule before seeds, which hid the race
    for seed in (None, "1", "2", "12345"):  # the default, and others: every order differs per threadgroup
        out = run(seed)
        assert not torch.equal(out, expected) and torch.isnan(out).any(), seed
        assert torch.equal(run(seed).nan_to_num(-1), out.nan_to_num(-1)), seed  # reproducible
    for seed in ("0", "1"):  # the checker finds it whatever the order
        monkeypatch.setenv("TORCH_METAL_FUSED_EMU_SEED", seed)
        with runner.checking(), pytest.raises(runner.KernelCheckError) as exc:
            bugs.dispatch("read_without_barrier", {0: torch.zeros(groups * threads)}, (groups, 1, 1), (threads, 1, 1))
        line = _bug_line("read_without_barrier")
        kinds = ("threadgroup-race", "uninitialised")
        assert any(f"planted_bugs.metal:{line}: {k}" in s for s in _findings(exc) for k in kinds), _findings(exc)
