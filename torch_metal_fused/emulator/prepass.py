"""Line-preserving rewrite of a Metal source into C++ that clang 19 compiles against the harness prelude.

Every rewrite stays on its original line and the output starts with `#line 1 "<the .metal file>"`, so
compiler errors, checker reports and debug info point at the real shader file and line.

- `template [[host_name("n")]] [[kernel]] decltype(f<T>) f<T>;`  ->  `TMF_INSTANTIATE("n", f, f<T>)`
  (registers the instantiation with the runner under its host name); non-template kernels are registered
  under their own name at the end of the file. Rejected with a PrepassError (file:line), see
  `_check_instantiation`: a `decltype(...)` naming another specialisation than the one declared (Apple's
  compiler rejects it; we would register one of the two silently), a host name registered twice in a file
  (the runner's registry would keep the last one silently), a host name whose dtype suffix disagrees with the
  element type the kernel is instantiated for, and a `[[host_name(...)]]` line in any other form (it would
  not be registered).
- Metal's vector constructors `float4(...)` -> `tmf_make<float4>(...)` (splat, conversion, assembly).
- `[[threadgroup(n)]]` parameter attributes -> `[[tmf_threadgroup(n)]]` (`threadgroup` is an address-space
  macro in the prelude).
- kernel-local `threadgroup T name[N]...;` -> a reference to per-threadgroup storage owned by the runner.
- each kernel's parameter attributes ([[buffer(n)]], [[thread_position_in_grid]], ...) become a binding table
  (role, index) in a companion header, used to pass the right argument to each parameter.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

ROLES = {
    "buffer": "buffer",
    "threadgroup": "threadgroup_memory",
    "thread_position_in_grid": "thread_position_in_grid",
    "thread_position_in_threadgroup": "thread_position_in_threadgroup",
    "threadgroup_position_in_grid": "threadgroup_position_in_grid",
    "threads_per_threadgroup": "threads_per_threadgroup",
    "threadgroups_per_grid": "threadgroups_per_grid",
    "threads_per_grid": "threads_per_grid",
    "thread_index_in_threadgroup": "thread_index_in_threadgroup",
    "thread_index_in_simdgroup": "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup": "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup": "simdgroups_per_threadgroup",
    "threads_per_simdgroup": "threads_per_simdgroup",
}

KERNEL_RE = re.compile(r"\[\[\s*kernel\s*\]\]\s*void\s+(\w+)\s*\(")
INSTANTIATION_RE = re.compile(
    r"template\s*\[\[\s*host_name\(\s*\"([^\"]+)\"\s*\)\s*\]\]\s*\[\[\s*kernel\s*\]\]\s*"
    r"decltype\(\s*(\w+)\s*<([^;]*?)>\s*\)\s*(\w+)\s*<([^;]*?)>\s*;"
)
HOST_NAME_ATTR_RE = re.compile(r"\[\[\s*host_name\s*\(")
COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
TOKEN_RE = re.compile(r"\w+|\S")
# The element types of our kernels and the host-name suffix of each (torch_metal_fused/backends/metal.py,
# DTYPE_SUFFIX: the host asks for `<base>_<variant>_<suffix>`).
ELEMENT_TYPES = ("float", "half", "bfloat")
THREADGROUP_ATTR_RE = re.compile(r"\[\[\s*threadgroup\s*\(")
LOCAL_TG_RE = re.compile(
    r"^(?P<indent>[ \t]*)threadgroup\s+(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\])+)\s*;"
)
VECTOR_CTOR_RE = re.compile(
    r"(?<![\w.])((?:float|half|bfloat|int|uint|long|ulong|short|ushort|char|uchar|bool)[234])\s*\("
)
PARAM_ATTR_RE = re.compile(r"\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]")
# MSL: a kernel's position attributes must all be scalars or all vectors of one width (Apple's compiler: "expecting
# input declarations with either all scalar types or all vector types with the same number of elements"); clang
# accepts any mix. thread_index_in_threadgroup and the SIMD-group attributes are scalars and exempt.
POSITION_ATTRS = (
    "thread_position_in_grid",
    "threadgroup_position_in_grid",
    "thread_position_in_threadgroup",
    "threads_per_threadgroup",
    "threads_per_grid",
    "threadgroups_per_grid",
)
MAX_BUFFER_INDEX = 30  # MSL: buffer indices 0-30 (31 argument buffers)
ADDRESS_SPACE_RE = re.compile(r"\b(device|constant|threadgroup|thread|ray_data|object_data)\b")
# C++ that MSL does not have and clang accepts: the standard library, exceptions, dynamic allocation.
FORBIDDEN_CXX_RE = re.compile(r"\bstd::|\b(throw|try|catch|new|delete|virtual|goto)\b")
# A floating literal without a suffix (0.5, 1e-6) or the double type: Metal has no double, so a Mac computes such
# expressions in float, while the harness's C++ computes them in double (a harness that passes on other numbers).
DOUBLE_RE = re.compile(
    r"(?<![\w.])(?:\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)(?![\w.])|\bdouble\b"
)
BFLOAT_GUARD_RE = re.compile(r"^\s*#\s*if\s+(?:defined\s*\(\s*__HAVE_BFLOAT__\s*\)|__METAL_VERSION__\s*>=\s*310)")
PARAM_TYPE_RE = re.compile(r"^\s*(?:const\s+)?(\w+?)([234])?\s+\w+\s*\[\[")


class PrepassError(ValueError):
    pass


@dataclass
class Kernel:
    name: str
    line: int
    bindings: list[tuple[str, int]] = field(default_factory=list)
    instantiated: bool = False


@dataclass
class Prepassed:
    source: str  # C++ for clang, starting with #include of the bindings header and #line
    bindings_header: str
    kernels: dict[str, Kernel]
    host_names: list[str]


def _matching_paren(text: str, open_index: int) -> int:
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise PrepassError("unbalanced parentheses in a kernel signature")


def _split_params(params: str) -> list[str]:
    out, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(params[start:i])
            start = i + 1
    if params[start:].strip():
        out.append(params[start:])
    return out


def _parse_kernels(text: str, path: str) -> dict[str, Kernel]:
    kernels: dict[str, Kernel] = {}
    for m in KERNEL_RE.finditer(text):
        name = m.group(1)
        line = text.count("\n", 0, m.start()) + 1
        close = _matching_paren(text, m.end() - 1)
        kernel = Kernel(name, line)
        for param in _split_params(text[m.end() : close]):
            attrs = PARAM_ATTR_RE.findall(param)
            if not attrs:
                raise PrepassError(
                    f"{path}:{line}: parameter {param.strip()!r} of kernel {name} has no [[...]] attribute"
                )
            attr, index = attrs[-1]
            if attr not in ROLES:
                raise PrepassError(f"{path}:{line}: unsupported parameter attribute [[{attr}]] in kernel {name}")
            kernel.bindings.append((ROLES[attr], int(index or 0)))
        params = _split_params(COMMENT_RE.sub(" ", text[m.end() : close]))
        _check_position_widths(params, f"{path}:{line}", name)
        _check_buffer_params(params, f"{path}:{line}", name)
        if name in kernels:
            raise PrepassError(f"{path}:{line}: kernel {name} defined twice")
        kernels[name] = kernel
    return kernels


def _check_position_widths(params: list[str], where: str, kernel: str) -> None:
    """The MSL rule of POSITION_ATTRS (above), which the harness's clang does not enforce. params: the kernel's
    parameters, comments removed."""
    widths: dict[str, int] = {}
    for param in params:
        attrs = PARAM_ATTR_RE.findall(param)
        if not attrs or attrs[-1][0] not in POSITION_ATTRS:
            continue
        m = PARAM_TYPE_RE.match(param)
        if not m:
            raise PrepassError(f"{where}: cannot read the type of {param.strip()!r} in kernel {kernel}")
        widths[f"{' '.join(param.split()[:2])} [[{attrs[-1][0]}]]"] = int(m.group(2) or 1)
    if len(set(widths.values())) > 1:
        raise PrepassError(
            f"{where}: kernel {kernel} mixes scalar and vector (or different-width) position attributes: "
            f"{', '.join(widths)}; Apple's Metal compiler rejects this (all scalars, or all vectors of one width)"
        )


def _check_buffer_params(params: list[str], where: str, kernel: str) -> None:
    """MSL: a [[buffer(n)]] parameter is a pointer or reference in the device or constant address space (clang
    accepts a plain pointer), and n <= 30. params: as _check_position_widths's."""
    for param in params:
        attrs = PARAM_ATTR_RE.findall(param)
        if not attrs or attrs[-1][0] != "buffer":
            continue
        shown = " ".join(param.split())
        if int(attrs[-1][1] or 0) > MAX_BUFFER_INDEX:
            raise PrepassError(f"{where}: {shown!r} in kernel {kernel}: MSL allows buffer indices 0-{MAX_BUFFER_INDEX}")
        space = ADDRESS_SPACE_RE.search(param)
        if not space or space.group(1) not in ("device", "constant"):
            raise PrepassError(
                f"{where}: {shown!r} in kernel {kernel} needs the device or constant address space "
                "(Apple's compiler rejects a buffer argument without one)"
            )


