"""The compiled extension (a Mac or CUDA build) hands our kernels' failures to the Python backend intact."""

from __future__ import annotations

import pytest

from torch_metal_fused import _backend


@pytest.mark.skipif(_backend._compiled_extension() is None, reason="no compiled extension (a CUDA build)")
@pytest.mark.parametrize("scope", ["family", "call"])
def test_the_compiled_extension_raises_the_python_kernel_unavailable(scope):
    """bindings.cpp translates tmf::launch::KernelUnavailable (what csrc/cuda throws) into the class run_kernel
    catches, with family and scope intact (run on CUDA builds; the translation is the same code on a Mac)."""
    with pytest.raises(_backend.KernelUnavailable) as info:
        _backend._compiled_extension()._raise_kernel_unavailable("rms_norm", scope == "family")
    assert (info.value.family, info.value.scope, info.value.reason) == ("rms_norm", scope, "raised on request")
