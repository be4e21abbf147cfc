"""Every environment setting, declared once: its name, default, the values that do something, its effect and the
layer that reads it.

The package's Python code reads its settings only through the accessors below (`strict()`, `backend()`, ...), never
`os.environ` directly; settings the C++ code reads (the CUDA extension, csrc/cuda; the Metal-on-CPU harness,
csrc/emu) and those setup.py reads are declared here too, with the file that reads them. A value that would do
nothing (`TORCH_METAL_FUSED_STRICT=yes`, a backend that cannot be forced, a fault the harness does not know) is an
error naming the variable and the values it takes: where it is read, and for every TORCH_METAL_FUSED_* variable set
at `import torch_metal_fused` (check_environment). The C++ readers reject the same values (the parsers below mirror
them). An empty value means unset everywhere. docs/configuration.md lists the same settings (a test keeps the two in
step, and checks that every TORCH_METAL_FUSED_* name in the tree is declared here).

This module imports nothing from the package (setup.py loads it by its path, before the package is importable): it is
the bottom layer, with _errors.py and _families.py.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "TORCH_METAL_FUSED_"

# Who reads a setting.
PYTHON = "python"  # the package's Python code, through this module's accessors
CPP = "c++"  # C++ (csrc/), with std::getenv; validated there
BUILD = "build"  # setup.py, at install
EXTERNAL = "external"  # another project's variable (PyTorch's, CUTLASS's) whose value changes what we do


class ConfigError(ValueError):
    """A setting with a value that would do nothing; the message names the variable and the values it takes."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str  # what unset (or empty) means, in words
    allowed: str  # the values that do something, in words (as errors say them)
    effect: str
    read_by: tuple[str, ...]  # the files that read it (Python modules read it through this module)
    layer: str  # PYTHON, CPP, BUILD or EXTERNAL
    parse: Callable[[str], Any] | None = None  # the raw, non-empty value -> the typed value; ValueError if invalid
    strip: bool = True  # whether surrounding whitespace is ignored (the C++ readers do not ignore it)

    def raw(self, environ: Mapping[str, str] | None = None) -> str:
        """The value as set ("" where unset), stripped where the reader strips it."""
        value = (os.environ if environ is None else environ).get(self.name, "")
        return value.strip() if self.strip else value

    def value(self, environ: Mapping[str, str] | None = None) -> Any:
        """The typed value, None where unset or empty; ConfigError for a value that would do nothing."""
        raw = self.raw(environ)
        if not raw or self.parse is None:
            return raw or None
        try:
            return self.parse(raw)
        except ValueError as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise ConfigError(f"{self.name}={raw!r} does nothing{detail}: it takes {self.allowed}") from None


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError
    return raw == "1"


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError
        return raw

    return parse


def _kconcat(raw: str) -> str:
    """As tmf::cuda::lora_kconcat_mode (csrc/cuda/lora_kconcat.cu): the mode a build with CUTLASS takes."""
    return {"0": "never", "1": "always"}[_choice("0", "1")(raw)]


def _kconcat_gemm(raw: str) -> str | None:
    """As parse_gemm (csrc/cuda/lora_kconcat.cu): a forced configuration, None for `auto` (the launch rule)."""
    return None if _choice("cooperative", "pingpong", "auto")(raw) == "auto" else raw


