"""Our shaders as `torch.mps.compile_shader` takes them, and the kernels it returns.

One library per kernel family (shaders/<family>.metal), compiled at first use from a self-contained source (our own
`#include "..."` headers inlined, with `#line` marks so compiler messages and the harness's findings name the original
files), then cached for the process. On a Mac the compiler is PyTorch's binding of the OS's Metal compiler (no Xcode);
in CI it is the harness's stand-in (torch_metal_fused/emulator/compile_shader.py), which follows the same binding
rules. The launch plans (torch_metal_fused/backends/metal.py) bind every argument struct as int32 words with
`arg_casts` (PyTorch 2.9+), which reproduces the struct's bytes exactly: every field of tmf/shader_args.h is 32 bits.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from torch_metal_fused import _config
from torch_metal_fused._errors import KernelUnavailable

# An installed wheel carries the shaders and their shared header in the package (setup.py copies them:
# torch_metal_fused/shaders/, tmf/shader_args.h inside it); a source tree (an editable install, CI) has them at the top.
PACKAGED_SHADERS = Path(__file__).resolve().parents[1] / "shaders"
REPO = Path(__file__).resolve().parents[2]
SHADERS = PACKAGED_SHADERS if PACKAGED_SHADERS.is_dir() else REPO / "shaders"
# Where a shader's `#include "x"` is looked up: beside the shader, then the shared host/shader headers.
INCLUDE_DIRS = (SHADERS,) if SHADERS == PACKAGED_SHADERS else (SHADERS, REPO / "csrc" / "include")
PLAN_CACHE_ENTRIES = 4096
SIMD_WIDTH = 32  # every kernel assumes 32-wide SIMD-groups (simd_sum, simd_shuffle, lanes)
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"')


@functools.cache
def shader_source(family: str, folder: Path = SHADERS) -> str:
    """<folder>/<family>.metal with its quoted includes inlined once each (angle-bracket ones, <metal_stdlib>, stay),
    `#pragma once` dropped, and `#line` marks back to every original file."""
    path = folder / f"{family}.metal"
    if not path.is_file():
        raise ValueError(f"no shader file for kernel family {family!r} ({path})")
    return _inline(path, set())


def _line_mark(number: int, path: Path) -> str:
    """`#line` back to `path`, in ASCII like the rest of the source (PyTorch decodes it as ASCII): a non-ASCII byte
    of the path (an install under ~/prøjekt) becomes an octal escape, which the compiler reads back as that byte."""
    quoted = "".join(
        ("\\" + chr(b) if chr(b) in '"\\' else chr(b)) if 32 <= b < 127 else f"\\{b:03o}"
        for b in str(path).encode("utf-8", "surrogateescape")
    )
    return f'#line {number} "{quoted}"\n'


def _inline(path: Path, seen: set[Path]) -> str:
    """ASCII only: PyTorch hands the source to Metal decoded as NSASCIIStringEncoding, so non-ASCII characters (in
    our comments: ·, ᵀ, —) become '?'."""
    out = [_line_mark(1, path)]
    text = path.read_text().encode("ascii", "replace").decode("ascii")
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        m = _INCLUDE_RE.match(line)
        if m:
            header = find_header(m.group(1), path)
            if header not in seen:
                seen.add(header)
                out.append(_inline(header, seen))
            out.append(_line_mark(number + 1, path))
        elif line.lstrip().startswith("#pragma once"):
            out.append("\n")
        else:
            out.append(line)
    if out[-1] and not out[-1].endswith("\n"):
        out.append("\n")
    return "".join(out)


def find_header(name: str, includer: Path) -> Path:
    for folder in (includer.parent, *INCLUDE_DIRS):
        candidate = (folder / name).resolve()
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f'{includer}: #include "{name}" found in none of {", ".join(map(str, INCLUDE_DIRS))}')


@dataclass(frozen=True)
class Params:
    """Constant data bound at one argument index (setBytes): an argument struct's int32 words."""

    words: tuple[int, ...]


@dataclass(frozen=True)
class Pipeline:
    """A kernel as the launch plans see it: its callable and the two limits every plan depends on."""

    kernel: str
    function: object
    max_threads: int  # maxTotalThreadsPerThreadgroup
    execution_width: int  # threadExecutionWidth
    family: str = ""


class Dispatch(NamedTuple):
    """One kernel launch: arguments in [[buffer(n)]] order (tensors or Params), whole threadgroups. A named tuple:
    one is built per launch, and a frozen dataclass's constructor costs a Mac's CPU about a microsecond more."""

    pipeline: Pipeline
    args: tuple
    groups: tuple[int, int, int]
    threads: tuple[int, int, int]


