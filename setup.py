"""Build torch_metal_fused with torch.utils.cpp_extension.

- macOS: the Objective-C++ MPS dispatch (csrc/mps/*.mm) with the Metal shader sources embedded as strings
  (compiled once per process at first use, so the Xcode command-line tools suffice); a prebuilt
  metallib is added where `xcrun metal` compiles a probe shader (full Xcode with its Metal Toolchain component:
  tools/metal_toolchain.py says what is missing otherwise).
- Linux/Windows with a CUDA build of torch and nvcc: the CUDA kernels (csrc/cuda/*.cu).
- Anything else (e.g. CPU-only Linux): no compiled extension; the package installs and imports, serving
  the plain-PyTorch reference and, on request, the Metal-on-CPU harness (built at first use).

Build with `pip install --no-build-isolation -e .` so the extension compiles against the installed torch.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
# build_flags, embed_shaders and metal_toolchain (pure Python: importable on any platform).
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

REQUIRE_METALLIB = "TORCH_METAL_FUSED_REQUIRE_METALLIB"
# The compiled extension is optional: where it fails to build, the package installs without it (the reference, and
# on a Mac nothing fused until it builds) and says so. Set to 1 to fail instead (CI jobs that build it on purpose).
REQUIRE_EXTENSION = "TORCH_METAL_FUSED_REQUIRE_EXTENSION"


def _no_metallib(why: str) -> None:
    """Without a metallib the sources are compiled at first use; CI on macOS sets TORCH_METAL_FUSED_REQUIRE_METALLIB=1
    so that Apple's compiler rejecting a shader fails the build instead."""
    if os.environ.get(REQUIRE_METALLIB, "") not in ("", "0"):
        raise SystemExit(f"{REQUIRE_METALLIB} is set and {why}")
    print(f"warning: {why}; the shader sources will be compiled at first use", file=sys.stderr)


def _build_metallib(out_dir: Path) -> Path | None:
    """A prebuilt metallib where full Xcode's Metal Toolchain works (the command-line tools lack it); the
    extension then skips compiling the sources at first use."""
    from metal_toolchain import metal_compile_command, metallib_command, probe_metal_toolchain

    # A compile, not `xcrun -f metal`: Xcode 26 resolves `metal` before its Metal Toolchain is downloaded.
    ok, why = probe_metal_toolchain(tmpdir=out_dir)
    if not ok:
        _no_metallib(why)
        return None
    airs = []
    for src in sorted((ROOT / "shaders").glob("*.metal")):
        air = out_dir / f"{src.stem}.air"
        cmd = metal_compile_command(src, air, [ROOT / "shaders", ROOT / "csrc" / "include"])
        if subprocess.run(cmd).returncode != 0:
            _no_metallib(f"xcrun metal failed on {src.name}")
            return None
        airs.append(air)
    lib = out_dir / "torch_metal_fused.metallib"
    if subprocess.run(metallib_command(airs, lib)).returncode != 0:
        _no_metallib("xcrun metallib failed")
        return None
    return lib


def _macos_extension():
    from build_flags import (
        MPS_CXX_FLAGS,
        MPS_DEFINES,
        MPS_DEPLOYMENT_FLAGS,
        MPS_LINK_FLAGS,
        mps_include_dirs,
        mps_sources,
    )
    from embed_shaders import write_embedded_header
    from torch.utils.cpp_extension import CppExtension

    generated = ROOT / "build" / "generated"
    generated.mkdir(parents=True, exist_ok=True)
    metallib = _build_metallib(generated)
    write_embedded_header(ROOT / "shaders", ROOT / "csrc" / "include", generated / "tmf_embedded_shaders.h", metallib)
    return CppExtension(
        "torch_metal_fused._C",
        mps_sources(),
        include_dirs=mps_include_dirs(generated),
        define_macros=MPS_DEFINES,
        extra_compile_args={"cxx": [*MPS_CXX_FLAGS, *MPS_DEPLOYMENT_FLAGS]},
        extra_link_args=MPS_LINK_FLAGS,
    )


