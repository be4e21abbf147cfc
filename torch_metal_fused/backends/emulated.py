"""The "metal-emulated" backend: CPU tensors run through our Metal kernels on the Metal-on-CPU harness, launched by
the same Python as on a Mac (backends/metal.py) through the harness's stand-in for torch.mps.compile_shader
(emulator/compile_shader.py). Opt in with TORCH_METAL_FUSED_BACKEND=metal-emulated."""

from __future__ import annotations


def available() -> tuple[bool, str]:
    try:
        from torch_metal_fused.emulator import runner

        runner.libraries()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""
