"""docs/configuration.md lists every TORCH_METAL_FUSED_* environment variable the code reads."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("torch_metal_fused", "csrc", "tools", "benchmarks", "setup.py")
SUFFIXES = {".py", ".cpp", ".h", ".mm", ".cu", ".cuh", ".sh"}
NAME = re.compile(r"TORCH_METAL_FUSED_[A-Z0-9_]*[A-Z0-9]")


def _names_in_code() -> set[str]:
    names: set[str] = set()
    for top in SOURCES:
        path = ROOT / top
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in SUFFIXES]
        for f in files:
            names |= set(NAME.findall(f.read_text(errors="replace")))
    return names


def test_every_environment_variable_is_documented():
    documented = set(NAME.findall((ROOT / "docs" / "configuration.md").read_text()))
    in_code = _names_in_code()
    assert "TORCH_METAL_FUSED_BACKEND" in in_code  # the scan finds what the code reads
    missing = in_code - documented
    assert not missing, f"read by the code but not in docs/configuration.md: {sorted(missing)}"
    stale = documented - in_code
    assert not stale, f"in docs/configuration.md but read nowhere: {sorted(stale)}"