def _check_msl_subset(text: str, shown: str) -> None:
    """Rules of the MSL specification that the harness's C++ compiler does not enforce, checked on the source text
    (comments and string literals blanked, lines kept): no standard library, exceptions, dynamic allocation, virtual
    functions or goto; no double (a floating literal without a suffix is one); every use of bfloat inside a `#if
    defined(__HAVE_BFLOAT__)` (or `__METAL_VERSION__ >= 310`) block, since Metal before 3.1 (macOS 13) has no bfloat and
    the file must still compile there for float and half."""
    code = COMMENT_RE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    code = re.sub(r'"(?:[^"\\\n]|\\.)*"', lambda m: " " * len(m.group(0)), code)
    depth_guard: list[bool] = []  # one entry per open #if: whether it is (or is inside) a bfloat guard
    for number, line in enumerate(code.split("\n"), start=1):
        directive = line.strip()
        if directive.startswith("#"):
            word = directive[1:].strip().split(" ", 1)[0].split("(", 1)[0]
            if word in ("if", "ifdef", "ifndef"):
                inside = bool(depth_guard and depth_guard[-1])
                depth_guard.append(inside or bool(BFLOAT_GUARD_RE.match(line)))
            elif word in ("else", "elif") and depth_guard:
                depth_guard[-1] = bool(len(depth_guard) > 1 and depth_guard[-2])
            elif word == "endif" and depth_guard:
                depth_guard.pop()
            continue
        m = FORBIDDEN_CXX_RE.search(line)
        if m:
            raise PrepassError(f"{shown}:{number}: {m.group(0)!r} is C++ that the Metal Shading Language does not have")
        m = DOUBLE_RE.search(line)
        if m:
            raise PrepassError(
                f"{shown}:{number}: {m.group(0)!r} is a double in C++: Metal has no double and computes it in float, "
                "the harness would compute in double (write a float literal: 0.5f)"
            )
        if re.search(r"\bbfloat\d?\b", line) and not (depth_guard and depth_guard[-1]):
            raise PrepassError(
                f"{shown}:{number}: bfloat outside `#if defined(__HAVE_BFLOAT__)`: Metal before 3.1 has no bfloat, "
                "and the whole file would fail to compile there (float and half kernels included)"
            )


