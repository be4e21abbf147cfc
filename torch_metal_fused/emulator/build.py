"""Builds the Metal-on-CPU harness: pre-passes shaders/*.metal, compiles them with clang 19 against the
harness prelude, and links them with the runner (csrc/emu) into two shared libraries:

- `libtmf_emu.so`: plain, optimised: executes kernels (the "metal-emulated" backend).
- `libtmf_emu_checked.so`: the shader code instrumented with sanitizer-coverage load/store callbacks:
  the checker (races, uninitialised reads, out-of-bounds accesses) and the device-traffic counts.

Builds are cached by a hash of every input under ~/.cache/torch_metal_fused (or $TORCH_METAL_FUSED_CACHE).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from torch_metal_fused import _config
from torch_metal_fused.emulator.prepass import prepass

REPO = Path(__file__).resolve().parents[2]
SHADERS = REPO / "shaders"
EMU_SRC = REPO / "csrc" / "emu"
INCLUDES = [EMU_SRC / "include", REPO / "csrc" / "include", SHADERS]
CLANG_CANDIDATES = ("clang++-19", "clang++-20", "clang++-21", "clang++-18")
COMMON_FLAGS = [
    "-std=c++17",
    "-O2",
    "-g",
    "-gdwarf-4",
    "-fPIC",
    "-Wall",
    "-Wno-unknown-attributes",
    "-Wno-unused-variable",
    "-Wno-unused-function",
    "-fno-fast-math",
    "-ffp-contract=off",
]
CHECK_FLAGS = ["-fsanitize-coverage=func,trace-loads,trace-stores"]


class HarnessUnavailable(RuntimeError):
    pass


class ShaderCompileError(RuntimeError):
    pass


@dataclass(frozen=True)
class Libraries:
    plain: Path
    checked: Path
    generated: Path  # folder of the pre-processed shader sources


def find_clang() -> str:
    override = _config.clang()
    if override:  # named: that one or an error (falling back to another clang would make the setting do nothing)
        path = shutil.which(override)
        if not path:
            raise HarnessUnavailable(
                f"{_config.CLANG.name}={override!r} is not found: it takes {_config.CLANG.allowed}"
            )
        return path
    for name in CLANG_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise HarnessUnavailable(
        "clang 19 (or newer) not found: the harness needs its _Float16/__bf16 support "
        f"(Debian/Ubuntu: apt-get install clang-19 libboost-context-dev; or set {_config.CLANG.name})"
    )


def _check_boost() -> None:
    if not any(Path(p, "boost/context/detail/fcontext.hpp").exists() for p in ("/usr/include", "/usr/local/include")):
        raise HarnessUnavailable("boost.context headers not found (apt-get install libboost-context-dev)")


def shader_paths() -> list[Path]:
    return sorted(SHADERS.glob("*.metal"))


@functools.cache
def _clang_version(clang: str) -> str:
    return subprocess.run([clang, "--version"], capture_output=True, text=True).stdout


def _inputs_digest(clang: str, shaders: bool = True) -> str:
    h = hashlib.sha256()
    h.update(_clang_version(clang).encode())
    h.update(" ".join(COMMON_FLAGS + CHECK_FLAGS).encode())
    files = sorted(
        [
            *(SHADERS.rglob("*") if shaders else ()),
            *EMU_SRC.rglob("*"),
            *(REPO / "csrc" / "include").rglob("*"),
            Path(__file__),
            Path(__file__).with_name("prepass.py"),
            REPO / "torch_metal_fused" / "_families.py",
        ]
    )
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return _config.cache_dir()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ShaderCompileError(f"command failed: {' '.join(cmd)}\n{proc.stderr[-8000:]}")


def generate(out_dir: Path, sources: list[Path] | None = None, msl_subset: bool | None = None) -> list[Path]:
    """Pre-pass each shader into out_dir/<stem>.cpp (+ bindings header); returns the .cpp paths. msl_subset: as
    prepass's (default: the MSL-subset rules for the shipped shaders only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = []
    defined_in: dict[str, Path] = {}
    for src in sources or shader_paths():
        result = prepass(src, msl_subset)
        for host in result.host_names:  # one registry for all files: a second definition would replace the first
            if host in defined_in:
                raise ShaderCompileError(f"{src}: host name {host!r} is also defined in {defined_in[host]}")
            defined_in[host] = src
        (out_dir / f"{src.stem}.bindings.h").write_text(result.bindings_header)
        cpp = out_dir / f"{src.stem}.cpp"
        cpp.write_text(f'#include "{src.stem}.bindings.h"\n' + result.source)
        generated.append(cpp)
    return generated