class KernelLibraries:
    """The compiled family libraries of one compiler (torch.mps.compile_shader, or the harness's stand-in), and the
    pipelines of their kernels; failures are reported as KernelUnavailable, before anything is encoded."""

    def __init__(
        self,
        compile_shader: Callable[[str], object],
        name: str,
        cache: bool = True,
        shaders: Path = SHADERS,
        refusal: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.compile_shader = compile_shader
        self.name = name
        self.shaders = shaders
        self.refusal = refusal  # a reason this compiler must not build our kernels, or None
        # The stand-in is asked again at every launch (it caches its builds itself), so the faults a test sets take
        # effect as they would in a fresh process on a Mac.
        self.cache = cache
        self._lock = threading.Lock()
        self._libraries: dict[str, object] = {}
        self._pipelines: dict[str, Pipeline] = {}
        self._plans: dict[tuple, object] = {}

    def library(self, family: str):
        with self._lock:
            lib = self._libraries.get(family) if self.cache else None
            if lib is None:
                refused = self.refusal()
                if refused:
                    raise KernelUnavailable(family, "family", refused)
                try:
                    lib = self.compile_shader(shader_source(family, self.shaders))
                except Exception as exc:  # a SyntaxError or RuntimeError from the Metal compiler
                    raise KernelUnavailable(family, "family", f"compiling {family}.metal failed: {exc}") from exc
                if self.cache:
                    self._libraries[family] = lib
            return lib

    def pipeline(self, family: str, kernel: str) -> Pipeline:
        """The pipeline of `kernel`, checked against what every kernel assumes: 32-wide SIMD-groups (else the family
        is unusable here) and room for at least one SIMD-group (else no plan fits this call)."""
        cached = self._pipelines.get(kernel)
        if cached is not None:
            return cached
        lib = self.library(family)
        if kernel.endswith("_bfloat") and kernel not in dir(lib):
            # The library was compiled without bfloat (Metal < 3.1): bfloat16 calls only are served by the reference.
            raise KernelUnavailable(family, "dtype", f"the {family} library has no {kernel}: this Metal lacks bfloat")
        try:
            function = getattr(lib, kernel)
        except Exception as exc:  # no such function, or its pipeline could not be built
            raise KernelUnavailable(family, "family", f"building the pipeline for {kernel} failed: {exc}") from exc
        p = Pipeline(
            kernel, function, int(function.max_threads_per_threadgroup), int(function.thread_execution_width), family
        )
        if p.execution_width != SIMD_WIDTH:
            raise KernelUnavailable(
                family,
                "family",
                f"pipeline {kernel} has threadExecutionWidth {p.execution_width}; the kernels assume 32-wide "
                "SIMD-groups",
            )
        if p.max_threads < SIMD_WIDTH:
            raise KernelUnavailable(
                family,
                "call",
                f"pipeline {kernel} allows {p.max_threads} threads per threadgroup, fewer than one SIMD-group",
            )
        if self.cache:
            self._pipelines[kernel] = p
        return p

    def plan(self, key: tuple, build: Callable[[], object]):
        """build() (a launch plan: pipelines, grids, argument bytes), kept per key where pipelines are kept. Bounded: a
        workload of ever-new shapes (variable sequence lengths) starts over rather than grow without end."""
        if not self.cache:
            return build()
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLAN_CACHE_ENTRIES:
                self._plans.clear()
            plan = self._plans[key] = build()
        return plan

    @staticmethod
    def encode(dispatches: Sequence[Dispatch]) -> None:
        """Encode each dispatch as compile_shader's kernels take it: total threads (dispatchThreads) in whole groups.
        A kernel call that raises (PyTorch's binding refusing an argument: a bug of ours or an API change) makes the
        family unusable: the caller serves the call with the reference, which is safe because every entry point
        writes only outputs it allocated itself, discarded with whatever the dispatches encoded so far wrote."""
        for d in dispatches:
            args, casts = list(d.args), {}
            for i, a in enumerate(args):
                if type(a) is Params:
                    args[i], casts[i] = list(a.words), "int32"
            (gx, gy, gz), (tx, ty, tz) = d.groups, d.threads
            try:
                d.pipeline.function(
                    *args, threads=[gx * tx, gy * ty, gz * tz], group_size=[tx, ty, tz], arg_casts=casts
                )
            except (RuntimeError, TypeError, ValueError) as exc:
                family = d.pipeline.family
                raise KernelUnavailable(family, "family", f"encoding {d.pipeline.kernel} failed: {exc}") from exc


def fast_math_refusal() -> str | None:
    """PyTorch compiles with fast math where PYTORCH_MPS_FAST_MATH is set (to anything but 0): the compiler may then
    assume no NaN or infinity, and drop the NaN propagation and -inf masking our kernels keep (the IEEE contract)."""
    value = _config.mps_fast_math()
    if value is not None:
        return (
            f"PYTORCH_MPS_FAST_MATH={value} makes PyTorch compile Metal with fast math, which may drop the kernels' "
            "NaN and infinity handling; unset it for fused kernels"
        )
    return None


_libraries: dict[str, KernelLibraries] = {}
_libraries_lock = threading.Lock()
_planted: list[KernelLibraries] = []  # shaders_from() blocks, innermost last


@contextlib.contextmanager
def shaders_from(folder: Path) -> Iterator[None]:
    """Inside the block, CPU tensors (the harness's stand-in) run the shaders in `folder` instead of shaders/: the
    checker's tests plant bugs in a copy and launch it through the same plans."""
    from torch_metal_fused.emulator import compile_shader

    _planted.append(KernelLibraries(compile_shader.compile_shader, f"stand-in ({folder})", cache=False, shaders=folder))
    try:
        yield
    finally:
        _planted.pop()


def libraries_for(device: torch.device) -> KernelLibraries:
    """The kernel libraries serving tensors on `device`: PyTorch's compile_shader on "mps", the harness's stand-in
    on "cpu" (the metal-emulated backend)."""
    kind = device.type
    if kind == "cpu" and _planted:
        return _planted[-1]
    libs = _libraries.get(kind)
    if libs is not None:
        return libs
    with _libraries_lock:
        libs = _libraries.get(kind)
        if libs is None:
            if kind == "mps":
                libs = KernelLibraries(torch.mps.compile_shader, "torch.mps.compile_shader", refusal=fast_math_refusal)
            elif kind == "cpu":
                from torch_metal_fused.emulator import compile_shader

                libs = KernelLibraries(
                    compile_shader.compile_shader, "the harness's compile_shader stand-in", cache=False
                )
            else:
                raise ValueError(f"no Metal kernels for {kind} tensors")
            _libraries[kind] = libs
        return libs


def reset() -> None:
    """Forget compiled libraries (tests that change the harness's faults between compilations)."""
    with _libraries_lock:
        _libraries.clear()
