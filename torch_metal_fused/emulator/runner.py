"""Calls into the harness libraries: runs a launch function on tensors' storage, parses its dispatch
report, symbolizes checker findings to `.metal` file:line, and records per-dispatch device traffic."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from torch_metal_fused.emulator.build import Libraries, ensure_built

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CHECK_ENV = "TORCH_METAL_FUSED_EMU_CHECK"


class TensorArg(ctypes.Structure):
    """A tensor's storage as a Metal buffer binding: storage start, storage size, byte offset."""

    _fields_ = [("base", ctypes.c_void_p), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_uint64)]

    @classmethod
    def of(cls, t: torch.Tensor | None) -> TensorArg:
        if t is None:
            return cls(None, 0, 0)
        storage = t.untyped_storage()
        return cls(storage.data_ptr(), storage.nbytes(), t.storage_offset() * t.element_size())


class KernelCheckError(AssertionError):
    """The checker found a bug in a kernel (race, uninitialised read, out-of-bounds access, bad barrier)."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("Metal kernel checker:\n" + "\n".join(f"  {f}" for f in findings))


@dataclass
class Finding:
    kind: str
    location: str  # file.metal:line (or "?")
    message: str
    count: int
    kernel: str

    def __str__(self) -> str:
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"{self.location}: {self.kind}: {self.message} [{self.kernel}]{times}"


@dataclass
class Dispatch:
    kernel: str
    groups: tuple[int, int, int]
    threads: tuple[int, int, int]
    threadgroup_memory: int
    traffic: dict[int, tuple[int, int]] = field(default_factory=dict)  # buffer index -> (read, written) bytes
    findings: list[Finding] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return sum(r for r, _ in self.traffic.values())

    @property
    def bytes_written(self) -> int:
        return sum(w for _, w in self.traffic.values())


class _State(threading.local):
    def __init__(self) -> None:
        self.checking = False
        self.recorders: list[list[Dispatch]] = []
        self.max_threads = 1024


_state = _State()


@functools.lru_cache(maxsize=None)
def libraries() -> Libraries:
    return ensure_built()


@functools.lru_cache(maxsize=None)
def _library(checked: bool) -> ctypes.CDLL:
    libs = libraries()
    lib = ctypes.CDLL(str(libs.checked if checked else libs.plain))
    lib.tmf_emu_kernel_names.restype = ctypes.c_char_p
    lib.tmf_emu_rms_norm_backward_groups.restype = ctypes.c_uint32
    lib.tmf_emu_rms_norm_backward_groups.argtypes = [ctypes.c_uint64]
    return lib


def kernel_names() -> list[str]:
    return _library(False).tmf_emu_kernel_names().decode().split()


def rms_norm_backward_groups(rows: int) -> int:
    return int(_library(False).tmf_emu_rms_norm_backward_groups(rows))


def is_checking() -> bool:
    return _state.checking or os.environ.get(CHECK_ENV, "") not in ("", "0")


@contextlib.contextmanager
def checking(enabled: bool = True) -> Iterator[None]:
    """Run kernels with the checker (instrumented build): findings raise KernelCheckError."""
    old, _state.checking = _state.checking, enabled
    try:
        yield
    finally:
        _state.checking = old


@contextlib.contextmanager
def record() -> Iterator[list[Dispatch]]:
    """Collect every dispatch made inside the block, with its device traffic (runs the checked build)."""
    dispatches: list[Dispatch] = []
    _state.recorders.append(dispatches)
    try:
        with checking():
            yield dispatches
    finally:
        _state.recorders.remove(dispatches)


@contextlib.contextmanager
def pipeline_max_threads(n: int) -> Iterator[None]:
    """Emulate pipelines whose maxTotalThreadsPerThreadgroup is `n` (register pressure on a real GPU)."""
    old, _state.max_threads = _state.max_threads, n
    try:
        yield
    finally:
        _state.max_threads = old


def _arg(value):
    if isinstance(value, TensorArg):
        return value
    if isinstance(value, torch.Tensor) or value is None:
        return TensorArg.of(value)
    if isinstance(value, float):
        return ctypes.c_float(value)
    return ctypes.c_uint64(int(value))


def launch(entry: str, dtype: torch.dtype, *args) -> list[Dispatch]:
    """Run `tmf_emu_<entry>` (a shared launch function) with tensors / integers / floats as its arguments."""
    checked = is_checking()
    lib = _library(checked)
    fn = getattr(lib, f"tmf_emu_{entry}")
    fn.restype = ctypes.c_char_p
    report = fn(ctypes.c_int(int(checked)), ctypes.c_uint32(_state.max_threads), ctypes.c_int(DTYPE_CODES[dtype]),
                *(_arg(a) for a in args)).decode()
    dispatches = _parse(report, checked)
    for rec in _state.recorders:
        rec.extend(dispatches)
    findings = [f for d in dispatches for f in d.findings]
    if findings:
        raise KernelCheckError(findings)
    return dispatches


def _parse(report: str, checked: bool) -> list[Dispatch]:
    dispatches: list[Dispatch] = []
    for line in report.splitlines():
        parts = line.split("\t")
        if parts[0] == "exception":
            raise RuntimeError(f"Metal launch failed: {parts[1]}")
        if parts[0] == "dispatch":
            groups = tuple(int(v) for v in parts[2].split(","))
            threads = tuple(int(v) for v in parts[3].split(","))
            dispatches.append(Dispatch(parts[1], groups, threads, int(parts[4])))
        elif parts[0] == "traffic":
            dispatches[-1].traffic[int(parts[1])] = (int(parts[2]), int(parts[3]))
        elif parts[0] == "error":
            kind, file, line_no, pc, count, message = parts[1:7]
            location = f"{file}:{line_no}" if file else symbolize(int(pc), checked)
            dispatches[-1].findings.append(Finding(kind, location, message, int(count), dispatches[-1].kernel))
    return dispatches


@functools.lru_cache(maxsize=4096)
def symbolize(pc_offset: int, checked: bool = True) -> str:
    """file.metal:line of an instruction in the shader library (via llvm-symbolizer)."""
    if pc_offset == 0:
        return "?"
    libs = libraries()
    lib = libs.checked if checked else libs.plain
    tool = next((shutil.which(n) for n in ("llvm-symbolizer-19", "llvm-symbolizer", "addr2line") if shutil.which(n)),
                None)
    if tool is None:
        return f"{lib.name}+{pc_offset:#x}"
    # The return address points after the call to the load/store callback: step back one byte.
    addr = hex(pc_offset - 1)
    if tool.endswith("addr2line"):
        cmd = [tool, "-e", str(lib), "-i", addr]
    else:
        cmd = [tool, f"--obj={lib}", "--no-inlines" if False else "--inlines", addr]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")
    locations = [ln.strip() for ln in out if ".metal:" in ln or ".h:" in ln]
    if not locations:
        return f"{lib.name}+{pc_offset:#x}"
    loc = locations[0]
    # llvm-symbolizer prints path:line:column; keep path:line.
    path, _, rest = loc.rpartition(".metal:")
    if path:
        return f"{path}.metal:{rest.split(':')[0]}"
    return loc