def write_families_header(out_dir: Path) -> Path:
    """tmf_emu_families.h: the kernel families and their kernel-name prefixes, from the op manifest
    (torch_metal_fused/_families.py), for the harness's encoder (fault targets, KernelUnavailable's family)."""
    from torch_metal_fused._families import FAMILIES

    rows = "".join(f'    {{"{family}", "{prefix}"}},\n' for family, prefix in FAMILIES.items())
    path = out_dir / "tmf_emu_families.h"
    path.write_text(
        "// Generated by torch_metal_fused/emulator/build.py from torch_metal_fused/_families.py: do not edit.\n"
        "#pragma once\n#include <stdexcept>\n#include <string>\n\nnamespace tmf_emu {\n\n"
        "struct KernelFamily {\n  const char* name;\n  const char* kernel_prefix;\n};\n"
        f"inline constexpr KernelFamily kKernelFamilies[] = {{\n{rows}}};\n\n"
        "inline const char* family_of(const std::string& kernel) {\n"
        "  for (const KernelFamily& f : kKernelFamilies) {\n"
        "    if (kernel.rfind(f.kernel_prefix, 0) == 0) return f.name;\n  }\n"
        '  throw std::invalid_argument("kernel " + kernel + " belongs to no kernel family (_families.py)");\n'
        "}\n\n}  // namespace tmf_emu\n"
    )
    return path


def _include_flags(sources: list[Path] | None, gen_dir: Path) -> list[str]:
    # A shader's own folder first (its #include "x.h" must find the neighbours of the .metal file, not of
    # the generated .cpp), then the harness and shared headers.
    own = sorted({str(p.resolve().parent) for p in (sources or shader_paths())})
    return [f"-iquote{d}" for d in own] + [f"-I{p}" for p in INCLUDES] + [f"-I{gen_dir}"]


def compile_libraries(
    out_dir: Path, sources: list[Path] | None = None, jobs: int | None = None, msl_subset: bool | None = None
) -> Libraries:
    """Compile and link both libraries into out_dir (no caching; see `ensure_built`)."""
    clang = find_clang()
    _check_boost()
    gen_dir = out_dir / "gen"
    shaders = generate(gen_dir, sources, msl_subset)
    write_families_header(gen_dir)
    include_flags = _include_flags(sources, gen_dir)
    jobs_list = []
    runtime_objs = []
    for src in (EMU_SRC / "runtime.cpp", EMU_SRC / "ops.cpp"):
        obj = out_dir / f"{src.stem}.o"
        jobs_list.append([clang, *COMMON_FLAGS, *include_flags, "-c", str(src), "-o", str(obj)])
        runtime_objs.append(obj)
    plain_objs, checked_objs = [], []
    for cpp in shaders:
        plain, checked = out_dir / f"{cpp.stem}.plain.o", out_dir / f"{cpp.stem}.checked.o"
        jobs_list.append([clang, *COMMON_FLAGS, *include_flags, "-c", str(cpp), "-o", str(plain)])
        jobs_list.append([clang, *COMMON_FLAGS, *CHECK_FLAGS, *include_flags, "-c", str(cpp), "-o", str(checked)])
        plain_objs.append(plain)
        checked_objs.append(checked)
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        for f in [pool.submit(_run, cmd) for cmd in jobs_list]:
            f.result()
    libs = Libraries(out_dir / "libtmf_emu.so", out_dir / "libtmf_emu_checked.so", gen_dir)
    link = [clang, "-shared", "-Wl,-Bsymbolic", "-o"]
    tail = ["-lboost_context", "-lpthread", "-ldl"]
    _run([*link, str(libs.plain), *map(str, runtime_objs), *map(str, plain_objs), *tail])
    _run([*link, str(libs.checked), *map(str, runtime_objs), *map(str, checked_objs), *tail])
    return libs


