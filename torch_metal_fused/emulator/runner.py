"""Calls into the harness libraries: runs a dispatch on tensors' storage (as the compile_shader stand-in encodes it,
or raw), parses its dispatch report, symbolizes checker findings to `.metal` file:line, and records per-dispatch
device traffic."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from torch_metal_fused import _config
from torch_metal_fused._errors import KernelUnavailable
from torch_metal_fused.emulator.build import Libraries, ensure_built

CHECK_ENV = _config.EMU_CHECK.name
# Failures the harness emulates, so the fallback path runs end to end on Linux: a comma-separated list of
# compile:<family>, pipeline:<family or kernel>, encode:<kernel>, max_threads:<family or kernel>=<n>,
# simd_width:<family or kernel>=<n>, no_bfloat (_config.FAULT_KINDS; csrc/emu/include/tmf_emu/emu_encoder.h).
FAULTS_ENV = _config.EMU_FAULTS.name


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


class KernelAbortedError(KernelCheckError):
    """The harness abandoned a dispatch: a fault (an out-of-bounds access in a plain run), the watchdog
    (TORCH_METAL_FUSED_EMU_TIMEOUT_S), an access the checker stopped, or threads that could not proceed (a barrier
    not reached by all). Nothing was written to its buffers, and the launch's later dispatches did not run."""


@dataclass
class Finding:
    kind: str
    location: str  # file.metal:line (or "?")
    message: str
    count: int
    kernel: str
    buffer: int | None = None  # the [[buffer(n)]] index of an out-of-bounds access, when known

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
    aborted: str = ""  # the kind of finding that made the harness abandon the dispatch ("" if it ran to its end)

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
        self.faults: str | None = None  # None: read FAULTS_ENV
        self.gpu_cores: int | None = None  # None: the launch plans' stand-in (backends.metal.STAND_IN_GPU_CORES)


_state = _State()
# Every kernel name dispatched since the last take_dispatched_kernels(), from any thread (the test suite's
# coverage rule reads it after each test: tests/conftest.py).
_dispatched_kernels: set[str] = set()


class Harness:
    """A pair of compiled harness libraries (plain and checked) and calls into them."""

    def __init__(self, libs: Libraries) -> None:
        self.libs = libs
        self._loaded: dict[bool, ctypes.CDLL] = {}
        self._names: list[str] | None = None

    def library(self, checked: bool) -> ctypes.CDLL:
        if checked not in self._loaded:
            lib = ctypes.CDLL(str(self.libs.checked if checked else self.libs.plain))
            lib.tmf_emu_kernel_names.restype = ctypes.c_char_p
            lib.tmf_emu_set_faults.argtypes = [ctypes.c_char_p]
            self._loaded[checked] = lib
        return self._loaded[checked]

    @staticmethod
    def _configure(lib: ctypes.CDLL) -> None:
        lib.tmf_emu_set_faults(active_faults().encode())

    def kernel_names(self) -> list[str]:
        if self._names is None:  # a library's kernels never change
            self._names = self.library(False).tmf_emu_kernel_names().decode().split()
        return list(self._names)

    def pipeline_info(self, kernel: str) -> dict[str, int]:
        """The kernel's pipeline limits as the launch code sees them (faults applied), or KernelUnavailable."""
        lib = self.library(False)
        self._configure(lib)
        fn = lib.tmf_emu_pipeline_info
        fn.restype = ctypes.c_char_p
        parts = fn(ctypes.c_uint32(_state.max_threads), kernel.encode()).decode().rstrip("\n").split("\t")
        if parts[0] == "unavailable":
            raise KernelUnavailable(parts[1], parts[2], parts[3])
        return {"max_threads": int(parts[1]), "execution_width": int(parts[2])}

    def encode(
        self,
        kernel: str,
        buffers: dict[int, torch.Tensor],
        constants: dict[int, bytes],
        groups: tuple[int, int, int],
        threads: tuple[int, int, int],
    ) -> list[Dispatch]:
        """One dispatch as torch.mps.compile_shader encodes it: the kernel's pipeline (faults and thread limit
        applied), tensors bound as buffers, constant data set with setBytes (see tmf_emu_encode)."""
        c_idx = list(constants)
        data = [ctypes.create_string_buffer(constants[i], len(constants[i])) for i in c_idx]
        extra = (
            len(c_idx),
            (ctypes.c_int * len(c_idx))(*c_idx),
            (ctypes.c_void_p * len(c_idx))(*(ctypes.cast(d, ctypes.c_void_p) for d in data)),
            (ctypes.c_uint64 * len(c_idx))(*(len(constants[i]) for i in c_idx)),
        )
        return self._call("tmf_emu_encode", kernel, buffers, extra, groups, threads, configure=True)

    def dispatch(
        self,
        kernel: str,
        buffers: dict[int, torch.Tensor],
        groups: tuple[int, int, int],
        threads: tuple[int, int, int],
        threadgroup_memory: dict[int, int] | None = None,
    ) -> list[Dispatch]:
        """One raw dispatch of `kernel` (for the harness's own tests)."""
        tg = threadgroup_memory or {}
        extra = (len(tg), (ctypes.c_int * len(tg))(*tg), (ctypes.c_uint64 * len(tg))(*tg.values()))
        return self._call("tmf_emu_dispatch", kernel, buffers, extra, groups, threads, configure=False)

    def _call(self, entry: str, kernel: str, buffers: dict, extra: tuple, groups, threads, configure: bool):
        """A dispatch entry point: (checking, thread limit, kernel, buffers by index, `extra`, grid, group)."""
        checked = is_checking()
        lib = self.library(checked)
        if configure:
            self._configure(lib)
        fn = getattr(lib, entry)
        fn.restype = ctypes.c_char_p
        idx = list(buffers)
        report = fn(
            ctypes.c_int(int(checked)),
            ctypes.c_uint32(_state.max_threads),
            kernel.encode(),
            len(idx),
            (ctypes.c_int * len(idx))(*idx),
            (TensorArg * len(idx))(*(TensorArg.of(buffers[i]) for i in idx)),
            *extra,
            (ctypes.c_uint32 * 3)(*groups),
            (ctypes.c_uint32 * 3)(*threads),
        )
        return self._finish(report.decode(), checked)

    def _finish(self, report: str, checked: bool) -> list[Dispatch]:
        unavailable: list[KernelUnavailable] = []
        dispatches = _parse(
            report, lambda pc: symbolize(self.libs.checked if checked else self.libs.plain, pc), unavailable
        )
        for rec in _state.recorders:
            rec.extend(dispatches)
        _dispatched_kernels.update(d.kernel for d in dispatches)
        if unavailable:  # after recording what was dispatched before it (there should be nothing)
            raise unavailable[0]
        findings = [f for d in dispatches for f in d.findings]
        if findings:
            raise (KernelAbortedError if any(d.aborted for d in dispatches) else KernelCheckError)(findings)
        return dispatches


