"""The coverage rule: every kernel the harness registers (every op, variant, dtype and option with its own host
name) must be executed by at least one test that checks a result numerically against the float64 reference
(torch_metal_fused.testing.assert_matches). conftest.py records, per passing test, the kernels it dispatched on
the harness and whether it made such a check; test_zz_kernel_coverage.py applies the rule after the whole suite.
New kernels are covered by construction: one without a numerical test fails the rule by name."""

from __future__ import annotations

from torch_metal_fused._families import OPS

# Test files whose cases the rule relies on: without all of them collected (a -k or file subset), it cannot judge.
CONTRACT_FILES = frozenset(
    {op.contract for op in OPS} | {"test_edge_values.py", "test_emulator_kernels.py"}
)  # each op's contract file (the manifest, torch_metal_fused/_families.py), edge values, every kernel's drive

numerically_tested: dict[str, str] = {}  # kernel -> the first passing numerical test that dispatched it
suite = {"deselected": False, "collected_files": set()}


def record(test_id: str, kernels: set[str], made_numerical_check: bool) -> None:
    if made_numerical_check:
        for k in kernels:
            numerically_tested.setdefault(k, test_id)


def uncovered(registered: list[str], tested: dict[str, str]) -> list[str]:
    """The registered kernels no numerical test reached."""
    return sorted(set(registered) - set(tested))


def judgeable() -> str | None:
    """Why the rule cannot be applied to this run (None if it can)."""
    if suite["deselected"]:
        return "tests were deselected (-k/-m): the rule needs the whole suite"
    missing = CONTRACT_FILES - suite["collected_files"]
    if missing:
        return f"the contract files {sorted(missing)} were not collected: the rule needs the whole suite"
    return None