def ensure_built() -> Libraries:
    """The cached build for the current sources, building it first if needed (under a file lock)."""
    clang = find_clang()
    return _cached_build(cache_root() / "emulator" / _inputs_digest(clang), lambda: _inputs_digest(clang))


def ensure_built_source(source: str, name: str) -> Libraries:
    """The cached build of one self-contained MSL source (what torch.mps.compile_shader is given), as `name`.metal,
    with the MSL-subset rules of the shipped shaders."""
    clang = find_clang()

    def digest() -> str:
        h = hashlib.sha256(_inputs_digest(clang, shaders=False).encode())
        h.update(name.encode())
        h.update(source.encode())
        return h.hexdigest()[:16]

    out = cache_root() / "emulator" / f"source-{digest()}"
    path = out / "src" / f"{name}.metal"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    return _cached_build(out, digest, [path], msl_subset=True)


def _cached_build(
    out: Path, digest_now, sources: list[Path] | None = None, msl_subset: bool | None = None
) -> Libraries:
    _check_boost()
    digest = digest_now()
    libs = Libraries(out / "libtmf_emu.so", out / "libtmf_emu_checked.so", out / "gen")
    if libs.plain.exists() and libs.checked.exists():
        return libs
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (libs.plain.exists() and libs.checked.exists()):
            tmp = out / "tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            built = compile_libraries(tmp, sources, msl_subset=msl_subset)
            if digest_now() != digest:
                # A source changed while it compiled (someone editing the checkout): this build may mix the two
                # versions, so it is used once but never cached under the digest of the first.
                return built
            shutil.rmtree(libs.generated, ignore_errors=True)
            shutil.copytree(built.generated, libs.generated)
            shutil.copy2(built.checked, libs.checked.with_suffix(".tmp"))
            shutil.copy2(built.plain, libs.plain.with_suffix(".tmp"))
            os.replace(libs.checked.with_suffix(".tmp"), libs.checked)
            os.replace(libs.plain.with_suffix(".tmp"), libs.plain)
    return libs


def lint_address_spaces(source: Path, work_dir: Path) -> None:
    """The strict pass: compile a shader with Metal's address spaces as clang address spaces, so device,
    threadgroup and constant pointers cannot be mixed up. Raises ShaderCompileError with file:line."""
    _lint(source, work_dir, "-DTMF_STRICT_ADDRESS_SPACES")


def lint_bfloat_conversions(source: Path, work_dir: Path) -> None:
    """The strict bfloat pass: compile a shader's bfloat instantiations with bfloat as a class that converts only
    when asked (metal_prelude.h, TMF_STRICT_BFLOAT), so an implicit conversion to bfloat, which Apple's compiler
    rejects and clang's __bf16 accepts, fails here. Raises ShaderCompileError with file:line."""
    _lint(source, work_dir, "-DTMF_STRICT_BFLOAT")


def _lint(source: Path, work_dir: Path, strict_flag: str) -> None:
    """Syntax-only compile of `source` (its instantiations generated by the pre-pass) under one strict flag. Each
    flag is a pass of its own: a class-type bfloat cannot live in clang's address spaces (its members would need
    them)."""
    clang = find_clang()
    gen = generate(work_dir, [source])[0]
    include_flags = _include_flags([source], work_dir)
    _run([clang, *COMMON_FLAGS, strict_flag, "-fsyntax-only", *include_flags, str(gen)])