@functools.cache
def default_harness() -> Harness:
    """The harness built from this repository's shaders/."""
    return Harness(ensure_built())


def libraries() -> Libraries:
    return default_harness().libs


def kernel_names() -> list[str]:
    return default_harness().kernel_names()


def pipeline_info(kernel: str) -> dict[str, int]:
    return default_harness().pipeline_info(kernel)


def current_gpu_cores() -> int | None:
    """The GPU core count launch plans see in the harness: the innermost gpu_cores() block's, else None (the plans'
    stand-in, backends.metal.STAND_IN_GPU_CORES: the harness does not import the launch code above it)."""
    return _state.gpu_cores


def lora_use_merged_weight(tokens: int, in_features: int, has_dropout: bool) -> bool:
    """The CUDA backend's choice of the LoRA merged-weight route (tmf::launch::lora_use_merged_weight; the Metal
    plans' is backends/metal.py's, tested to agree)."""
    fn = default_harness().library(False).tmf_emu_lora_use_merged_weight
    fn.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
    return bool(fn(tokens, in_features, int(has_dropout)))


def lora_kconcat_gemm_for(rows: int, cols: int) -> str:
    """The shared launch rule's configuration of the CUDA K-concatenated GEMM for a rows x cols output
    (tmf::launch::lora_kconcat_gemm_for): "cooperative" or "pingpong"."""
    fn = default_harness().library(False).tmf_emu_lora_kconcat_gemm_is_pingpong
    fn.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    return "pingpong" if fn(rows, cols) else "cooperative"


def lora_kconcat_fills_device(tokens: int, in_features: int, out_features: int, sms: int) -> bool:
    """Whether the CUDA LoRA op takes its K-concatenated GEMM by default (tmf::launch::lora_kconcat_fills_device)."""
    fn = default_harness().library(False).tmf_emu_lora_kconcat_fills_device
    fn.argtypes = [ctypes.c_uint64] * 4
    return bool(fn(tokens, in_features, out_features, sms))


def is_checking() -> bool:
    return _state.checking or _config.emu_check()


@contextlib.contextmanager
def _overriding(name: str, value) -> Iterator[None]:
    """Set a per-thread harness setting for the block."""
    old = getattr(_state, name)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, old)


