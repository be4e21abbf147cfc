"""The macOS build, without a Mac: the Metal commands setup.py runs carry the deployment target and language flags,
and the probe of Apple's toolchain tells each way it can be missing apart (fake `xcrun` scripts first on PATH),
so a Mac user's first `pip install` either prebuilds the metallib or says what to install."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from pathlib import Path
from types import ModuleType

import pytest
import setuptools

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_flags  # noqa: E402
import embed_shaders  # noqa: E402
from metal_toolchain import (  # noqa: E402
    DOWNLOAD_HINT,
    metal_compile_command,
    metallib_command,
    probe_metal_toolchain,
)

MIN_FLAG = "-mmacosx-version-min=14.0"
INCLUDES = [ROOT / "shaders", ROOT / "csrc" / "include"]

# Fake `xcrun`s, POSIX sh with builtins only (PATH may hold nothing else). Each logs its arguments, one call a line.
_LOG = 'printf "%s\\n" "$*" >> "$(dirname "$0")/calls.log"\n'
# What `-o` names is written, as the real tools do.
_WRITE_OUTPUT = 'prev=""; for a in "$@"; do [ "$prev" = "-o" ] && : > "$a"; prev="$a"; done\n'
# Exit status and messages of Xcode 26 / the command-line tools.
FAKE_XCRUN = {
    "ok": _WRITE_OUTPUT + "exit 0\n",
    # Command-line tools only: no `metal` at all, not even for `-f`.
    "no_metal": "echo 'xcrun: error: unable to find utility \"metal\", not a developer tool or in PATH' >&2\nexit 72\n",
    # Xcode 26 without the downloaded component: `-f` resolves, running it fails.
    "no_toolchain": (
        'case "$*" in *" -f "*) echo /Applications/Xcode.app/Contents/Developer/usr/bin/metal; exit 0;; esac\n'
        "echo \"error: cannot execute tool 'metal' due to missing Metal Toolchain; use: "
        'xcodebuild -downloadComponent MetalToolchain" >&2\nexit 1\n'
    ),
    "compile_error": (
        "echo \"probe.metal:1:1: error: unknown type name 'kernal'\" >&2\necho '1 error generated.' >&2\nexit 1\n"
    ),
    # A broken Mac without the command-line tools: /usr/bin/xcrun is a shim that only complains.
    "no_developer_dir": (
        "echo 'xcrun: error: invalid active developer path (/Library/Developer/CommandLineTools), missing xcrun at: "
        "/Library/Developer/CommandLineTools/usr/bin/xcrun' >&2\nexit 1\n"
    ),
    "exit0_no_output": "exit 0\n",
    # Compiles (`-c`), but the link step fails: the probe must run both steps setup.py runs.
    "link_fails": (
        'case "$*" in *" -c "*) ' + _WRITE_OUTPUT + " exit 0;; esac\n"
        "echo \"metal: error: unsupported option '-mmacosx-version-min=14.0' for the link\" >&2\nexit 1\n"
    ),
}


def _fake_xcrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> Path:
    """Installs the fake first on PATH; returns its log of calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    xcrun = bin_dir / "xcrun"
    xcrun.write_text("#!/bin/sh\n" + _LOG + FAKE_XCRUN[kind])
    xcrun.chmod(xcrun.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bin_dir / "calls.log"


def _calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


# --- the commands -------------------------------------------------------------------------------------------------


def test_metal_compile_command_flags():
    cmd = metal_compile_command("a.metal", "a.air", INCLUDES)
    assert cmd[:4] == ["xcrun", "-sdk", "macosx", "metal"]
    # Without the deployment target the .air is stamped with the SDK's macOS and fails to load on older ones.
    for flag in (MIN_FLAG, "-std=metal3.1", "-fno-fast-math", "-c", *[f"-I{d}" for d in INCLUDES]):
        assert flag in cmd, flag
    assert cmd[cmd.index("-c") + 1] == "a.metal" and cmd[cmd.index("-o") + 1] == "a.air"
    assert not any("fast-math" in f and f != "-fno-fast-math" for f in cmd)


def test_metallib_command_flags():
    """Linked by the `metal` driver, which takes the deployment target (`metallib` takes no such flag)."""
    cmd = metallib_command([Path("a.air"), "b.air"], Path("out.metallib"))
    assert cmd[:4] == ["xcrun", "-sdk", "macosx", "metal"] and "-c" not in cmd
    assert MIN_FLAG in cmd
    assert cmd[-2:] == ["-o", "out.metallib"] and "a.air" in cmd and "b.air" in cmd


def test_extension_deployment_flags():
    """The ObjC++ extension targets macOS 14 too (torch 2.13's wheels need it): linked with the flag, compiled with
    it by setup.py (test_setup_macos_extension_flags). MPS_CXX_FLAGS stays free of it: the Linux syntax check
    (test_mps_sources.py) compiles with MPS_CXX_FLAGS for a Linux target, where clang warns the flag is unused."""
    assert build_flags.MPS_DEPLOYMENT_FLAGS == [MIN_FLAG]
    assert MIN_FLAG in build_flags.MPS_LINK_FLAGS
    assert not any(f.startswith("-mmacosx-version-min") for f in build_flags.MPS_CXX_FLAGS)


# --- the probe ----------------------------------------------------------------------------------------------------


def test_probe_succeeds_and_compiles_with_the_build_flags(tmp_path, monkeypatch):
    log = _fake_xcrun(tmp_path, monkeypatch, "ok")
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    assert probe_metal_toolchain(tmpdir=probe_dir) == (True, "")
    call, link = _calls(log)
    # A real compile with the build's flags, not `xcrun -f metal` (which Xcode 26 answers without a toolchain).
    assert "-f" not in call and "-c" in call
    assert {"metal", MIN_FLAG, "-std=metal3.1", "-fno-fast-math"} <= set(call)
    # then the link setup.py runs, with its flags
    assert link[-1].endswith("probe.metallib") and MIN_FLAG in link and "-c" not in link
    assert not list(probe_dir.iterdir()), "the probe's temporary directory is left behind"


def test_probe_without_xcrun(tmp_path, monkeypatch):
    """No xcrun on PATH at all (and a `run` that cannot start it): the command-line tools are missing."""
    monkeypatch.setenv("PATH", str(tmp_path))
    ok, why = probe_metal_toolchain(tmpdir=tmp_path)
    assert not ok and "xcrun was not found" in why and "xcode-select --install" in why

    def cannot_start(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "xcrun")

    ok, why = probe_metal_toolchain(run=cannot_start, tmpdir=tmp_path)
    assert not ok and "Permission denied" in why and "xcode-select --install" in why


def test_probe_without_metal(tmp_path, monkeypatch):
    """Command-line tools only (xcrun exit 72): full Xcode is needed."""
    _fake_xcrun(tmp_path, monkeypatch, "no_metal")
    ok, why = probe_metal_toolchain(tmpdir=tmp_path)
    assert not ok
    assert "cannot find the `metal` compiler" in why and "full Xcode" in why and "xcode-select -s" in why


def test_probe_without_the_metal_toolchain_component(tmp_path, monkeypatch):
    """Xcode 26 without the downloaded component: `xcrun -f metal` succeeds, compiling fails."""
    _fake_xcrun(tmp_path, monkeypatch, "no_toolchain")
    ok, why = probe_metal_toolchain(tmpdir=tmp_path)
    assert not ok
    assert "Metal Toolchain component" in why and f"`{DOWNLOAD_HINT}`" in why
    assert "full Xcode" not in why  # Xcode is there; only the component is missing


def test_probe_without_developer_tools_behind_the_xcrun_shim(tmp_path, monkeypatch):
    _fake_xcrun(tmp_path, monkeypatch, "no_developer_dir")
    ok, why = probe_metal_toolchain(tmpdir=tmp_path)
    assert not ok and "xcode-select --install" in why and DOWNLOAD_HINT not in why


def test_probe_compiler_error_is_reported(tmp_path, monkeypatch):
    _fake_xcrun(tmp_path, monkeypatch, "compile_error")
    ok, why = probe_metal_toolchain(tmpdir=tmp_path)
    assert not ok
    assert "unknown type name 'kernal'" in why and "1 error generated." in why and "exit status 1" in why
    assert DOWNLOAD_HINT not in why and "full Xcode" not in why


def test_probe_trims_a_long_compiler_error():
    class Result:
        returncode, stdout = 1, ""
        stderr = "".join(f"probe.metal:{i}:1: error: number {i}\n" for i in range(1000))

    ok, why = probe_metal_toolchain(run=lambda *a, **k: Result())
    assert not ok and "error: number 0" in why and "error: number 999" not in why and len(why) < 2000


def test_probe_reports_a_failing_link(tmp_path, monkeypatch):
    _fake_xcrun(tmp_path, monkeypatch, "link_fails")
    ok, why = probe_metal_toolchain(tmpdir=tmp_path)
    assert not ok and why.startswith("linking the probe's metallib failed") and "unsupported option" in why


def test_probe_needs_the_air_file_not_just_exit_status_0(tmp_path, monkeypatch):
    _fake_xcrun(tmp_path, monkeypatch, "exit0_no_output")
    ok, why = probe_metal_toolchain(tmpdir=tmp_path)
    assert not ok and "probe.air" in why


# --- setup.py -----------------------------------------------------------------------------------------------------


@pytest.fixture
def setup_module(monkeypatch) -> ModuleType:
    """setup.py as a module, its setup() call a no-op and no extension (setup.py runs at import)."""
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("TORCH_METAL_FUSED_NO_EXTENSION", "1")
    spec = importlib.util.spec_from_file_location("tmf_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_fails_with_the_download_hint_when_the_metallib_is_required(setup_module, tmp_path, monkeypatch):
    log = _fake_xcrun(tmp_path, monkeypatch, "no_toolchain")
    monkeypatch.setenv(setup_module.REQUIRE_METALLIB, "1")
    with pytest.raises(SystemExit) as e:
        setup_module._build_metallib(tmp_path)
    assert setup_module.REQUIRE_METALLIB in str(e.value) and DOWNLOAD_HINT in str(e.value)
    assert all("-f" not in call for call in _calls(log))


def test_setup_falls_back_to_compile_at_first_use(setup_module, tmp_path, monkeypatch, capsys):
    _fake_xcrun(tmp_path, monkeypatch, "no_toolchain")
    monkeypatch.delenv(setup_module.REQUIRE_METALLIB, raising=False)
    assert setup_module._build_metallib(tmp_path) is None
    err = capsys.readouterr().err
    assert "warning:" in err and DOWNLOAD_HINT in err and "compiled at first use" in err


def test_setup_builds_the_metallib_with_the_flags(setup_module, tmp_path, monkeypatch):
    log = _fake_xcrun(tmp_path, monkeypatch, "ok")
    monkeypatch.setenv(setup_module.REQUIRE_METALLIB, "1")
    out = tmp_path / "generated"
    out.mkdir()
    lib = setup_module._build_metallib(out)
    assert lib == out / "torch_metal_fused.metallib" and lib.is_file()
    calls = _calls(log)
    compiles = [c for c in calls if "metal" in c and "-c" in c]
    links = [c for c in calls if c[-1].endswith(".metallib")]
    shaders = sorted((ROOT / "shaders").glob("*.metal"))
    assert shaders and len(compiles) == len(shaders) + 1  # the probe, then each shader
    assert len(links) == 2  # the probe's, then the library's
    assert links[1][-1] == str(lib) and all(str(out / f"{s.stem}.air") in links[1] for s in shaders)
    for call in [*compiles, *links]:
        assert MIN_FLAG in call, call
    for call in compiles:
        assert {"-std=metal3.1", "-fno-fast-math"} <= set(call), call
    for call in compiles[1:]:
        assert {f"-I{d}" for d in INCLUDES} <= set(call), call


def test_setup_macos_extension_flags(setup_module, tmp_path, monkeypatch):
    """The extension setup.py declares on macOS is compiled and linked for macOS 14."""
    pytest.importorskip("torch.utils.cpp_extension")
    monkeypatch.setattr(setup_module, "ROOT", tmp_path)  # build/generated goes under tmp_path
    monkeypatch.setattr(setup_module, "_build_metallib", lambda out_dir: None)
    monkeypatch.setattr(embed_shaders, "write_embedded_header", lambda *args: None)
    ext = setup_module._macos_extension()
    assert MIN_FLAG in ext.extra_compile_args["cxx"] and MIN_FLAG in ext.extra_link_args
    assert set(build_flags.MPS_CXX_FLAGS) <= set(ext.extra_compile_args["cxx"])


def test_a_failed_extension_build_installs_the_package_without_it(setup_module, monkeypatch, capsys):
    """A compile error in any .mm (or .cu) must not fail `pip install` as a whole: the user gets the package (the
    reference) and a warning; with TORCH_METAL_FUSED_REQUIRE_EXTENSION=1 (CI jobs that build it on purpose) it fails."""

    class FailingBuild:
        def build_extension(self, extension):
            raise RuntimeError("error: use of undeclared identifier 'getCoreCount'")

    build = object.__new__(setup_module._optional_build_ext(FailingBuild))
    extension = setuptools.Extension("torch_metal_fused._C", [])
    monkeypatch.delenv(setup_module.REQUIRE_EXTENSION, raising=False)
    build.build_extension(extension)
    err = capsys.readouterr().err
    assert "warning: building torch_metal_fused._C failed" in err and "getCoreCount" in err
    monkeypatch.setenv(setup_module.REQUIRE_EXTENSION, "1")
    with pytest.raises(RuntimeError, match="getCoreCount"):
        build.build_extension(extension)
