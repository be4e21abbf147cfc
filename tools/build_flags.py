"""Compiler flags of the macOS (MPS) extension, shared by setup.py and the Linux syntax check of the
Objective-C++ sources (tests/test_mps_sources.py), so the check compiles what a Mac would."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# C++20 as torch's own cpp_extension default (torch >= 2.10 headers use C++20 features). Manual
# retain/release, not ARC: csrc/mps/metal_library.mm releases what it creates and leaks the cache on purpose.
MPS_CXX_FLAGS = ["-std=c++20", "-O2", "-fno-objc-arc"]
MPS_DEFINES = [("TMF_WITH_METAL", "1")]
MPS_LINK_FLAGS = ["-framework", "Metal", "-framework", "Foundation"]


def mps_sources() -> list[str]:
    """Sources of the macOS extension, relative to the repository root."""
    mm = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "mps").glob("*.mm"))
    return [*mm, "csrc/bindings.cpp"]


def mps_include_dirs(generated: Path) -> list[str]:
    """`generated` holds tmf_embedded_shaders.h (tools/embed_shaders.py)."""
    return [str(ROOT / "csrc"), str(ROOT / "csrc" / "include"), str(generated)]