def _cutlass_include_dirs() -> list[str]:
    """CUTLASS's headers for the LoRA op's K-concatenated GEMM (csrc/cuda/cutlass_kconcat.cuh), optional: from
    $CUTLASS_DIR (a CUTLASS checkout) or the nvidia-cutlass wheel (cutlass_library/source), and only for a Hopper build
    with the architecture-specific features (TORCH_CUDA_ARCH_LIST with 9.0a and no other 9.x entry: wgmma). Empty
    otherwise: the op then never takes that route."""
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split()
    # Only 9.0a among the 9.x entries: a 9.0 (or +PTX) image would hold the GEMM without its body (CUTLASS compiles
    # an empty kernel there), which the driver could load and which would return uninitialised outputs.
    if "9.0a" not in arches or any(a.startswith("9.") and a != "9.0a" for a in arches):
        return []
    import importlib.util

    roots = [Path(os.environ["CUTLASS_DIR"])] if os.environ.get("CUTLASS_DIR") else []
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(next(iter(spec.submodule_search_locations))) / "source")
    for root in roots:
        if (root / "include" / "cute").is_dir():
            return [str(root / "include"), str(root / "tools" / "util" / "include")]
    print(
        "warning: TORCH_CUDA_ARCH_LIST has 9.0a but no CUTLASS headers were found: building without the LoRA "
        "K-concatenated GEMM",
        file=sys.stderr,
    )
    return []


def _cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        return None
    sources.append("csrc/bindings.cpp")
    cutlass = _cutlass_include_dirs()
    defines = [("TMF_WITH_CUDA", "1")] + ([("TMF_WITH_CUTLASS", "1")] if cutlass else [])
    # -DNDEBUG with CUTLASS: its device asserts would serialize the wgmma pipeline.
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"] + (["-DNDEBUG"] if cutlass else [])
    return CUDAExtension(
        "torch_metal_fused._C",
        sources,
        include_dirs=[str(ROOT / "csrc"), str(ROOT / "csrc" / "include"), *cutlass],
        define_macros=defines,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc},
    )


def _optional_build_ext(base: type) -> type:
    """`base` (torch's BuildExtension) made optional: a failed compile or link installs the package without the
    extension and says so, unless REQUIRE_EXTENSION is set."""

    class OptionalBuildExtension(base):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # a compile or link error: install the pure-Python package
                if os.environ.get(REQUIRE_EXTENSION, "") not in ("", "0"):
                    raise
                print(
                    f"warning: building {extension.name} failed ({exc}); installing torch_metal_fused without it: "
                    f"its ops run on the reference (python -m torch_metal_fused.doctor says so). Set "
                    f"{REQUIRE_EXTENSION}=1 to make this an error.",
                    file=sys.stderr,
                )

    return OptionalBuildExtension


def _extensions():
    if os.environ.get("TORCH_METAL_FUSED_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError:
        print("torch is not installed: building without the compiled extension", file=sys.stderr)
        return [], {}
    ext = None
    if platform.system() == "Darwin":
        ext = _macos_extension()
    elif torch.version.cuda and CUDA_HOME and (ROOT / "csrc" / "cuda").is_dir():
        ext = _cuda_extension()
    if ext is None:
        return [], {}

    return [ext], {"build_ext": _optional_build_ext(BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = _extensions()

setup(
    name="torch-metal-fused",
    version="0.1.0",
    description="Fused softmax, RMSNorm and LoRA training kernels (forward and backward) for PyTorch on Apple GPUs",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["torch_metal_fused", "torch_metal_fused.*"]),
    package_data={"torch_metal_fused": ["py.typed"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "hf": ["transformers>=4.40", "peft>=0.10"],
        "plot": ["matplotlib"],
        "emulator": ["ninja"],
        "dev": ["pytest", "ruff", "ninja"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
