"""The Mac path's launch route, executed in CI: our shaders assembled into the self-contained sources that
torch.mps.compile_shader is given, and the harness's stand-in for compile_shader binding and launching as PyTorch's
binding does (torch/csrc/mps/Module.cpp). The ops' own tests run every op through this route (backends/metal.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from helpers import CONTRACT_FILES, contract_module

from torch_metal_fused import _backend
from torch_metal_fused.backends import metal_library, shader_args
from torch_metal_fused.backends.metal_library import shader_source

pytestmark = pytest.mark.emulated

# A probe kernel. Its name carries a family's prefix because the harness files every pipeline under a family.
PROBE = """
#include <metal_stdlib>
using namespace metal;
[[kernel]] void softmax_probe_args(device float* out [[buffer(0)]], constant long& a [[buffer(1)]],
                                   constant float& b [[buffer(2)]], constant int* c [[buffer(3)]],
                                   constant int& d [[buffer(4)]], constant float* e [[buffer(5)]],
                                   uint2 pos [[thread_position_in_grid]], uint2 grid [[threads_per_grid]]) {
  const uint i = pos.y * grid.x + pos.x;
  if (i == 0) {
    out[0] = float(a);
    out[1] = b;
    out[2] = float(c[0]);
    out[3] = float(c[1]);
    out[4] = float(d);
    out[5] = e[1];
  }
  out[8 + i] = float(pos.x + 100 * pos.y);
}
"""


@pytest.fixture(scope="module")
def stand_in():
    from torch_metal_fused.emulator import compile_shader

    return compile_shader


@pytest.mark.parametrize("family", list(_backend.FAMILIES))
def test_every_family_source_is_self_contained(family):
    src = shader_source(family)
    assert '#include "' not in src  # compile_shader has no include path for our headers
    assert "#pragma once" not in src
    assert f'#line 1 "{metal_library.SHADERS / (family + ".metal")}"' in src
    # tmf/shader_args.h inlined once, however often it is included
    assert src.count("struct RowParams {") == 1
    assert src.isascii()  # PyTorch hands Metal the source decoded as ASCII (our comments have ·, ᵀ, —)


def test_line_marks_quote_the_path():
    assert metal_library._line_mark(7, Path('/x/a"b\\c.metal')) == '#line 7 "/x/a\\"b\\\\c.metal"\n'
    # non-ASCII bytes of an install path as octal escapes: the source PyTorch decodes as ASCII stays ASCII
    assert metal_library._line_mark(1, Path("/x/prøjekt/a.metal")) == '#line 1 "/x/pr\\303\\270jekt/a.metal"\n'


def test_shaders_under_a_non_ascii_path_compile(tmp_path):
    """A virtual environment under ~/prøjekt: the source's #line marks name the path, and the stand-in (as PyTorch)
    refuses non-ASCII source, which took down every family before the path was escaped."""
    import shutil

    folder = tmp_path / "prøjekt" / "shaders"
    shutil.copytree(metal_library.SHADERS, folder)
    with metal_library.shaders_from(folder):
        libs = metal_library._planted[-1]
        assert "softmax_forward_simd_rows_float" in dir(libs.library("softmax"))


def test_the_stand_in_refuses_non_ascii_source(stand_in):
    with pytest.raises(SyntaxError, match="non-ASCII"):
        stand_in.compile_shader(PROBE + "// x · y\n")


def test_fast_math_is_refused(monkeypatch, stand_in):
    """PYTORCH_MPS_FAST_MATH=1 makes PyTorch compile with fast math (NaN/inf may be assumed away): every family is
    served by the reference, saying why; unset or 0 it is not in the way."""
    libs = metal_library.KernelLibraries(stand_in.compile_shader, "x", refusal=metal_library.fast_math_refusal)
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "1")
    with pytest.raises(_backend.KernelUnavailable) as info:
        libs.library("softmax")
    assert info.value.scope == "family" and "PYTORCH_MPS_FAST_MATH=1" in info.value.reason
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "")  # PyTorch's test is "set, and not 0": empty turns it on
    with pytest.raises(_backend.KernelUnavailable):
        libs.library("softmax")
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "0")
    assert "softmax_forward_simd_rows_float" in dir(libs.library("softmax"))


def test_the_stand_in_binds_as_pytorch_does(stand_in):
    lib = stand_in.compile_shader(PROBE)
    assert "softmax_probe_args" in dir(lib)
    kernel = lib.softmax_probe_args
    assert kernel.max_threads_per_threadgroup >= 32 and kernel.thread_execution_width == 32
    out = torch.full((8 + 48,), -1.0)
    # A python int binds as int64 (2**33 would read 0 as an int32), a float as float32, a list of ints as int64 unless
    # cast (here int32).
    kernel(
        out,
        2**33,
        0.25,
        [7, -9],
        11,
        [1.5, 2.5],
        threads=(8, 6),
        group_size=(4, 2),
        arg_casts={3: "int32", 4: "int32"},
    )
    assert out[:6].tolist() == [float(2**33), 0.25, 7.0, -9.0, 11.0, 2.5]
    # threads is the grid's total size (dispatchThreads), in whole groups of group_size.
    expected = [float(x + 100 * y) for y in range(6) for x in range(8)]
    assert out[8:].tolist() == expected


def test_the_stand_in_refuses_what_it_does_not_model(stand_in):
    kernel = stand_in.compile_shader(PROBE).softmax_probe_args
    out = torch.zeros(64)
    with pytest.raises(ValueError, match="whole threadgroups"):
        kernel(
            out, 1, 1.0, [1, 2], 1, [1.0, 2.0], threads=(9, 6), group_size=(4, 2), arg_casts={3: "int32", 4: "int32"}
        )
    with pytest.raises(RuntimeError, match="Empty list"):
        kernel(out, 1, 1.0, [], 1, [1.0], threads=(8, 6), group_size=(4, 2))
    with pytest.raises(RuntimeError, match="Unsupported cast"):
        kernel(out, 1, 1.0, [1, 2], 1, [1.0, 2.0], threads=(8, 6), group_size=(4, 2), arg_casts={3: "int64"})
    with pytest.raises(RuntimeError, match="Failed to create"):
        getattr(stand_in.compile_shader(PROBE), "no_such_kernel")  # noqa: B009


def test_argument_structs_are_their_bytes_as_int32_words():
    g = shader_args.params(
        "GluParams", rows=3, cols=2**32 - 1, groups_per_row=1, gate_row_stride=5, up_row_stride=5, dout_row_stride=5
    )
    assert struct.pack("<6i", *g.words) == struct.pack("<6I", 3, 2**32 - 1, 1, 5, 5, 5)
    p = shader_args.params(
        "CrossEntropyParams",
        rows=2,
        vocab=5,
        logits_row_stride=5,
        ignore_index=-100,
        label_smoothing=0.1,
        softcap=0.0,
        want_grad=1,
        target_word_stride=2,
    )
    assert struct.pack("<8i", *p.words) == struct.pack("<IIIiffII", 2, 5, 5, -100, 0.1, 0.0, 1, 2)
    with pytest.raises(TypeError, match="missing fields"):
        shader_args.params("GluParams", rows=1)


def test_the_header_is_read_for_every_struct_the_plans_bind():
    assert {"RowParams", "RmsNormBackwardParams", "CrossEntropyParams", "GluParams", "RopeParams"} <= set(
        shader_args.STRUCTS
    )
    assert shader_args.constant("kRowElementsPerThread") == 8
    # Only 32-bit fields: the int32-word binding reproduces each struct exactly.
    assert all(t in ("uint", "int", "float") for fields in shader_args.STRUCTS.values() for _, t in fields)


def test_the_doctor_reports_the_compile_shader_route(stand_in):
    from torch_metal_fused import doctor
    from torch_metal_fused.emulator import runner

    families = doctor.compile_shader_families(torch.device("cpu"))
    for family, status in families.items():
        assert status["ok"], (family, status)
        assert any(k.endswith("_bfloat") for k in status["pipelines"])
    with runner.faults("compile:softmax,simd_width:rms_norm=16"):
        families = doctor.compile_shader_families(torch.device("cpu"))
    assert not families["softmax"]["ok"] and "injected fault" in families["softmax"]["error"]
    assert not families["rms_norm"]["ok"] and "threadExecutionWidth 16" in str(families["rms_norm"]["pipelines"])
    assert families["glu"]["ok"]


def test_the_metal_backends_launch_from_the_python_plans(monkeypatch):
    from torch_metal_fused.backends import metal

    assert _backend.kernels_for("metal") is metal and _backend.kernels_for("metal-emulated") is metal
    # Before PyTorch 2.9 compile_shader's kernels take no arg_casts: MPS tensors get the reference, and the warning
    # (an error under TORCH_METAL_FUSED_STRICT=1) says why and what to do.
    monkeypatch.setattr(_backend, "torch_version", lambda: (2, 8))
    assert "PyTorch 2.9" in _backend._no_metal_reason() and "pip install -U torch" in _backend._no_metal_reason()


def test_cached_plans_are_keyed_by_everything_they_depend_on():
    """On a Mac each plan is cached per call (its shapes, strides, dtype and scalars). Calls that differ in one such
    thing, run back to back through a caching stand-in: a key missing it would reuse the other call's plan (another
    eps, stride, activation, mask...) and the results would not match the reference."""
    from torch_metal_fused import reference
    from torch_metal_fused.backends import metal
    from torch_metal_fused.emulator import compile_shader
    from torch_metal_fused.testing import assert_matches

    # Each op's contract file lists its calls (plan_cache_calls in tests/test_<op>.py, through the manifest).
    calls = []
    for contract in CONTRACT_FILES:
        calls += contract_module(contract).plan_cache_calls()
    libs = metal_library.KernelLibraries(compile_shader.compile_shader, "caching stand-in", cache=True)
    metal_library._planted.append(libs)
    try:
        for entry, args in calls:
            got, want = getattr(metal, entry)(*args), getattr(reference, entry)(*args)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            for i, (a, b) in enumerate(zip(got, want)):
                if b is not None:
                    assert_matches(a, b, a.dtype, f"{entry} output {i} after a cached plan")
    finally:
        metal_library._planted.remove(libs)
    assert len(libs._plans) >= 15  # the calls were planned (and cached), not served another way
