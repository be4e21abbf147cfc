"""Build torch_metal_fused with torch.utils.cpp_extension.

- macOS: the Objective-C++ MPS dispatch (csrc/mps/*.mm) with the Metal shader sources embedded as strings
  (compiled once per process at first use, so the Xcode command-line tools suffice); a prebuilt
  metallib is added where `xcrun metal` exists.
- Linux/Windows with a CUDA build of torch and nvcc: the CUDA kernels (csrc/cuda/*.cu).
- Anything else (e.g. CPU-only Linux): no compiled extension; the package installs and imports, serving
  the plain-PyTorch reference and, on request, the Metal-on-CPU harness (built at first use).

Build with `pip install --no-build-isolation -e .` so the extension compiles against the installed torch.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
sys.path.insert(0, str(ROOT / "tools"))


def _embed_shaders(out: Path) -> None:
    from embed_shaders import write_embedded_header

    write_embedded_header(ROOT / "shaders", ROOT / "csrc" / "include", out)


def _macos_extension():
    from torch.utils.cpp_extension import CppExtension

    generated = ROOT / "build" / "generated"
    generated.mkdir(parents=True, exist_ok=True)
    _embed_shaders(generated / "tmf_embedded_shaders.h")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "mps").glob("*.mm"))
    sources.append("csrc/bindings.cpp")
    extra_link = ["-framework", "Metal", "-framework", "Foundation"]
    defines = [("TMF_WITH_METAL", "1")]
    if shutil.which("xcrun") and subprocess.run(["xcrun", "-f", "metal"], capture_output=True).returncode == 0:
        defines.append(("TMF_HAVE_METALLIB", "1"))
    return CppExtension(
        "torch_metal_fused._C",
        sources,
        include_dirs=[str(ROOT / "csrc" / "include"), str(generated)],
        define_macros=defines,
        extra_compile_args={"cxx": ["-std=c++17", "-fobjc-arc", "-O2"]},
        extra_link_args=extra_link,
    )


def _cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        return None
    sources.append("csrc/bindings.cpp")
    return CUDAExtension(
        "torch_metal_fused._C",
        sources,
        include_dirs=[str(ROOT / "csrc" / "include")],
        define_macros=[("TMF_WITH_CUDA", "1")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )


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
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
