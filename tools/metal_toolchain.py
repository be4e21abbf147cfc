"""Apple's Metal shader toolchain, as setup.py uses it to prebuild the metallib: the commands, and a probe that
says whether they can work here and, if not, what to install.

The probe compiles a one-line shader rather than asking `xcrun -f metal`: since Xcode 26 the Metal Toolchain is a
separate download, and without it `metal` still resolves but fails when run ("cannot execute tool 'metal' due to
missing Metal Toolchain").

Run as `python3 tools/metal_toolchain.py` to print the probe's verdict (exit status 0 when a metallib can be built).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

# tools/ is on sys.path: setup.py and the tests put it there, and running this file does.
from build_flags import MACOS_VERSION_MIN_FLAG

XCRUN = ["xcrun", "-sdk", "macosx"]
# Metal 3.1 for bfloat; no fast math, so the kernels round like the reference (and the Metal-on-CPU harness).
METAL_FLAGS = ["-std=metal3.1", "-fno-fast-math", MACOS_VERSION_MIN_FLAG]
DOWNLOAD_HINT = "xcodebuild -downloadComponent MetalToolchain"
PROBE_SOURCE = "kernel void probe() {}\n"
# Generous (a first `xcrun metal` fills xcrun's cache), but a hung xcrun must not hang `pip install` for good.
PROBE_TIMEOUT_S = 300
_MAX_STDERR_LINES = 15
_MAX_STDERR_CHARS = 1500


def metal_compile_command(src: str | Path, air: str | Path, include_dirs: Iterable[str | Path]) -> list[str]:
    """`.metal` -> `.air`."""
    return [*XCRUN, "metal", *METAL_FLAGS, "-c", str(src), *[f"-I{d}" for d in include_dirs], "-o", str(air)]


def metallib_command(airs: Iterable[str | Path], out: str | Path) -> list[str]:
    """`.air` files -> one `.metallib`, linked by the `metal` driver with the deployment target (as MLX links its
    library): the link stamps the library's OS version too, and `metallib` itself takes no -mmacosx-version-min."""
    return [*XCRUN, "metal", MACOS_VERSION_MIN_FLAG, *[str(a) for a in airs], "-o", str(out)]


def _trim(text: str) -> str:
    """The first errors are the ones that explain; a template cascade would bury setup.py's message."""
    lines = text.strip().splitlines()
    trimmed = "\n".join(lines[:_MAX_STDERR_LINES])[:_MAX_STDERR_CHARS]
    return trimmed + "\n[...]" if trimmed != "\n".join(lines) else trimmed


def _diagnose(returncode: int, stdout: str, stderr: str) -> str:
    """Why the probe failed, with what to install. Messages read after "… is set and" (setup.py's _no_metallib)."""
    out = f"{stderr}\n{stdout}"
    if "missing Metal Toolchain" in out or "downloadComponent" in out or "cannot execute tool 'metal'" in out:
        return (
            "the Metal Toolchain component of Xcode is not installed (Xcode 26+ ships it separately): "
            f"run `{DOWNLOAD_HINT}`"
        )
    if "invalid active developer path" in out:
        # /usr/bin/xcrun exists on every Mac; without the command-line tools it only says so.
        return "xcrun has no developer tools behind it: install the Xcode command-line tools (`xcode-select --install`)"
    if 'unable to find utility "metal"' in out or returncode == 72:
        return (
            "xcrun cannot find the `metal` compiler: it comes with full Xcode, not the command-line tools "
            "(install Xcode, select it with `sudo xcode-select -s /Applications/Xcode.app`, and on Xcode 26+ "
            f"run `{DOWNLOAD_HINT}`)"
        )
    detail = _trim(stderr) or _trim(stdout) or "no output"
    return f"`xcrun metal` cannot compile a one-line probe shader (exit status {returncode}: {detail})"


def probe_metal_toolchain(
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run, tmpdir: str | Path | None = None
) -> tuple[bool, str]:
    """Compile a one-line shader with metal_compile_command's flags and link it with metallib_command's, in a
    temporary directory under `tmpdir`: both steps setup.py runs. Returns (True, "") or (False, why, with what to
    install)."""
    with tempfile.TemporaryDirectory(prefix="tmf-metal-probe-", dir=tmpdir) as d:
        src, air, lib = Path(d) / "probe.metal", Path(d) / "probe.air", Path(d) / "probe.metallib"
        src.write_text(PROBE_SOURCE)
        for step, cmd, out in (
            ("compile", metal_compile_command(src, air, []), air),
            ("link", metallib_command([air], lib), lib),
        ):
            try:
                result = run(cmd, capture_output=True, text=True, errors="replace", timeout=PROBE_TIMEOUT_S)
            except FileNotFoundError:
                return False, "xcrun was not found: install the Xcode command-line tools (`xcode-select --install`)"
            except OSError as e:
                return (
                    False,
                    f"xcrun cannot be run ({e}): install the Xcode command-line tools (`xcode-select --install`)",
                )
            except subprocess.TimeoutExpired:
                return False, f"`xcrun metal` did not {step} a one-line probe shader within {PROBE_TIMEOUT_S} s"
            if result.returncode != 0:
                why = _diagnose(result.returncode, result.stdout or "", result.stderr or "")
                return False, why if step == "compile" else f"linking the probe's metallib failed: {why}"
            if not out.is_file():
                # Exit status 0 and no output: trust the file, not the status.
                return False, f"`xcrun metal` exited 0 but wrote no {out.name} (command: {' '.join(cmd)})"
    return True, ""


def main() -> int:
    ok, reason = probe_metal_toolchain()
    print("ok: `xcrun metal` compiles a probe shader" if ok else f"no prebuilt metallib: {reason}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
