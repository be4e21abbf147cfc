"""The constants and argument structs of csrc/include/tmf/shader_args.h, read from the header itself, so the launch
plans and the shaders share one definition (as PyTorch's c10/metal/common.h does for its host and shaders)."""

from __future__ import annotations

import re

from torch_metal_fused.backends.metal_library import SHADERS, Params, find_header, struct_words

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


def params(struct_name: str, **fields) -> Params:
    """An argument struct's bytes (as int32 words) from its fields by name: every field must be given."""
    layout = STRUCTS[struct_name]
    names = [f for f, _ in layout]
    if set(fields) != set(names):
        missing, extra = set(names) - set(fields), set(fields) - set(names)
        raise TypeError(f"tmf::{struct_name}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
    values = [float(fields[f]) if t == "float" else int(fields[f]) for f, t in layout]
    return Params(tuple(struct_words("".join(_FORMATS[t] for _, t in layout), *values)))


def constant(name: str) -> int:
    return CONSTANTS[name]
