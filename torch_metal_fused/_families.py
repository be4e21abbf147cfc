"""Kernel families: one per shader file (shaders/<family>.metal), each the prefix of its kernel entry points (as
tmf::launch::kKernelFamilies in csrc/include/tmf/launch/common.h). Below the dispatcher (_backend re-exports them), so
that the harness's compile_shader stand-in can name a kernel's family without importing the dispatcher."""

from __future__ import annotations

FAMILIES = {
    "softmax": "softmax_",
    "rms_norm": "rms_norm_",
    "lora_linear": "lora_",
    "cross_entropy": "cross_entropy_",
    "glu": "glu_",
    "rope": "rope_",
    "attention": "attention_",
}


def family_of_entry(entry_point: str) -> str:
    """The kernel family of a kernel entry point (e.g. "rms_norm_backward" -> "rms_norm")."""
    for family, prefix in FAMILIES.items():
        if entry_point.startswith(prefix):
            return family
    raise ValueError(f"{entry_point!r} belongs to no kernel family")