def _seed(raw: str) -> int:
    """As schedule_seed (csrc/emu/runtime.cpp): strtoull base 0, digits only (decimal, 0x hex, 0 octal)."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+|[1-9][0-9]*", raw):
        return int(raw, 0)
    if re.fullmatch(r"0[0-7]*", raw):
        return int(raw, 8)
    raise ValueError


def _seconds(raw: str) -> float:
    """As timeout_seconds (csrc/emu/runtime.cpp): a plain decimal number, 0 for none."""
    if not re.fullmatch(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", raw):
        raise ValueError
    return float(raw)


# Fault kinds the harness emulates, and whether each takes `:<target>` and `=<n>` (csrc/emu/include/tmf_emu/
# emu_encoder.h reads compile, pipeline, max_threads, simd_width; emulator/compile_shader.py compile, encode,
# no_bfloat; _backend.py no_bfloat).
FAULT_KINDS = {
    "compile": (True, False),  # compile:<family>: the family's library does not compile
    "pipeline": (True, False),  # pipeline:<family or kernel>: building the pipeline fails
    "encode": (True, False),  # encode:<kernel>: encoding a dispatch of the kernel fails
    "max_threads": (True, True),  # max_threads:<family or kernel>=<n>: the pipeline's maxTotalThreadsPerThreadgroup
    "simd_width": (True, True),  # simd_width:<family or kernel>=<n>: the pipeline's threadExecutionWidth
    "no_bfloat": (False, False),  # Metal without bfloat (before Metal 3.1)
}
_FAULT = re.compile(r"(?P<kind>[a-z_]+)(?::(?P<target>[A-Za-z0-9_]+)(?:=(?P<n>[0-9]+))?)?")


@functools.lru_cache(maxsize=64)
def parse_faults(spec: str) -> str:
    """A fault list (TORCH_METAL_FUSED_EMU_FAULTS, runner.faults()) checked and normalised (items stripped, empty
    items dropped, joined by ","), as the harness gets it; ValueError naming the item that would do nothing."""
    items = [item.strip() for item in spec.split(",")]
    for item in items:
        m = _FAULT.fullmatch(item) if item else None
        if item and (m is None or m["kind"] not in FAULT_KINDS):
            raise ValueError(f"{item!r} is not a fault")
        if item:
            targeted, counted = FAULT_KINDS[m["kind"]]
            if targeted != bool(m["target"]) or counted != bool(m["n"]):
                form = m["kind"] + (":<target>" if targeted else "") + ("=<n>" if counted else "")
                raise ValueError(f"{item!r}: {m['kind']} is written {form}")
    return ",".join(item for item in items if item)


def _faults(raw: str) -> str:
    return parse_faults(raw)


FAULTS_ALLOWED = (
    "a comma-separated list of compile:<family>, pipeline:<family or kernel>, encode:<kernel>, "
    "max_threads:<family or kernel>=<n>, simd_width:<family or kernel>=<n>, no_bfloat"
)
FLAG = "0 or 1 (unset or empty: 0)"

BACKEND = Setting(
    "TORCH_METAL_FUSED_BACKEND",
    "by device (MPS tensors: metal, CUDA: cuda, else reference)",
    "one of reference, metal-emulated (unset or empty: by device)",
    "reference forces the plain-PyTorch reference everywhere; metal-emulated runs CPU tensors through the "
    "Metal-on-CPU harness (the backend of other devices is their own: metal and cuda cannot be forced)",
    ("torch_metal_fused/_backend.py",),
    PYTHON,
    _choice("reference", "metal-emulated"),
)
STRICT = Setting(
    "TORCH_METAL_FUSED_STRICT",
    "0",
    FLAG,
    "1: where our kernels cannot serve a call (a shader that does not compile, a pipeline that cannot be built, no "
    "launch plan), raise FallbackError instead of warning once and serving the reference. The test suite sets it",
    ("torch_metal_fused/_backend.py",),
    PYTHON,
    _flag,
)
LORA_KCONCAT = Setting(
    "TORCH_METAL_FUSED_LORA_KCONCAT",
    "by shape (where its tiles fill the GPU)",
    "0 or 1 (unset or empty: by shape)",
    "CUDA, bfloat16 LoRA on compute capability 9.0 in a build with CUTLASS: 1 takes the K-concatenated GEMM at every "
    "eligible shape, 0 never. Read once per process",
    ("csrc/cuda/lora_kconcat.cu",),
    CPP,
    _kconcat,
    strip=False,
)
LORA_KCONCAT_GEMM = Setting(
    "TORCH_METAL_FUSED_LORA_KCONCAT_GEMM",
    "by output shape (the launch rule)",
    "one of cooperative, pingpong, auto (unset, empty or auto: by output shape)",
    "cooperative or pingpong: run every K-concatenated GEMM on that configuration (benchmarking). Read once per "
    "process",
    ("csrc/cuda/lora_kconcat.cu",),
    CPP,
    _kconcat_gemm,
    strip=False,
)
EMU_CHECK = Setting(
    "TORCH_METAL_FUSED_EMU_CHECK",
    "0",
    FLAG,
    "1: run harness kernels under the checker (races, out-of-bounds, uninitialised threadgroup reads, barrier misuse, "
    "with file:line)",
    ("torch_metal_fused/emulator/runner.py",),
    PYTHON,
    _flag,
)
EMU_FAULTS = Setting(
    "TORCH_METAL_FUSED_EMU_FAULTS",
    "none",
    FAULTS_ALLOWED,
    "emulate Metal failures in the harness (runner.faults() does the same in a block); the harness library gets the "
    "list from Python",
    ("torch_metal_fused/emulator/runner.py", "csrc/emu/include/tmf_emu/emu_encoder.h"),
    PYTHON,
    _faults,
)
EMU_SEED = Setting(
    "TORCH_METAL_FUSED_EMU_SEED",
    "1",
    "a non-negative integer (decimal, 0x hex or 0 octal; 0: index order)",
    "the seed of the harness's SIMD-group execution order (a permutation per threadgroup and round, so "
    "order-dependent results show)",
    ("csrc/emu/runtime.cpp",),
    CPP,
    _seed,
    strip=False,
)
EMU_TIMEOUT_S = Setting(
    "TORCH_METAL_FUSED_EMU_TIMEOUT_S",
    "120",
    "a non-negative number of seconds (0: no watchdog)",
    "the harness's watchdog: a dispatch running longer fails with the looping file:line",
    ("csrc/emu/runtime.cpp",),
    CPP,
    _seconds,
    strip=False,
)
CLANG = Setting(
    "TORCH_METAL_FUSED_CLANG",
    "the first of clang++-19, clang++-20, clang++-21, clang++-18 on PATH",
    "a clang++ (19 or newer) on PATH or a path to one",
    "the clang that compiles the shaders and the runtime for the harness; one that is not found is an error",
    ("torch_metal_fused/emulator/build.py",),
    PYTHON,
)
CACHE = Setting(
    "TORCH_METAL_FUSED_CACHE",
    "~/.cache/torch_metal_fused",
    "a directory",
    "where harness builds are cached (keyed by a hash of every input)",
    ("torch_metal_fused/emulator/build.py",),
    PYTHON,
    Path,
)
NO_EXTENSION = Setting(
    "TORCH_METAL_FUSED_NO_EXTENSION",
    "0",
    FLAG,
    "1: build no compiled extension (a pure-Python install: the reference, and the harness on request)",
    ("setup.py",),
    BUILD,
    _flag,
)
REQUIRE_EXTENSION = Setting(
    "TORCH_METAL_FUSED_REQUIRE_EXTENSION",
    "0",
    FLAG,
    "1: a failed extension build fails the install (otherwise it installs without the extension and warns). Set by "
    "benchmarks/cuda_run.sh (the extension is CUDA's only)",
    ("setup.py",),
    BUILD,
    _flag,
)
MPS_FAST_MATH = Setting(
    "PYTORCH_MPS_FAST_MATH",
    "unset",
    "PyTorch's: anything but 0 turns fast math on",
    "PyTorch compiles Metal with fast math, which may assume no NaN or infinity: our Metal kernels are then not used "
    "(every family is served by the reference, with a warning saying why)",
    ("torch_metal_fused/backends/metal_library.py",),
    EXTERNAL,
    strip=False,
)
CUDA_ARCH_LIST = Setting(
    "TORCH_CUDA_ARCH_LIST",
    "PyTorch's (the GPUs present)",
    "PyTorch's",
    "the CUDA architectures the extension is built for; the LoRA K-concatenated GEMM is built only with 9.0a and "
    "no other 9.x entry",
    ("setup.py",),
    EXTERNAL,
    strip=False,
)
CUTLASS_DIR = Setting(
    "CUTLASS_DIR",
    "the nvidia-cutlass wheel's headers, if installed",
    "a CUTLASS checkout",
    "where setup.py finds CUTLASS's headers for the LoRA K-concatenated GEMM",
    ("setup.py",),
    EXTERNAL,
    strip=False,
)

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        BACKEND,
        STRICT,
        LORA_KCONCAT,
        LORA_KCONCAT_GEMM,
        EMU_CHECK,
        EMU_FAULTS,
        EMU_SEED,
        EMU_TIMEOUT_S,
        CLANG,
        CACHE,
        NO_EXTENSION,
        REQUIRE_EXTENSION,
        MPS_FAST_MATH,
        CUDA_ARCH_LIST,
        CUTLASS_DIR,
    )
}


# ---- accessors (read the environment at every call: tests and tools change it in-process) ----


def backend() -> str | None:
    """The backend TORCH_METAL_FUSED_BACKEND forces ("reference" or "metal-emulated"), or None."""
    return BACKEND.value()


def strict() -> bool:
    """TORCH_METAL_FUSED_STRICT=1: a fallback from our kernels to the reference is an error, not a warning."""
    return bool(STRICT.value())


def emu_check() -> bool:
    """TORCH_METAL_FUSED_EMU_CHECK=1: harness kernels run under the checker."""
    return bool(EMU_CHECK.value())


def emu_faults() -> str:
    """The faults TORCH_METAL_FUSED_EMU_FAULTS asks the harness to emulate (normalised; "" for none)."""
    return EMU_FAULTS.value() or ""


def emu_seed() -> int:
    """The harness's SIMD-group order seed (read by csrc/emu/runtime.cpp; here for reports and tests)."""
    value = EMU_SEED.value()
    return 1 if value is None else value


