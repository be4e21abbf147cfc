"""The Objective-C++ MPS dispatch (csrc/mps/*.mm) cannot be built or run without a Mac. This compiles it on
Linux with clang (`-fsyntax-only`, the same flags and defines setup.py uses on macOS) against the real
PyTorch MPS headers and hand-written declarations of the Apple API it calls (tests/apple_api_stubs/): C++ and
Objective-C errors, undeclared selectors and type mismatches with torch's headers fail here. Whether Apple's SDK
matches those declarations is only settled by a build on a Mac."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import harness_required
from torch.utils import cpp_extension

from torch_metal_fused.emulator.build import SHADERS, find_clang, lint_address_spaces, shader_paths

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "tests" / "apple_api_stubs"
sys.path.insert(0, str(ROOT / "tools"))
from build_flags import MPS_CXX_FLAGS, MPS_DEFINES, mps_include_dirs, mps_sources  # noqa: E402
from embed_shaders import inline_includes, write_embedded_header  # noqa: E402


def _clang() -> str:
    """clang 19, as the harness: skipped where it is missing, except in CI on Linux, where it must exist."""
    try:
        return find_clang()
    except RuntimeError as e:
        if harness_required():
            raise
        pytest.skip(str(e))


def _syntax_check(
    source: Path, generated: Path, extra: tuple[str, ...] = (), first_includes: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess:
    """Quoted includes resolve next to `source` first, so a planted copy of csrc/mps/ checks its own headers;
    `first_includes` shadow any header (an older torch's, say)."""
    flags = [f for f in MPS_CXX_FLAGS if not f.startswith("-O")]
    cmd = [
        _clang(),
        "-x",
        "objective-c++" if source.suffix == ".mm" else "c++",
        "-fsyntax-only",
        *flags,
        "-fblocks",
        "-fobjc-runtime=gnustep-2.0",  # an Objective-C runtime clang accepts on Linux; syntax only
        "-fconstant-string-class=NSString",
        "-Werror=objc-method-access",  # calling a selector the receiver does not declare
        *[f"-D{k}={v}" for k, v in MPS_DEFINES],
        *[f"-I{d}" for d in first_includes],
        f"-I{STUBS}",
        *[f"-I{d}" for d in mps_include_dirs(generated)],
        *[f"-I{d}" for d in cpp_extension.include_paths()],
        f"-I{sysconfig.get_paths()['include']}",
        *extra,
        str(source),
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    write_embedded_header(ROOT / "shaders", ROOT / "csrc" / "include", out / "tmf_embedded_shaders.h")
    return out


def test_mps_sources_compile(generated):
    """Every source of the macOS extension, in parallel (each pulls in torch/extension.h)."""
    sources = mps_sources()
    assert any(s.endswith(".mm") for s in sources)
    with ThreadPoolExecutor() as pool:
        results = list(pool.map(lambda s: _syntax_check(ROOT / s, generated), sources))
    failures = {s: r.stderr for s, r in zip(sources, results) if r.returncode != 0}
    assert not failures, "\n".join(f"== {s}\n{err}" for s, err in failures.items())


def test_a_misspelled_selector_fails_the_check(generated, tmp_path):
    """The check is not vacuous: a selector Metal does not have is an error."""
    shutil.copytree(ROOT / "csrc" / "mps", tmp_path / "mps")
    encoder = tmp_path / "mps" / "mps_encoder.h"
    text = encoder.read_text()
    assert "setComputePipelineState:(__bridge id<MTLComputePipelineState>)p.handle];" in text
    encoder.write_text(text.replace("setComputePipelineState:", "setComputePipeline:"))
    result = _syntax_check(tmp_path / "mps" / "softmax.mm", generated)
    assert result.returncode != 0 and "setComputePipeline:" in result.stderr, result.stderr


def test_compile_options_build_with_the_macos_14_sdk(generated, tmp_path):
    """MTLCompileOptions.mathMode exists only in the macOS 15 SDK: Xcode 15 on macOS 14 (our minimum) must still
    build metal_library.mm, through its __MAC_15_0 guard (and the guard is what makes it build)."""
    library = ROOT / "csrc" / "mps" / "metal_library.mm"
    result = _syntax_check(library, generated, ("-DTMF_STUB_MACOS_14_SDK",))
    assert result.returncode == 0, result.stderr
    shutil.copytree(ROOT / "csrc" / "mps", tmp_path / "mps")
    unguarded = tmp_path / "mps" / "metal_library.mm"
    text = unguarded.read_text()
    assert "#if defined(__MAC_15_0)" in text
    unguarded.write_text(text.replace("#if defined(__MAC_15_0)", "#if 1"))
    result = _syntax_check(unguarded, generated, ("-DTMF_STUB_MACOS_14_SDK",))
    assert result.returncode != 0 and "mathMode" in result.stderr, result.stderr


def _torch_before_2_9(tmp_path: Path, minor: int | None) -> Path:
    """Headers that shadow torch's: MPSDevice without getCoreCount() (added in torch 2.9) and, with `minor`, a
    torch/version.h of 2.<minor>."""
    real = Path(cpp_extension.include_paths()[0]) / "ATen" / "mps" / "MPSDevice.h"
    text = real.read_text()
    assert "getCoreCount()" in text
    (tmp_path / "ATen" / "mps").mkdir(parents=True)
    (tmp_path / "ATen" / "mps" / "MPSDevice.h").write_text(
        "\n".join(line for line in text.splitlines() if "getCoreCount" not in line)
    )
    if minor is not None:
        (tmp_path / "torch").mkdir()
        (tmp_path / "torch" / "version.h").write_text(
            f"#pragma once\n#define TORCH_VERSION_MAJOR 2\n#define TORCH_VERSION_MINOR {minor}\n"
            f'#define TORCH_VERSION_PATCH 0\n#define TORCH_VERSION "2.{minor}.0"\n'
        )
    return tmp_path


def test_the_extension_builds_against_torch_before_2_9(generated, tmp_path):
    """setup.py accepts torch >= 2.4, but MPSDevice::getCoreCount() first shipped in 2.9: the encoder must not call it
    there (its version guard); with 2.13's version and an MPSDevice without it, the same source must fail (the guard
    is what makes it build)."""
    old = _torch_before_2_9(tmp_path / "old", minor=8)
    result = _syntax_check(ROOT / "csrc" / "mps" / "softmax.mm", generated, first_includes=(old,))
    assert result.returncode == 0, result.stderr
    unguarded = _torch_before_2_9(tmp_path / "unguarded", minor=None)
    result = _syntax_check(ROOT / "csrc" / "mps" / "softmax.mm", generated, first_includes=(unguarded,))
    assert result.returncode != 0 and "getCoreCount" in result.stderr, result.stderr


def test_arc_would_reject_the_manual_release(generated):
    """metal_library.mm uses manual retain/release: setup.py must keep ARC off (-fno-objc-arc)."""
    assert "-fno-objc-arc" in MPS_CXX_FLAGS
    result = _syntax_check(ROOT / "csrc" / "mps" / "metal_library.mm", generated, ("-fobjc-arc",))
    assert result.returncode != 0 and "release" in result.stderr, result.stderr


def test_embedded_shader_sources_are_self_contained(tmp_path):
    """The sources the extension compiles at first use on a Mac (tools/embed_shaders.py) have every quoted
    include inlined, and each compiles on its own through the strict address-space pass."""
    _clang()
    for src in shader_paths():
        text = inline_includes(src, [SHADERS, ROOT / "csrc" / "include"])
        assert not re.search(r'^\s*#\s*include\s*"', text, re.M), src.name
        assert "#include <metal_stdlib>" in text
        standalone = tmp_path / "standalone" / src.name
        standalone.parent.mkdir(exist_ok=True)
        standalone.write_text(text)
        lint_address_spaces(standalone, tmp_path / f"lint_{src.stem}")
