"""The constants and argument structs of csrc/include/tmf/shader_args.h, read from the header itself, so the launch
plans and the shaders share one definition (as PyTorch's c10/metal/common.h does for its host and shaders)."""

from __future__ import annotations

import functools
import math
import re
import struct

from torch_metal_fused.backends.metal_library import SHADERS, Params, find_header

HEADER = find_header("tmf/shader_args.h", SHADERS / "shader_args")  # packaged beside the shaders, or csrc/include
_CONSTANT_RE = re.compile(r"TMF_SHARED_CONSTANT\s+uint\s+(k\w+)\s*=\s*(\d+)\s*;")
_STRUCT_RE = re.compile(r"struct\s+(\w+)\s*\{(.*?)\};", re.S)
_FIELD_RE = re.compile(r"^\s*(uint|int|float)\s+(\w+)\s*;", re.M)
_FORMATS = {"uint": "I", "int": "i", "float": "f"}


def _parse(text: str) -> tuple[dict[str, int], dict[str, list[tuple[str, str]]]]:
    text = re.sub(r"//[^\n]*", "", text)
    constants = {name: int(value) for name, value in _CONSTANT_RE.findall(text)}
    structs = {name: [(f, t) for t, f in _FIELD_RE.findall(body)] for name, body in _STRUCT_RE.findall(text)}
    return constants, structs


CONSTANTS, STRUCTS = _parse(HEADER.read_text())


@functools.cache
def _layout(struct_name: str) -> tuple[tuple[str, ...], tuple[bool, ...], struct.Struct, int]:
    fields = STRUCTS[struct_name]
    packed = struct.Struct("<" + "".join(_FORMATS[t] for _, t in fields))
    return tuple(f for f, _ in fields), tuple(t == "float" for _, t in fields), packed, packed.size // 4


def params(struct_name: str, **fields) -> Params:
    """An argument struct's bytes (as int32 words) from its fields by name: every field must be given."""
    names, is_float, packed, words = _layout(struct_name)
    if len(fields) != len(names) or not all(n in fields for n in names):
        missing, extra = set(names) - set(fields), set(fields) - set(names)
        raise TypeError(f"tmf::{struct_name}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
    values = [float(fields[n]) if f else int(fields[n]) for n, f in zip(names, is_float)]
    try:
        raw = packed.pack(*values)
    except OverflowError:  # a finite float past float32's range (eps=1e39): ±inf, as torch rounds it to float32
        values = [_float32_or_inf(v) if f else v for v, f in zip(values, is_float)]
        raw = packed.pack(*values)
    return Params(struct.unpack(f"<{words}i", raw))


def _float32_or_inf(v: float) -> float:
    try:
        struct.pack("<f", v)
    except OverflowError:
        return math.copysign(math.inf, v)
    return v


def constant(name: str) -> int:
    return CONSTANTS[name]