def emu_timeout_s() -> float:
    """The harness's watchdog in seconds, 0 for none (read by csrc/emu/runtime.cpp; here for reports and tests)."""
    value = EMU_TIMEOUT_S.value()
    return 120.0 if value is None else value


def clang() -> str | None:
    """The clang TORCH_METAL_FUSED_CLANG names, or None (then the harness looks for clang++-19 and newer)."""
    return CLANG.value()


def cache_dir() -> Path:
    """Where harness builds are cached."""
    return CACHE.value() or Path.home() / ".cache" / "torch_metal_fused"


def lora_kconcat() -> str:
    """The K-concatenated route's mode TORCH_METAL_FUSED_LORA_KCONCAT asks of a build with CUTLASS: "by_size",
    "never" or "always" (read by csrc/cuda/lora_kconcat.cu; here for tests)."""
    return LORA_KCONCAT.value() or "by_size"


def lora_kconcat_gemm() -> str | None:
    """The GEMM configuration TORCH_METAL_FUSED_LORA_KCONCAT_GEMM forces ("cooperative" or "pingpong"), or None
    (read by csrc/cuda/lora_kconcat.cu; here for tests)."""
    return LORA_KCONCAT_GEMM.value()


def no_extension() -> bool:
    return bool(NO_EXTENSION.value())


