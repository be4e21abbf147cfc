"""A stand-in for `torch.mps.compile_shader` on the Metal-on-CPU harness, so CI runs the Mac path's Python unchanged.

It compiles the MSL source it is given (the harness's pre-pass and clang; builds cached by the source's hash) and
returns a library whose kernels bind and launch the way PyTorch's binding does (torch/csrc/mps/Module.cpp, 2.9+):

- the i-th argument binds at [[buffer(i)]]: a tensor as its storage at its byte offset; a Python int as an int64, a
  float as a float32, a list or tuple of ints (int64) or floats (float32) as a constant array, all set with
  setBytes; `arg_casts={i: "int32" | "int16" | "int8" | "uint8" | "fp16" | "bf16"}` narrows argument i;
- `threads` is the total thread count (dispatchThreads, 1 to 3 dimensions; default: the first tensor's numel) and
  `group_size` the threadgroup size; without it a 1-D launch takes min(threads, the pipeline's limit);
- a missing function, or a pipeline that cannot be built, raises at attribute lookup; compile errors at compile time;
- only static threadgroup memory (no setThreadgroupMemoryLength), no function constants.

What it does not model, and refuses rather than runs differently: grids that are not whole threadgroups (Metal's
non-uniform edge groups), lists of tensors (argument buffers), non-CPU tensors. The harness's fault injection
(runner.faults) applies: compile:<family>, pipeline:<target>, max_threads:<target>=n, simd_width:<target>=n,
no_bfloat (a library compiled without bfloat kernels), and encode:<kernel> (the kernel call raises, as PyTorch's
binding does for arguments it cannot bind).
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading

import torch

from torch_metal_fused._families import family_of_entry
from torch_metal_fused.emulator import runner
from torch_metal_fused.emulator.build import ensure_built_source

_CASTS = {"int32": "<i", "int16": "<h", "int8": "<b", "uint8": "<B", "fp16": "<e"}
_LINE_RE = re.compile(r'^#line 1 "([^"]+)"', re.M)
_builds: dict[str, runner.Harness] = {}  # by the source's hash
_by_identity: dict[int, tuple[str, runner.Harness]] = {}
_builds_lock = threading.Lock()


def compile_shader(source: str) -> ShaderLibrary:
    """Compile `source` with the harness (as torch.mps.compile_shader compiles it with the OS's Metal compiler)."""
    seen = _by_identity.get(id(source))
    if seen is not None and seen[0] is source:  # the launch plans pass the same (cached) string at every launch
        harness = seen[1]
    else:
        harness = _build(source)
        _by_identity[id(source)] = (source, harness)  # keeps the string alive, so its id is not reused
    names = harness.kernel_names()
    for family in {family_of_entry(n) for n in names}:
        if runner.fault_active(f"compile:{family}"):
            raise SyntaxError(f"injected fault ({runner.FAULTS_ENV})")
    return ShaderLibrary(harness, names)


def _build(source: str) -> runner.Harness:
    if not source.isascii():  # PyTorch decodes the source as NSASCIIStringEncoding before Metal compiles it
        where = next(i for i, c in enumerate(source) if not c.isascii())
        raise SyntaxError(f"program_source: non-ASCII character {source[where]!r} at offset {where}")
    digest = hashlib.sha256(source.encode()).hexdigest()
    with _builds_lock:
        harness = _builds.get(digest)
        if harness is None:
            m = _LINE_RE.search(source)
            name = re.sub(r"\W", "_", m.group(1).rsplit("/", 1)[-1].rsplit(".", 1)[0]) if m else "program_source"
            harness = runner.Harness(ensure_built_source(source, name))
            _builds[digest] = harness
    return harness


class ShaderLibrary:
    """What compile_shader returns: its kernels as attributes."""

    def __init__(self, harness: runner.Harness, names: list[str]) -> None:
        self._harness = harness
        self._names = names

    def _visible(self) -> list[str]:
        if runner.fault_active("no_bfloat"):  # as compiled by a Metal without bfloat (the kernels are #if'd out)
            return [n for n in self._names if not n.endswith("_bfloat")]
        return list(self._names)

    def __dir__(self) -> list[str]:
        return self._visible()

    def __getattr__(self, name: str) -> StandInKernel:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._visible():
            raise RuntimeError(f"Failed to create function state object for: {name}")
        info = self._harness.pipeline_info(name)  # raises KernelUnavailable for a pipeline fault
        return StandInKernel(self._harness, name, info["max_threads"], info["execution_width"])


class StandInKernel:
    """A kernel function: its pipeline limits, and a call that encodes one dispatch."""

    def __init__(self, harness: runner.Harness, name: str, max_threads: int, execution_width: int) -> None:
        self._harness = harness
        self.name = name
        self.max_threads_per_threadgroup = max_threads
        self.thread_execution_width = execution_width

    def __call__(self, *args, threads=None, group_size=None, arg_casts=None, error_buf_idx=None) -> None:
        if error_buf_idx is not None:
            raise NotImplementedError("the compile_shader stand-in does not model error buffers")
        if runner.fault_active(f"encode:{self.name}"):
            raise RuntimeError(f"injected fault ({runner.FAULTS_ENV}): encoding {self.name} failed")
        casts = _arg_casts(arg_casts)
        buffers: dict[int, torch.Tensor] = {}
        constants: dict[int, bytes] = {}
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                if arg.device.type != "cpu":
                    raise ValueError(f"argument {i}: the stand-in binds CPU tensors only, got {arg.device}")
                buffers[i] = arg
                if threads is None:
                    threads = arg.numel()
            else:
                constants[i] = _constant_bytes(i, arg, casts.get(i))
        if threads is None:
            raise RuntimeError("Number of threads is undefined or has wrong dimension")
        total = [int(threads)] if isinstance(threads, int) else [int(t) for t in threads]
        if not 1 <= len(total) <= 3:
            raise RuntimeError("Number of threads is undefined or has wrong dimension")
        if group_size is None:
            if len(total) != 1:
                raise NotImplementedError("the stand-in needs group_size for a multi-dimensional launch")
            group = [min(total[0], self.max_threads_per_threadgroup)]
        else:
            group = [int(group_size)] if isinstance(group_size, int) else [int(g) for g in group_size]
            if len(group) != len(total):
                raise RuntimeError("threads and group_size must have the same number of dimensions")
        if any(g <= 0 or t % g for t, g in zip(total, group)):
            raise ValueError(
                f"{self.name}: threads {total} are not whole threadgroups of {group}; the stand-in does not model "
                "Metal's non-uniform edge threadgroups, and our launch plans never ask for them"
            )
        pad = [1] * (3 - len(total))
        groups = tuple(t // g for t, g in zip(total, group)) + tuple(pad)
        self._harness.encode(self.name, buffers, constants, groups, tuple(group) + tuple(pad))


def _arg_casts(arg_casts) -> dict[int, str]:
    if arg_casts is None:
        return {}
    if isinstance(arg_casts, str):
        raise NotImplementedError("the stand-in models per-argument casts only (a dict)")
    casts = {int(i): str(c) for i, c in dict(arg_casts).items()}
    for c in casts.values():
        if c not in _CASTS and c != "bf16":
            raise RuntimeError(f"Unsupported cast instruction {c}")
    return casts


def _pack(values: list, kind: str, cast: str | None) -> bytes:
    if cast is None:
        return struct.pack(f"<{len(values)}{'q' if kind == 'int' else 'f'}", *values)
    if cast == "bf16":
        as_float = torch.tensor([float(v) for v in values], dtype=torch.float32).to(torch.bfloat16)
        return as_float.view(torch.int16).numpy().tobytes()
    fmt = _CASTS[cast]
    if kind == "int" and cast != "fp16":
        # C++'s conversion to a narrower integer keeps the low bits (as static_cast does).
        bits = {"<i": 32, "<h": 16, "<b": 8, "<B": 8}[fmt]
        values = [
            ((v + (1 << (bits - 1))) % (1 << bits)) - (1 << (bits - 1)) if fmt != "<B" else v % 256 for v in values
        ]
    elif kind == "float" and cast != "fp16":
        values = [int(v) for v in values]  # float -> integer conversion truncates
    return b"".join(struct.pack(fmt, v) for v in values)


def _constant_bytes(index: int, arg, cast: str | None) -> bytes:
    if isinstance(arg, (list, tuple)):
        if not arg:
            raise RuntimeError("Empty list/tuple can not be an argument to metal kernel")
        first = arg[0]
        if isinstance(first, torch.Tensor):
            raise NotImplementedError("the stand-in does not model lists of tensors (argument buffers)")
        if isinstance(first, int):
            return _pack([int(v) for v in arg], "int", cast)
        if isinstance(first, float):
            return _pack([float(v) for v in arg], "float", cast)
        raise RuntimeError("Unexpected argument types")
    if isinstance(arg, float):
        return _pack([arg], "float", cast)
    if isinstance(arg, int):
        return _pack([int(arg)], "int", cast)
    raise RuntimeError(f"Unsupported argument type at index {index}: {type(arg).__name__}")