def _tokens(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


def _dtype_suffix(host: str) -> str | None:
    suffix = host.rsplit("_", 1)[-1] if "_" in host else None
    return suffix if suffix in ELEMENT_TYPES else None


def _check_instantiation(where: str, host: str, base: str, targs: str, name: str, args: str) -> None:
    """The rules an instantiation `template [[host_name("host")]] [[kernel]] decltype(base<targs>) name<args>;`
    must satisfy (where = "file:line").

    - decltype names the declared specialisation: same template, same arguments token for token (Apple's
      compiler requires the types to match; we compare spellings, so write both halves identically).
    - dtype suffix: the element type is the first template argument. If it is one of float/half/bfloat, the
      host name must end with `_<that type>`; and a host name ending with `_float`/`_half`/`_bfloat` must be
      instantiated with that type as first argument. The host launch code selects kernels by that suffix
      alone, so a mismatch would bind the wrong variant to a dtype (a bfloat16-only slip our numerical
      tests can miss)."""
    declared = f"{name}<{' '.join(args.split())}>"
    if base != name or _tokens(targs) != _tokens(args):
        raise PrepassError(
            f"{where}: instantiation {host!r}: decltype({base}<{' '.join(targs.split())}>) names another "
            f"specialisation than the declared {declared}; Apple's Metal compiler rejects this "
            "(write the same template and arguments in both places)"
        )
    parts = _split_params(args)
    first = " ".join(parts[0].split()) if parts else ""
    suffix = _dtype_suffix(host)
    if (first in ELEMENT_TYPES or suffix is not None) and suffix != first:
        wanted = f"end with _{first}" if first in ELEMENT_TYPES else "not end with a dtype suffix"
        raise PrepassError(
            f"{where}: host name {host!r} does not match {declared}: its element type (first template "
            f"argument) is {first!r}, so the host name must {wanted} (host names select kernels by their "
            "_float/_half/_bfloat suffix)"
        )


def _check_unconverted_host_names(text: str, shown: str) -> None:
    """A `[[host_name(...)]]` left after the rewrite is an instantiation in a form the pre-pass does not
    understand: it would compile without being registered, so reject it."""
    code = COMMENT_RE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    m = HOST_NAME_ATTR_RE.search(code)
    if m:
        line = code.count("\n", 0, m.start()) + 1
        raise PrepassError(
            f"{shown}:{line}: [[host_name(...)]] outside an instantiation of the form "
            '`template [[host_name("name")]] [[kernel]] decltype(f<T>) f<T>;` (it would not be registered)'
        )


# The shaders the package ships: the MSL-subset rules (_check_msl_subset) apply to them; the harness's own test shaders
# (tests/emulator_shaders/) may use what only the harness has.
SHIPPED_SHADERS = Path(__file__).resolve().parents[2] / "shaders"


def prepass(path: Path, msl_subset: bool | None = None) -> Prepassed:
    """msl_subset: check _check_msl_subset's rules (default: for the shipped shaders)."""
    text = path.read_text()
    shown = str(path)
    if msl_subset if msl_subset is not None else path.resolve().parent == SHIPPED_SHADERS:
        _check_msl_subset(text, shown)
    kernels = _parse_kernels(text, shown)
    host_names: list[str] = []
    host_lines: dict[str, int] = {}

    def register(host: str, line: int) -> None:
        if host in host_lines:
            raise PrepassError(
                f"{shown}:{line}: host name {host!r} registered twice (first at {shown}:{host_lines[host]})"
            )
        host_lines[host] = line
        host_names.append(host)

    def instantiate(m: re.Match) -> str:
        host, base, targs = m.group(1), m.group(2), m.group(3)
        line = text.count("\n", 0, m.start()) + 1
        if base not in kernels:
            raise PrepassError(f"{shown}:{line}: {host} instantiates {base}, which is not a [[kernel]]")
        _check_instantiation(f"{shown}:{line}", host, base, targs, m.group(4), m.group(5))
        kernels[base].instantiated = True
        register(host, line)
        rewritten = f'TMF_INSTANTIATE("{host}", {base}, {base}<{targs}>)'
        # Keep the line count: the instantiation may span lines.
        return rewritten + "\n" * m.group(0).count("\n")

    out = INSTANTIATION_RE.sub(instantiate, text)
    _check_unconverted_host_names(out, shown)
    out = THREADGROUP_ATTR_RE.sub("[[tmf_threadgroup(", out)
    out = VECTOR_CTOR_RE.sub(r"tmf_make<\1>(", out)
    file_id = zlib.crc32(shown.encode()) & 0xFFFFF
    lines = out.split("\n")
    for i, line in enumerate(lines):
        m = LOCAL_TG_RE.match(line)
        if not m:
            continue
        site = (file_id << 20) | (i + 1)
        t, name, dims = m.group("type"), m.group("name"), m.group("dims")
        alias = f"tmf_tg_{name}_t"
        lines[i] = (
            f"{m.group('indent')}typedef {t} {alias}{dims}; "
            f"threadgroup {alias}& {name} = TMF_THREADGROUP_LOCAL({site}ull, {alias});" + line[m.end() :]
        )
    out = "\n".join(lines)
    tail = []
    for k in kernels.values():
        if not k.instantiated:
            register(k.name, k.line)
            tail.append(f'#line {k.line} "{shown}"\nTMF_INSTANTIATE("{k.name}", {k.name}, {k.name})')
    header_lines = ["#pragma once", '#include "tmf_emu/runtime_api.h"']
    for k in kernels.values():
        rows = ", ".join(f"{{::tmf_emu::Role::{role}, {index}}}" for role, index in k.bindings)
        header_lines.append(f"static const ::tmf_emu::Binding tmf_bindings_{k.name}[] = {{{rows}}};")
    source = f'#line 1 "{shown}"\n{out}\n' + "\n".join(tail) + "\n"
    return Prepassed(source, "\n".join(header_lines) + "\n", kernels, host_names)