def require_extension() -> bool:
    return bool(REQUIRE_EXTENSION.value())


def mps_fast_math() -> str | None:
    """PYTORCH_MPS_FAST_MATH where it turns PyTorch's fast math on, else None: PyTorch's own test is "set, and not
    exactly 0", so an empty value turns it on too."""
    value = os.environ.get(MPS_FAST_MATH.name)
    return value if value is not None and value != "0" else None


def cuda_arch_list() -> list[str]:
    return CUDA_ARCH_LIST.raw().replace(";", " ").split()


def cutlass_dir() -> Path | None:
    value = CUTLASS_DIR.raw()
    return Path(value) if value else None


# ---- the environment as a whole ----


def check_environment(environ: Mapping[str, str] | None = None, warn: bool = True) -> list[str]:
    """Check every TORCH_METAL_FUSED_* variable set: ConfigError (all of them in one message) for a value that
    would do nothing. Names set that no setting has (a typo, or a setting of another version) are returned and, with
    `warn`, announced in a RuntimeWarning. `import torch_metal_fused` runs it."""
    environ = os.environ if environ is None else environ
    problems, unknown = [], []
    for name in sorted(environ):
        if not name.startswith(PREFIX):
            continue
        setting = SETTINGS.get(name)
        if setting is None:
            unknown.append(name)
            continue
        try:
            setting.value(environ)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    if unknown and warn:
        warnings.warn(unknown_message(unknown), RuntimeWarning, stacklevel=3)
    return unknown


def unknown_message(names: list[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, [n for n in SETTINGS if n.startswith(PREFIX)], n=1)
        parts.append(name + (f" (did you mean {close[0]}?)" if close else ""))
    return (
        f"{', '.join(parts)}: no torch_metal_fused setting has this name, so it does nothing "
        "(docs/configuration.md lists them)"
    )


@contextlib.contextmanager
def overriding(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment settings inside the block, checked first; the old values come back after."""
    for name, value in values.items():
        if name not in SETTINGS:
            raise KeyError(f"{name} is not a setting")
        if value is not None:
            SETTINGS[name].value({name: value})
    old = {name: os.environ.get(name) for name in values}

    def put(items: Mapping[str, str | None]) -> None:
        for name, value in items.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    put(values)
    try:
        yield
    finally:
        put(old)