def checking(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Run kernels with the checker (instrumented build): findings raise KernelCheckError."""
    return _overriding("checking", enabled)


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


def take_dispatched_kernels() -> set[str]:
    """The kernels dispatched since the last call (and forget them)."""
    taken = set(_dispatched_kernels)
    _dispatched_kernels.clear()
    return taken


def active_faults() -> str:
    """The faults the harness emulates now: the innermost faults() block, else TORCH_METAL_FUSED_EMU_FAULTS."""
    return _state.faults if _state.faults is not None else _config.emu_faults()


def fault_active(kind: str) -> bool:
    """Whether a fault without a target (e.g. "no_bfloat") is active."""
    return kind in active_faults().split(",")


def faults(spec: str) -> contextlib.AbstractContextManager[None]:
    """Emulate failures inside the block (see FAULTS_ENV), e.g. faults("compile:softmax"); ValueError for a fault the
    harness does not know (it would do nothing)."""
    try:
        normalised = _config.parse_faults(spec)
    except ValueError as exc:
        raise ValueError(f"faults({spec!r}): {exc}; the faults are {_config.FAULTS_ALLOWED}") from None
    return _overriding("faults", normalised)


def gpu_cores(n: int) -> contextlib.AbstractContextManager[None]:
    """Plan launches for a GPU of `n` cores inside the block (the default is backends.metal.STAND_IN_GPU_CORES)."""
    return _overriding("gpu_cores", n)


def pipeline_max_threads(n: int) -> contextlib.AbstractContextManager[None]:
    """Emulate pipelines whose maxTotalThreadsPerThreadgroup is `n` (register pressure on a real GPU)."""
    return _overriding("max_threads", n)


def _parse(report: str, symbolizer, unavailable: list[KernelUnavailable]) -> list[Dispatch]:
    dispatches: list[Dispatch] = []
    for line in report.splitlines():
        parts = line.split("\t")
        if parts[0] == "exception":
            raise RuntimeError(f"Metal launch failed: {parts[1]}")
        if parts[0] == "unavailable":
            unavailable.append(KernelUnavailable(parts[1], parts[2], parts[3]))
        if parts[0] == "dispatch":
            groups = tuple(int(v) for v in parts[2].split(","))
            threads = tuple(int(v) for v in parts[3].split(","))
            dispatches.append(Dispatch(parts[1], groups, threads, int(parts[4])))
        elif parts[0] == "traffic":
            dispatches[-1].traffic[int(parts[1])] = (int(parts[2]), int(parts[3]))
        elif parts[0] == "error":
            kind, file, line_no, pc, count, message = parts[1:7]
            location = _location(file, line_no, int(pc), symbolizer)
            buffer = int(parts[7]) if len(parts) > 7 and int(parts[7]) >= 0 else None
            dispatches[-1].findings.append(Finding(kind, location, message, int(count), dispatches[-1].kernel, buffer))
        elif parts[0] == "aborted":
            dispatches[-1].aborted = parts[1]
    return dispatches


def _location(file: str, line_no: str, pc: int, symbolizer) -> str:
    """A finding's file:line: its pc's where it has one, else the file:line the runtime sent beside it (for a
    watchdog tick, the thread's latest SIMD-group operation or barrier)."""
    if not pc:
        return f"{file}:{line_no}" if file else "?"
    location = symbolizer(pc)
    if file and not re.search(r"\.(?:metal|h):[1-9]\d*$", location):
        return f"{file}:{line_no}"
    return location


@functools.lru_cache(maxsize=4096)
def symbolize(library: Path, pc_offset: int) -> str:
    """file.metal:line of an instruction in a harness library (via llvm-symbolizer or addr2line)."""
    if pc_offset == 0:
        return "?"
    tool = next(
        (shutil.which(n) for n in ("llvm-symbolizer-19", "llvm-symbolizer", "addr2line") if shutil.which(n)), None
    )
    if tool is None:
        return f"{library.name}+{pc_offset:#x}"
    # The return address points after the call to the load/store callback: step back one byte.
    addr = hex(pc_offset - 1)
    if tool.endswith("addr2line"):
        cmd = [tool, "-e", str(library), "-i", addr]
    else:
        cmd = [tool, f"--obj={library}", "--inlines", addr]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")
    # The innermost frame that lies in a shader source (.metal or a shader header).
    for ln in out:
        m = re.search(r"(\S+\.(?:metal|h)):(\d+)", ln)
        if m and "tmf_emu" not in m.group(1) and m.group(2) != "0":  # line 0: compiler-generated code
            return f"{m.group(1)}:{m.group(2)}"
    return f"{library.name}+{pc_offset:#x}"
