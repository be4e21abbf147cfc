"""Line-preserving rewrite of a Metal source into C++ that clang 19 compiles against the harness prelude.

Every rewrite stays on its original line and the output starts with `#line 1 "<the .metal file>"`, so
compiler errors, checker reports and debug info point at the real shader file and line.

- `template [[host_name("n")]] [[kernel]] decltype(f<T>) f<T>;`  ->  `TMF_INSTANTIATE("n", f, f<T>)`
  (registers the instantiation with the runner under its host name); non-template kernels are registered
  under their own name at the end of the file.
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
    r"decltype\(\s*(\w+)\s*<([^;]*?)>\s*\)\s*\w+\s*<[^;]*?>\s*;"
)
THREADGROUP_ATTR_RE = re.compile(r"\[\[\s*threadgroup\s*\(")
LOCAL_TG_RE = re.compile(
    r"^(?P<indent>[ \t]*)threadgroup\s+(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\])+)\s*;"
)
VECTOR_CTOR_RE = re.compile(r"(?<![\w.])((?:float|half|bfloat|int|uint|short|ushort|char|uchar|bool)[234])\s*\(")
PARAM_ATTR_RE = re.compile(r"\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]")


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
        if name in kernels:
            raise PrepassError(f"{path}:{line}: kernel {name} defined twice")
        kernels[name] = kernel
    return kernels


def prepass(path: Path) -> Prepassed:
    text = path.read_text()
    shown = str(path)
    kernels = _parse_kernels(text, shown)
    host_names: list[str] = []

    def instantiate(m: re.Match) -> str:
        host, base, targs = m.group(1), m.group(2), m.group(3)
        if base not in kernels:
            line = text.count("\n", 0, m.start()) + 1
            raise PrepassError(f"{shown}:{line}: {host} instantiates {base}, which is not a [[kernel]]")
        kernels[base].instantiated = True
        host_names.append(host)
        rewritten = f'TMF_INSTANTIATE("{host}", {base}, {base}<{targs}>)'
        # Keep the line count: the instantiation may span lines.
        return rewritten + "\n" * m.group(0).count("\n")

    out = INSTANTIATION_RE.sub(instantiate, text)
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
            host_names.append(k.name)
            tail.append(f'#line {k.line} "{shown}"\nTMF_INSTANTIATE("{k.name}", {k.name}, {k.name})')
    header_lines = ["#pragma once", '#include "tmf_emu/runtime_api.h"']
    for k in kernels.values():
        rows = ", ".join(f"{{::tmf_emu::Role::{role}, {index}}}" for role, index in k.bindings)
        header_lines.append(f"static const ::tmf_emu::Binding tmf_bindings_{k.name}[] = {{{rows}}};")
    source = f'#line 1 "{shown}"\n{out}\n' + "\n".join(tail) + "\n"
    return Prepassed(source, "\n".join(header_lines) + "\n", kernels, host_names)
