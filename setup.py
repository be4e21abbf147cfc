"""Build torch_metal_fused.

- macOS: nothing to compile. The Metal kernels (shaders/) are compiled at first use by the OS's Metal compiler through
  torch.mps.compile_shader (PyTorch 2.9+) and launched from Python (torch_metal_fused/backends/metal.py); the shaders
  and their shared header ship in the package (torch_metal_fused/shaders/, copied at build time).
- Linux/Windows with a CUDA build of torch and nvcc: the CUDA kernels (csrc/cuda/*.cu) with torch.utils.cpp_extension.
- Anything else (e.g. CPU-only Linux): no compiled extension; the package installs and imports, serving
  the plain-PyTorch reference and, on request, the Metal-on-CPU harness (built at first use).

Build with `pip install --no-build-isolation -e .` so the extension compiles against the installed torch.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def _load_config():
    """torch_metal_fused/_config.py (the settings, read through its accessors), loaded by its path: importing the
    package would import torch and the ops before they are built."""
    spec = importlib.util.spec_from_file_location(
        "_torch_metal_fused_setup_config", ROOT / "torch_metal_fused" / "_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


config = _load_config()
# The compiled extension is optional: where it fails to build, the package installs without it (the reference, and
# on a Mac nothing fused until it builds) and says so. Set to 1 to fail instead (CI jobs that build it on purpose).
REQUIRE_EXTENSION = config.REQUIRE_EXTENSION.name


def _cutlass_include_dirs() -> list[str]:
    """CUTLASS's headers for the LoRA op's K-concatenated GEMM (csrc/cuda/cutlass_kconcat.cuh), optional: from
    $CUTLASS_DIR (a CUTLASS checkout) or the nvidia-cutlass wheel (cutlass_library/source), and only for a Hopper build
    with the architecture-specific features (TORCH_CUDA_ARCH_LIST with 9.0a and no other 9.x entry: wgmma). Empty
    otherwise: the op then never takes that route."""
    arches = config.cuda_arch_list()
    # Only 9.0a among the 9.x entries: a 9.0 (or +PTX) image would hold the GEMM without its body (CUTLASS compiles
    # an empty kernel there), which the driver could load and which would return uninitialised outputs.
    if "9.0a" not in arches or any(a.startswith("9.") and a != "9.0a" for a in arches):
        return []
    roots = [config.cutlass_dir()] if config.cutlass_dir() else []
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


class BuildPyWithShaders(build_py):
    """Ships shaders/ and their shared header (csrc/include/tmf/shader_args.h, as tmf/shader_args.h beside them) in
    the package, where torch_metal_fused/backends/metal_library.py looks first: a wheel compiles them on a Mac with no
    source tree."""

    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "torch_metal_fused" / "shaders"
        (dest / "tmf").mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "shaders").iterdir()):
            if src.suffix in (".metal", ".h"):
                shutil.copy2(src, dest / src.name)
        shutil.copy2(ROOT / "csrc" / "include" / "tmf" / "shader_args.h", dest / "tmf" / "shader_args.h")


def _optional_build_ext(base: type) -> type:
    """`base` (torch's BuildExtension) made optional: a failed compile or link installs the package without the
    extension and says so, unless REQUIRE_EXTENSION is set."""

    class OptionalBuildExtension(base):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # a compile or link error: install the pure-Python package
                if config.require_extension():
                    raise
                print(
                    f"warning: building {extension.name} failed ({exc}); installing torch_metal_fused without it: "
                    f"its ops run on the reference (python -m torch_metal_fused.doctor says so). Set "
                    f"{REQUIRE_EXTENSION}=1 to make this an error.",
                    file=sys.stderr,
                )

    return OptionalBuildExtension


def _extensions():
    if config.no_extension():
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension
    except ImportError:
        print("torch is not installed: building without the compiled extension", file=sys.stderr)
        return [], {}
    ext = None
    if torch.version.cuda and CUDA_HOME and (ROOT / "csrc" / "cuda").is_dir():
        ext = _cuda_extension()
    if ext is None:
        return [], {}

    return [ext], {"build_ext": _optional_build_ext(BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithShaders

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
