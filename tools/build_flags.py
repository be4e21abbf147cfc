"""Compiler flags of the macOS (MPS) extension, shared by setup.py and the Linux syntax check of the
Objective-C++ sources (tests/test_mps_sources.py), so the check compiles what a Mac would."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# C++20 as torch's own cpp_extension default (torch >= 2.10 headers use C++20 features). Manual
# retain/release, not ARC: csrc/mps/metal_library.mm releases what it creates and leaks the cache on purpose.
MPS_CXX_FLAGS = ["-std=c++20", "-O2", "-fno-objc-arc"]
MPS_DEFINES = [("TMF_WITH_METAL", "1")]

# The oldest macOS the extension and the metallib load on: torch 2.13's macOS wheels need 14, and so does Metal 3.1
# (bfloat). Without it Apple's tools stamp the build machine's SDK version, and an older macOS refuses to load it.
MACOS_DEPLOYMENT_TARGET = "14.0"
MACOS_VERSION_MIN_FLAG = f"-mmacosx-version-min={MACOS_DEPLOYMENT_TARGET}"
# Added to the compile flags by setup.py, not kept in MPS_CXX_FLAGS: clang warns that it is unused when the Linux
# syntax check (tests/test_mps_sources.py) compiles with MPS_CXX_FLAGS for a Linux target.
MPS_DEPLOYMENT_FLAGS = [MACOS_VERSION_MIN_FLAG]
MPS_LINK_FLAGS = ["-framework", "Metal", "-framework", "Foundation", *MPS_DEPLOYMENT_FLAGS]


def mps_sources() -> list[str]:
    """Sources of the macOS extension, relative to the repository root."""
    mm = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "mps").glob("*.mm"))
    return [*mm, "csrc/bindings.cpp"]


def mps_include_dirs(generated: Path) -> list[str]:
    """`generated` holds tmf_embedded_shaders.h (tools/embed_shaders.py)."""
    return [str(ROOT / "csrc"), str(ROOT / "csrc" / "include"), str(generated)]
