"""Bugs planted in copies of our real kernels: the checker (or the strict address-space pass) must report
each one at the right .metal file and line."""

import shutil
from pathlib import Path

import pytest
import torch

from torch_metal_fused.emulator import runner
from torch_metal_fused.emulator.build import (
    SHADERS,
    ShaderCompileError,
    compile_libraries,
    lint_address_spaces,
    shader_paths,
)

pytestmark = pytest.mark.emulated


def _plant(tmp_path: Path, file: str, old: str, new: str) -> tuple[Path, int]:
    """Copy shaders/ to tmp_path with `old` replaced by `new` (once) in `file`; return the copy of
    softmax.metal and the 1-based line of the planted change."""
    dst = tmp_path / "shaders"
    shutil.copytree(SHADERS, dst)
    text = (dst / file).read_text()
    assert text.count(old) >= 1, f"the planted pattern is not in {file}"
    index = text.index(old)
    (dst / file).write_text(text[:index] + new + text[index + len(old) :])
    return dst / "softmax.metal", text.count("\n", 0, index) + 1


def _run_softmax(tmp_path, source, rows, cols):
    harness = runner.Harness(compile_libraries(tmp_path / "build", [source]))
    x = torch.randn(rows, cols)
    y = torch.empty_like(x)
    with runner.checking():
        harness.launch("softmax_forward", torch.float32, x, cols, y, rows, cols)
    return y


def _findings(exc_info) -> list[str]:
    return [str(f) for f in exc_info.value.findings]


def test_unmodified_kernels_are_clean(tmp_path):
    source, _ = _plant(tmp_path, "softmax.metal", "", "")
    y = _run_softmax(tmp_path, source, 3, 1000)
    assert torch.isfinite(y).all()


def test_missing_barrier_is_a_race(tmp_path):
    # threadgroup_sum without the barrier between writing the per-SIMD-group partials and reading them.
    old = """    scratch[simd_group] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return Op::simd"""
    new = """    scratch[simd_group] = v;
  }

  return Op::simd"""
    source, line = _plant(tmp_path, "reduce.h", old, new)
    with pytest.raises(runner.KernelCheckError) as exc:
        _run_softmax(tmp_path, source, 2, 1000)
    read_line = line + 3
    assert any(f"reduce.h:{read_line}:" in f and ("race" in f or "uninitialised" in f) for f in _findings(exc)), (
        _findings(exc)
    )


def test_off_by_one_read_is_out_of_bounds(tmp_path):
    old = "    v[i] = c0 + i < p.cols ? float(xr[c0 + i]) : -INFINITY;"
    new = "    v[i] = c0 + i <= p.cols ? float(xr[c0 + i]) : -INFINITY;"
    source, line = _plant(tmp_path, "softmax.metal", old, new)
    with pytest.raises(runner.KernelCheckError) as exc:
        _run_softmax(tmp_path, source, 2, 1000)  # 1000 = 250 threads x 4: the last thread reads element 1000
    assert any(f"softmax.metal:{line}: device-out-of-bounds" in f for f in _findings(exc)), _findings(exc)


def test_uninitialised_scratch_read(tmp_path):
    # Reading all 32 scratch slots although only n_simd of them were written.
    old = "  return Op::simd(lane < n_simd ? scratch[lane] : Op::identity());"
    new = "  return Op::simd(scratch[lane]);"
    source, line = _plant(tmp_path, "reduce.h", old, new)
    with pytest.raises(runner.KernelCheckError) as exc:
        _run_softmax(tmp_path, source, 2, 1000)  # 256 threads: 8 of 32 slots written
    assert any(f"reduce.h:{line}: uninitialised-read" in f for f in _findings(exc)), _findings(exc)


def test_uninitialised_scratch_shows_as_nan_without_the_checker(tmp_path):
    old = "  return Op::simd(lane < n_simd ? scratch[lane] : Op::identity());"
    source, _ = _plant(tmp_path, "reduce.h", old, "  return Op::simd(scratch[lane]);")
    harness = runner.Harness(compile_libraries(tmp_path / "build", [source]))
    x = torch.randn(2, 1000)
    y = torch.empty_like(x)
    harness.launch("softmax_forward", torch.float32, x, 1000, y, 2, 1000)
    assert torch.isnan(y).all()  # threadgroup memory starts poisoned


def test_missing_restaging_barrier_in_the_lora_kernel_is_a_race(tmp_path):
    # Phase 1 of the tiled LoRA kernel without the barrier between using a staged chunk and staging the next:
    # fast threads overwrite the x and A tiles while slow ones still read them.
    old = """    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are restaged by the next chunk"""
    _, line = _plant(tmp_path, "lora_linear.metal", old, "")
    harness = runner.Harness(compile_libraries(tmp_path / "build", [tmp_path / "shaders" / "lora_linear.metal"]))
    tokens, fin, fout, r = 20, 70, 30, 8  # 70 inputs: several staged chunks of reduce_tile columns
    x, a, b = torch.randn(tokens, fin), torch.randn(r, fin), torch.randn(fout, r)
    y, h = torch.randn(tokens, fout), torch.empty(tokens, r)
    with pytest.raises(runner.KernelCheckError) as exc, runner.checking():
        harness.launch("lora_forward_lowrank", torch.float32, x, fin, a, b, None, y, h, tokens, fin, fout, r, 1.0)
    text = (tmp_path / "shaders" / "lora_linear.metal").read_text().splitlines()
    # Reported where a thread reads a tile element that another thread has already restaged.
    use_lines = [i + 1 for i, ln in enumerate(text) if "rank_tile[k * r + j];" in ln or "row_tile[(slot + i" in ln]
    assert len(use_lines) == 2 and all(u < line for u in use_lines)
    assert any(f"lora_linear.metal:{u}: threadgroup-race" in f for u in use_lines for f in _findings(exc)), _findings(
        exc
    )


def test_barrier_in_divergent_code(tmp_path):
    old = """  v = Op::simd(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);"""
    new = """  v = Op::simd(v);
  if (simd_group == 0) { threadgroup_barrier(mem_flags::mem_threadgroup); }"""
    source, line = _plant(tmp_path, "reduce.h", old, new)
    with pytest.raises(runner.KernelCheckError) as exc:
        _run_softmax(tmp_path, source, 2, 1000)
    # Threads wait at two different barriers: the planted one and the next one of the function.
    assert any(f"reduce.h:{line + 1} " in f and "divergent-barrier" in f for f in _findings(exc)), _findings(exc)


def test_address_space_mixup_fails_the_strict_pass(tmp_path):
    # threadgroup_sum taking a device pointer: a plain C++ build accepts the threadgroup scratch argument,
    # Apple's compiler (and our strict pass) does not.
    old = "inline float threadgroup_sum(float v, threadgroup float* scratch,"
    new = "inline float threadgroup_sum(float v, device float* scratch,"
    source, _ = _plant(tmp_path, "reduce.h", old, new)
    compile_libraries(tmp_path / "build", [source])  # the plain build does not notice
    with pytest.raises(ShaderCompileError) as exc:
        lint_address_spaces(source, tmp_path / "lint")
    text = (tmp_path / "shaders" / "softmax.metal").read_text().splitlines()
    call_line = next(i + 1 for i, ln in enumerate(text) if "threadgroup_sum(s, scratch" in ln)
    assert f"softmax.metal:{call_line}:" in str(exc.value) and "address_space(3)" in str(exc.value)


@pytest.mark.parametrize("shader", [p.name for p in shader_paths()])
def test_our_shaders_pass_the_strict_address_space_pass(tmp_path, shader):
    lint_address_spaces(SHADERS / shader, tmp_path)
