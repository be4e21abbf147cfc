"""The manifest of the public ops: each op's kernel family (one per shader file, shaders/<family>.metal, whose name
prefixes its kernel entry points; the harness's C++ family table is generated from it by emulator/build.py), its
contract test file and its benchmark op. The test suite's op list (tests/helpers.py PUBLIC_OPS), the kernel-coverage
rule's contract files, the families, the doctor's self-test (each family's ops module) and the per-op cases of the
shared tests (each contract file) are derived from it; the benchmark's op list is checked against it. Below the
dispatcher (_backend re-exports FAMILIES), so that the harness's compile_shader stand-in can name a kernel's family
without importing the dispatcher."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpEntry:
    name: str  # the public function, torch_metal_fused.<name>
    family: str  # its kernel family
    contract: str  # tests/<file>: its contract on every backend parameter
    bench: str | None  # its op in python -m torch_metal_fused.bench (None: benchmarked with another op)


OPS: tuple[OpEntry, ...] = (
    OpEntry("softmax", "softmax", "test_softmax.py", "softmax"),
    OpEntry("rms_norm", "rms_norm", "test_rms_norm.py", "rms_norm"),
    OpEntry("add_rms_norm", "rms_norm", "test_add_rms_norm.py", "add_rms_norm"),
    OpEntry("lora_linear", "lora_linear", "test_lora_linear.py", "lora"),
    OpEntry("cross_entropy", "cross_entropy", "test_cross_entropy.py", "cross_entropy"),
    OpEntry("linear_cross_entropy", "cross_entropy", "test_cross_entropy.py", None),
    OpEntry("glu", "glu", "test_glu.py", "swiglu"),
    OpEntry("swiglu", "glu", "test_glu.py", None),
    OpEntry("geglu", "glu", "test_glu.py", None),
    OpEntry("rope", "rope", "test_rope.py", "rope"),
    OpEntry("attention", "attention", "test_attention.py", "attention"),
)

# A family's kernels are named <family>_...; except these.
KERNEL_PREFIXES = {"lora_linear": "lora_"}
FAMILIES = {f: KERNEL_PREFIXES.get(f, f + "_") for f in dict.fromkeys(op.family for op in OPS)}


def family_of_entry(entry_point: str) -> str:
    """The kernel family of a kernel entry point (e.g. "rms_norm_backward" -> "rms_norm")."""
    for family, prefix in FAMILIES.items():
        if entry_point.startswith(prefix):
            return family
    raise ValueError(f"{entry_point!r} belongs to no kernel family")
