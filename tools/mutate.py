"""Mutation check of the Metal kernels' tests: plant one bug at a time in a copy of the repository (a shader, a
shared shader header or the launch plans of backends/metal.py), run the tests that guard that code on the Metal-on-CPU
harness, and require every planted bug to be caught. Controls (edits that change nothing observable) must pass.

    python3 tools/mutate.py            # every mutant (docs/metal-on-cpu.md has the last full result)
    python3 tools/mutate.py --ci       # the subset run in CI (tests/test_mutation.py)
    python3 tools/mutate.py --only softmax_simd_rows_no_max_subtraction --keep   # one mutant, keep its copy
    python3 tools/mutate.py --list

A mutant is "killed" when its tests fail (or its shader no longer compiles: counted apart, as Apple's compiler
would stop it too); it "survives" when they pass. Exit status 0 only when every mutant is killed and every control
survives. The bugs are what a kernel author plausibly gets wrong: missing barriers, off-by-one bounds, dropped
terms (eps, the row max, a scale), wrong reductions and offsets, instantiation slips, launch-plan thresholds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The Metal launch plans (shared by the Mac and the harness's compile_shader stand-in).
MP = "torch_metal_fused/backends/metal.py"
# The tests that guard each kernel family on the harness (plain and checked runs: -k emulated).
SOFTMAX = ("tests/test_softmax.py", "tests/test_edge_values.py::test_softmax_edge_values")
RMS_NORM = ("tests/test_rms_norm.py", "tests/test_edge_values.py::test_rms_norm_edge_values")
LORA = ("tests/test_lora_linear.py", "tests/test_edge_values.py::test_lora_dropout_over_several_token_groups")
KERNELS = ("tests/test_emulator_kernels.py",)
CROSS_ENTROPY = ("tests/test_cross_entropy.py",)
GLU = ("tests/test_glu.py",)
ROPE = ("tests/test_rope.py",)
ATTENTION = ("tests/test_attention.py",)
# The NaN/±inf contract (issue 31, tests/nan_inf.py), per op.
AUTOGRAD_CONTRACT = ("tests/test_autograd_contract.py",)
NAN_INF_SOFTMAX = ("tests/test_softmax.py::test_nan_inf",)
NAN_INF_CROSS_ENTROPY = (
    "tests/test_cross_entropy.py::test_nan_inf",
    "tests/test_cross_entropy.py::test_nan_inf_issue_31_repro",
)
NAN_INF_GLU = ("tests/test_glu.py::test_nan_inf",)
# The plan cache a Mac uses (the suite's stand-in re-plans every call).
PLAN_CACHE = ("tests/test_compile_shader.py::test_cached_plans_are_keyed_by_everything_they_depend_on",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    find: str  # exact text; must occur exactly once in the file (else the mutant is stale: an error)
    replace: str
    tests: tuple[str, ...]
    why: str  # the real bug it models
    control: bool = False  # an equivalent edit: must survive
    ci: bool = False  # part of the CI subset
    keyword: str = "emulated"  # pytest -k: the tests on the harness, unless the code is not a kernel's


def _m(name, path, find, replace, tests, why, **kw) -> Mutant:
    return Mutant(name, path, find, replace, tuple(tests), why, **kw)


S, R, L, H = "shaders/softmax.metal", "shaders/rms_norm.metal", "shaders/lora_linear.metal", "shaders/reduce.h"
CE = "shaders/cross_entropy.metal"
GL = "shaders/glu.metal"
RP = "shaders/rope.metal"
AT = "shaders/attention.metal"
MUTANTS: list[Mutant] = [
    # ---- softmax ----
    _m(
        "softmax_simd_rows_no_max_subtraction",
        S,
        "v[i] = c < p.cols ? exp_nonpositive(v[i] - m) : 0.0f;",
        "v[i] = c < p.cols ? exp_nonpositive(v[i]) : 0.0f;",
        SOFTMAX,
        "short rows: exp(x) instead of exp(x - max) overflows on large logits",
        ci=True,
    ),
    _m(
        "softmax_single_row_simd_max_only",
        S,
        "  m = threadgroup_max(m, scratch, lane, simd_group, n_simd);\n  float s = 0.0f;\n  for (uint i = 0; i < READS",
        "  m = simd_max(m);\n  float s = 0.0f;\n  for (uint i = 0; i < READS",
        SOFTMAX,
        "the row max reduced within one SIMD-group, not the threadgroup",
    ),
    _m(
        "softmax_looped_local_max_in_second_pass",
        S,
        "yr[c] = static_cast<T>(exp_nonpositive(float(xr[c]) - row_max) * inv);",
        "yr[c] = static_cast<T>(exp_nonpositive(float(xr[c]) - m) * inv);",
        SOFTMAX,
        "the second pass uses the thread's own max instead of the row's",
        ci=True,
    ),
    _m(
        "softmax_looped_running_sum_not_rescaled",
        S,
        "s = s * exp_nonpositive(m - xv) + exp_nonpositive(xv - xv);",
        "s = s + exp_nonpositive(xv - xv);",
        SOFTMAX,
        "online softmax: a thread's running sum kept at the old max when a larger value arrives",
    ),
    _m(
        "softmax_looped_thread_sum_not_moved_to_row_max",
        S,
        "s = m == -INFINITY ? (isnan(s) ? s : 0.0f) : s * exp_nonpositive(m - row_max);",
        "s = m == -INFINITY ? (isnan(s) ? s : 0.0f) : s;",
        SOFTMAX,
        "each thread's sum added at its own max instead of rescaled to the row's",
    ),
    _m(
        "softmax_looped_output_at_the_input_row_stride",
        S,
        "device T* yr = y + ulong(row) * p.cols;\n  // Pass 1: online max",
        "device T* yr = y + ulong(row) * p.x_row_stride;\n  // Pass 1: online max",
        SOFTMAX,
        "long rows: the contiguous output addressed with the input's row stride (wrong for a view with wider rows)",
    ),
    _m(
        "softmax_single_row_output_at_the_input_row_stride",
        S,
        "device T* yr = y + ulong(row) * p.cols;\n  const uint c0 = tid * READS;",
        "device T* yr = y + ulong(row) * p.x_row_stride;\n  const uint c0 = tid * READS;",
        SOFTMAX,
        "mid-size rows: the contiguous output addressed with the input's row stride",
    ),
    _m(
        "softmax_looped_neg_inf_guard_dropped",
        S,
        "} else if (xv != -INFINITY) {",
        "} else {",
        SOFTMAX,
        "a masked (-inf) element seen before any finite one adds exp(-inf - -inf) = NaN to the sum",
    ),
    _m(
        "softmax_looped_nan_sum_dropped_without_a_max",
        S,
        "s = m == -INFINITY ? (isnan(s) ? s : 0.0f) : s * exp_nonpositive(m - row_max);",
        "s = m == -INFINITY ? 0.0f : s * exp_nonpositive(m - row_max);",
        NAN_INF_SOFTMAX,
        "issue 31: a thread whose elements are all NaN or -inf keeps m = -inf and its NaN sum is thrown away (max "
        "drops the NaN), so a NaN among -inf gives a finite softmax",
    ),
    _m(
        "softmax_looped_nan_never_summed",
        S,
        "} else if (xv != -INFINITY) {",
        "} else if (xv > -INFINITY) {",
        NAN_INF_SOFTMAX,
        "the online loop's -inf test written as a comparison that is false for NaN: a NaN element never reaches the "
        "sum, and the row is finite",
    ),
    _m(
        "softmax_looped_noop_statement",
        S,
        "    const float xv = float(xr[c]);",
        "    const float xv = float(xr[c]); c += 0 * threads;",
        SOFTMAX,
        "(control) a no-op statement in the online loop",
        control=True,
    ),
    _m(
        "softmax_simd_rows_backward_unreduced_dot",
        S,
        "  dot = simd_sum(dot);",
        "  dot = dot;",
        SOFTMAX,
        "backward dot product not reduced across the SIMD-group",
    ),
    _m(
        "softmax_single_row_backward_dy_stride",
        S,
        "  device T* dxr = dx + ulong(row) * p.cols;\n  const uint c0 = tid * READS;\n  float yv[READS];",
        "  device T* dxr = dx + ulong(row) * p.cols;\n  const uint c0 = tid * READS;\n  float yv[READS];\n"
        "  dyr = dy + ulong(row) * p.cols;",
        SOFTMAX,
        "dy addressed with y's row stride (wrong for a dy view with wider rows)",
    ),
    _m(
        "softmax_looped_backward_sign",
        S,
        "dxr[c] = static_cast<T>(float(yr[c]) * (float(dyr[c]) - dot));",
        "dxr[c] = static_cast<T>(float(yr[c]) * (float(dyr[c]) + dot));",
        SOFTMAX,
        "a sign slip in dx = y * (dy - sum(dy * y))",
    ),
    _m(
        "row_load_full_block_off_by_one",
        "shaders/row_io.h",
        "  if (c0 + N <= cols) {\n    for (uint i = 0; i < N; ++i) {\n      v[i] = float(row[c0 + i]);",
        "  if (c0 + N <= cols + 1) {\n    for (uint i = 0; i < N; ++i) {\n      v[i] = float(row[c0 + i]);",
        SOFTMAX,
        "an off-by-one full-block test: the row's tail loaded without bounds checks",
        ci=True,
    ),
    _m(
        "softmax_half_instantiation_slip",
        S,
        'template [[host_name("softmax_forward_single_row_half")]] [[kernel]] '
        "decltype(softmax_forward_single_row<half>) softmax_forward_single_row<half>;",
        'template [[host_name("softmax_forward_single_row_half")]] [[kernel]] '
        "decltype(softmax_forward_simd_rows<half>) softmax_forward_simd_rows<half>;",
        SOFTMAX,
        "the wrong variant bound to a host name (one dtype only)",
    ),
    _m(
        "softmax_single_row_extra_barrier",
        S,
        "  const float inv = 1.0f / threadgroup_sum(s, scratch, lane, simd_group, n_simd);\n"
        "  for (uint i = 0; i < READS",
        "  const float inv = 1.0f / threadgroup_sum(s, scratch, lane, simd_group, n_simd);\n"
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (uint i = 0; i < READS",
        SOFTMAX,
        "(control) a redundant barrier in uniform control flow",
        control=True,
        ci=True,
    ),
    # ---- shared reductions ----
    _m(
        "reduce_no_leading_barrier",
        H,
        "  v = Op::simd(v);\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n",
        "  v = Op::simd(v);\n",
        SOFTMAX,
        "back-to-back reductions over one scratch race (the max's readers vs the sum's writers)",
        ci=True,
    ),
    _m(
        "reduce_publishes_with_a_device_barrier",
        H,
        "  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n  return Op::simd",
        "  }\n  threadgroup_barrier(mem_flags::mem_device);\n  return Op::simd",
        SOFTMAX,
        "the SIMD-groups' partials published with a mem_device barrier, which does not order threadgroup memory on "
        "Metal (right on the harness's schedule; the checker orders memory by the barrier's mem_flags)",
    ),
    _m(
        "reduce_reads_one_slot_too_many",
        H,
        "lane < n_simd ? scratch[lane]",
        "lane <= n_simd ? scratch[lane]",
        SOFTMAX,
        "the partials of a SIMD-group that does not exist are read",
    ),
    _m(
        "reduce_sum_identity",
        H,
        "  static float identity() { return 0.0f; }",
        "  static float identity() { return 1.0f; }",
        RMS_NORM,
        "a wrong identity for the sum",
    ),
    # ---- RMSNorm ----
    _m(
        "rms_norm_simd_rows_no_eps",
        R,
        "const float r = precise::rsqrt(simd_sum(ss) / float(p.cols) + p.eps);",
        "const float r = precise::rsqrt(simd_sum(ss) / float(p.cols));",
        RMS_NORM,
        "eps dropped (short rows): all-zero rows give NaN",
        ci=True,
    ),
    _m(
        "rms_norm_looped_output_at_the_input_row_stride",
        R,
        "device T* yr = y + ulong(row) * p.cols;\n  device T* hr = h + ulong(row) * p.cols;\n  float ss",
        "device T* yr = y + ulong(row) * p.x_row_stride;\n  device T* hr = h + ulong(row) * p.cols;\n  float ss",
        RMS_NORM,
        "long rows: the contiguous output addressed with the input's row stride (wrong for a view with wider rows)",
    ),
    _m(
        "rms_norm_single_row_no_eps",
        R,
        "  const float r = precise::rsqrt(threadgroup_sum(ss, scratch, lane, simd_group, n_simd) / float(p.cols)"
        " + p.eps);"
        "\n  if (tid == 0) {\n    rstd[row] = r;\n  }\n  for (uint i = 0; i < READS",
        "  const float r = precise::rsqrt(threadgroup_sum(ss, scratch, lane, simd_group, n_simd) / float(p.cols));"
        "\n  if (tid == 0) {\n    rstd[row] = r;\n  }\n  for (uint i = 0; i < READS",
        RMS_NORM,
        "eps dropped (mid-size rows)",
    ),
    _m(
        "rms_norm_looped_no_weight_offset",
        R,
        "yr[c] = static_cast<T>(HAS_WEIGHT ? v * (float(w[c]) + p.weight_offset) : v);",
        "yr[c] = static_cast<T>(HAS_WEIGHT ? v * float(w[c]) : v);",
        RMS_NORM,
        "Gemma's (1 + w) offset lost in one variant",
    ),
    _m(
        "rms_norm_backward_dw_without_rstd",
        R,
        "        dw_acc[i] += d * xv[i] * r;",
        "        dw_acc[i] += d * xv[i];",
        RMS_NORM,
        "dw = sum(dy * x) without the normalisation",
        ci=True,
    ),
    _m(
        "rms_norm_backward_coef_not_mean",
        R,
        "const float coef = r * r * threadgroup_sum(dot, scratch, lane, simd_group, n_simd) * inv_cols;",
        "const float coef = r * r * threadgroup_sum(dot, scratch, lane, simd_group, n_simd);",
        RMS_NORM,
        "a sum where the formula has a mean",
    ),
    _m(
        "rms_norm_backward_looped_partial_not_zeroed",
        R,
        "      partial[c] = 0.0f;  // each thread owns",
        "      (void)partial;  // each thread owns",
        RMS_NORM,
        "the dw partial row accumulates onto uninitialised memory",
    ),
    _m(
        "rms_norm_dw_reduce_no_barrier",
        R,
        "  slice_sums[tid] = s;\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n",
        "  slice_sums[tid] = s;\n",
        RMS_NORM,
        "the slices' sums read before every slice wrote them",
        ci=True,
    ),
    _m(
        "rms_norm_dw_reduce_skips_a_partial_row",
        R,
        "    for (uint g = slice; g < p.groups; g += slices) {",
        "    for (uint g = slice + slices; g < p.groups; g += slices) {",
        RMS_NORM,
        "a partial row left out of the column sums",
    ),
    _m(
        "rms_norm_backward_rows_overlap",
        R,
        "  for (uint row = group; row < p.rows; row += p.groups) {  // uniform across the threadgroup",
        "  for (uint row = group; row < p.rows; row += 1) {  // uniform across the threadgroup",
        RMS_NORM,
        "threadgroups' row sets overlap: dw counts rows several times",
    ),
    _m(
        "rms_norm_noweight_bfloat_instantiation_slip",
        R,
        'template [[host_name("rms_norm_forward_noweight_single_row_bfloat")]] [[kernel]] '
        "decltype(rms_norm_forward_single_row<bfloat, false, false>) "
        "rms_norm_forward_single_row<bfloat, false, false>;",
        'template [[host_name("rms_norm_forward_noweight_single_row_bfloat")]] [[kernel]] '
        "decltype(rms_norm_forward_single_row<bfloat, true, false>) rms_norm_forward_single_row<bfloat, true, false>;",
        RMS_NORM,
        "the weight variant bound to the no-weight host name (bfloat16 only)",
        ci=True,
    ),
    _m(
        "rms_norm_half_stats_in_half",
        R,
        "      v[i] = float(sum);\n    }\n    ss += v[i] * v[i];",
        "      v[i] = float(sum);\n    }\n    ss += float(T(v[i] * v[i]));",
        RMS_NORM,
        "x² rounded to the input dtype: overflows float16 for large inputs",
    ),
    # ---- LoRA ----
    _m(
        "lora_first_group_mask_rows_reused",
        L,
        "device const T* mask_rows = mask + ulong(t0) * p.reduce_dim;",
        "device const T* mask_rows = mask;",
        LORA,
        "every token tile applies the first tile's dropout-mask rows",
        ci=True,
    ),
    _m(
        "lora_no_barrier_before_restaging",
        L,
        "    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are restaged by the next chunk\n",
        "\n",
        LORA,
        "the next chunk overwrites the tiles while others still read them",
    ),
    _m(
        "lora_expand_no_barrier_before_restaging",
        L,
        "    threadgroup_barrier(mem_flags::mem_threadgroup);  // h_tile is restaged by the next step\n",
        "\n",
        LORA,
        "the next rows of h overwrite the tile while others still read it",
    ),
    _m(
        "lora_partial_token_tile",
        L,
        "const uint nt = min(bm, p.tokens - t0);",
        "const uint nt = bm;",
        LORA,
        "the last, partial tile of tokens treated as full",
    ),
    _m(
        "lora_expand_partial_token_group",
        L,
        "const uint t_end = min(t_begin + p.tokens_per_group, p.tokens);",
        "const uint t_end = t_begin + p.tokens_per_group;",
        LORA,
        "the last, partial group of token rows treated as full",
    ),
    _m(
        "lora_second_rank_block_offset_dropped",
        L,
        "j0 = simd_group / token_groups * RANKS_PER_THREAD;",
        "j0 = 0;",
        LORA,
        "ranks above 64: every SIMD-group of a token tile accumulates the first rank block",
    ),
    _m(
        "lora_lane_matrix_position_transposed",
        "shaders/simdgroup_matrix.h",
        "return LanePosition{(quad & 4) + (lane / 2) % 4, (quad & 2) * 2 + (lane % 2) * 2};",
        "return LanePosition{(quad & 2) * 2 + (lane % 2) * 2, (quad & 4) + (lane / 2) % 4};",
        LORA + ATTENTION,
        "a lane's simdgroup-matrix elements placed at the transposed position (row and column swapped)",
    ),
    _m(
        "lora_backward_ignores_mask",
        L,
        "const float m = p.has_mask != 0 ? float(mask[idx]) : 1.0f;",
        "const float m = 1.0f;",
        LORA,
        "dropout's mask not applied to dx",
    ),
    _m(
        "lora_backward_dh_unscaled",
        MP,
        "reduce_scale, expand_scale = (1.0, scale) if forward else (scale, 1.0)",
        "reduce_scale, expand_scale = (1.0, scale) if forward else (1.0, 1.0)",
        LORA,
        "dh = dy·B without the adapter's scale",
    ),
    _m(
        "lora_h_rounded_to_the_activations_dtype",
        L,
        "h[ulong(t0 + t) * r + j] = static_cast<W>(acc[m][q].thread_elements()[e] * p.scale);",
        "h[ulong(t0 + t) * r + j] = static_cast<W>(static_cast<T>(acc[m][q].thread_elements()[e] * p.scale));",
        LORA,
        "float32 adapters: h and dh rounded to x's half precision before they are stored in float32",
    ),
    _m(
        "lora_float_adapter_variant_taken_for_same_dtype",
        MP,
        'return f"tg{floats}" + ("" if adapter_dtype == dtype else "_float_adapters")',
        'return f"tg{floats}" + ("_float_adapters" if dtype != torch.float32 else "")',
        LORA,
        "the float_adapters variant bound to half-precision adapters (reads them as float32)",
    ),
    _m(
        "lora_input_rounded_to_its_dtype_again",
        L,
        "            v = float(in_rows[ulong(t) * p.in_row_stride + k]);",
        "            v = float(static_cast<T>(float(in_rows[ulong(t) * p.in_row_stride + k])));",
        LORA,
        "(control) the input rounded to its own dtype once more before the mask: nothing changes",
        control=True,
    ),
    # ---- the CUDA float32-adapter route (Python over cuBLAS products; its tests run on CPU tensors) ----
    _m(
        "cuda_f32_adapters_cross_term_dropped",
        "torch_metal_fused/backends/cuda.py",
        "    factor = torch.cat((b_hi, b_hi, b_lo), 1)",
        "    factor = torch.cat((b_hi, torch.zeros_like(b_hi), b_lo), 1)",
        ("tests/test_lora_linear.py",),
        "y loses the lo·hi cross term: 8 significant bits of the adapter term, within bfloat16's tolerance",
        keyword="float32_adapter_route",
    ),
    _m(
        "cuda_f32_adapters_infinite_lo_product_summed",
        "torch_metal_fused/backends/cuda.py",
        "return torch.add(a, b.nan_to_num_(0.0, 0.0, 0.0))",
        "return torch.add(a, b)",
        ("tests/test_lora_linear.py",),
        "an infinite activation: inf·a_hi + inf·a_lo of the other sign gives NaN where PEFT's product gives inf",
        keyword="float32_adapter_route",
    ),
    _m(
        "cuda_f32_adapters_infinite_hi_in_the_cross_term",
        "torch_metal_fused/backends/cuda.py",
        "lowrank = torch.cat((h_hi, h_lo, _finite(h_hi)), 1)",
        "lowrank = torch.cat((h_hi, h_lo, h_hi), 1)",
        ("tests/test_lora_linear.py",),
        "an infinite h: the hi·lo cross term adds inf·b_lo, possibly of the other sign",
        keyword="float32_adapter_route",
    ),
    # ---- cross-entropy ----
    _m(
        "cross_entropy_target_term_dropped_from_grad",
        CE,
        "(int(c) == t ? 1.0f - eps : 0.0f)",
        "(int(c) == t ? 0.0f : 0.0f)",
        CROSS_ENTROPY,
        "the gradient forgets the target's -1",
        ci=True,
    ),
    _m(
        "cross_entropy_running_sum_not_rescaled",
        CE,
        "s = s * exp_nonpositive(m - z) + exp_nonpositive(z - z);",
        "s = s + exp_nonpositive(z - z);",
        CROSS_ENTROPY,
        "online logsumexp: a thread's running sum kept at the old max when a larger logit arrives",
    ),
    _m(
        "cross_entropy_target_words_not_strided",
        CE,
        "load_uniform(target + ulong(row) * p.target_word_stride, 0, lane)",
        "load_uniform(target, row, lane)",
        CROSS_ENTROPY,
        "targets read as contiguous int32: an int64 target's row reads another row's words",
    ),
    _m(
        "cross_entropy_plan_key_without_the_target_stride",
        "torch_metal_fused/backends/metal.py",
        "_row_stride(logits2), target_word_stride, ignore_index",
        "_row_stride(logits2), ignore_index",
        PLAN_CACHE,
        "a cached plan built for int64 targets serves int32 ones (every other row's target read)",
    ),
    _m(
        "cross_entropy_neg_inf_guard_dropped",
        CE,
        "} else if (z != -INFINITY) {",
        "} else {",
        CROSS_ENTROPY,
        "a masked (-inf) logit seen before any finite one adds exp(-inf - -inf) = NaN to the sum",
    ),
    _m(
        "cross_entropy_nan_sum_dropped_without_a_max",
        CE,
        "s = m == -INFINITY ? (isnan(s) ? s : 0.0f) : s * exp_nonpositive(m - row_max);",
        "s = m == -INFINITY ? 0.0f : s * exp_nonpositive(m - row_max);",
        NAN_INF_CROSS_ENTROPY,
        "issue 31 as reported: a thread holding only a NaN logit (vocab 8, 33, 300: one logit per thread) keeps "
        "m = -inf and its NaN sum is thrown away, so the loss is finite while the gradient row is NaN",
    ),
    _m(
        "cross_entropy_nan_never_summed",
        CE,
        "} else if (z != -INFINITY) {",
        "} else if (z > -INFINITY) {",
        NAN_INF_CROSS_ENTROPY,
        "the online loop's -inf test written as a comparison that is false for NaN: a NaN logit never reaches the "
        "logsumexp (the loss stays finite unless the NaN is the target)",
    ),
    _m(
        "cross_entropy_smoothing_over_threads",
        CE,
        "row_loss -= eps * z_sum / float(p.vocab);",
        "row_loss -= eps * z_sum / float(threads);",
        CROSS_ENTROPY,
        "label smoothing's mean taken over the threads, not the vocabulary",
    ),
    _m(
        "cross_entropy_softcap_derivative_dropped",
        CE,
        "        g *= 1.0f - th * th;",
        "        g *= 1.0f;",
        CROSS_ENTROPY,
        "the soft-cap's tanh derivative left out of the gradient",
    ),
    _m(
        "cross_entropy_ignored_rows_get_a_gradient",
        CE,
        "    float g = 0.0f;\n    if (valid) {",
        "    float g = 0.0f;\n    if (true) {",
        CROSS_ENTROPY,
        "ignore_index rows contribute a gradient",
    ),
    _m(
        "cross_entropy_loss_rereads_the_target_in_place",
        CE,
        "      row_loss = lse - (1.0f - eps) * z_target;",
        "      row_loss = lse - (1.0f - eps) * capped_logit(float(zr[t]), p.softcap);",
        CROSS_ENTROPY,
        "thread 0 re-reads z[target] for the loss while the gradient is written over the logits (a race: another "
        "thread may have overwritten it; the checker's device-memory shadow, through the storage bound twice)",
    ),
    _m(
        "cross_entropy_grad_rows_at_the_logits_stride",
        CE,
        "  device T* gr = grad + ulong(row) * p.vocab;",
        "  device T* gr = grad + ulong(row) * p.logits_row_stride;",
        CROSS_ENTROPY,
        "the contiguous gradient addressed with the logits' row stride",
    ),
    # ---- gated activations (SwiGLU / GeGLU) ----
    _m(
        "glu_silu_derivative_without_the_product_term",
        GL,
        "return s * (1.0f + g * (1.0f - s));",
        "return s * (1.0f + (1.0f - s));",
        GLU,
        "silu'(g) = σ(1 + g(1 - σ)) with the g dropped",
        ci=True,
    ),
    _m(
        "glu_gelu_slope_guard_drops_finite_slopes",
        GL,
        "sech2 == 0.0f && isfinite(g) ? 0.0f",
        "sech2 < 1e-3f && isfinite(g) ? 0.0f",
        GLU,
        "the GeGLU derivative's second term zeroed too early (|g| > ~2.5, not only where tanh saturates)",
    ),
    _m(
        "glu_gelu_slope_guard_drops_the_isfinite_test",
        GL,
        "sech2 == 0.0f && isfinite(g) ? 0.0f",
        "sech2 == 0.0f ? 0.0f",
        NAN_INF_GLU,
        "GeGLU's derivative guard (slope 0 where tanh saturates) taken at ±inf too: a finite dgate where torch's "
        "is NaN (±inf · 0)",
    ),
    _m(
        "glu_dup_from_the_derivative",
        GL,
        "    du[i] = d[i] * Activation::value(g[i]);",
        "    du[i] = d[i] * Activation::derivative(g[i]);",
        GLU,
        "d(up) from act'(gate) instead of act(gate)",
    ),
    _m(
        "glu_outputs_at_the_gate_row_stride",
        GL,
        "  store_row_elements<N>(out + ulong(row) * p.cols, c0, p.cols, o);",
        "  store_row_elements<N>(out + ulong(row) * p.gate_row_stride, c0, p.cols, o);",
        GLU,
        "the contiguous output addressed with gate's row stride (fused gate_up halves)",
    ),
    _m(
        "glu_launch_flattens_strided_rows",
        MP,
        " and all(s == cols for s in row_strides)",
        "",
        GLU,
        "rows spaced wider than their length launched as one flat row",
    ),
    _m(
        "glu_launch_one_group_per_row",
        MP,
        "    groups_per_row = ceil_div(cols, threads * per_thread)",
        "    groups_per_row = 1",
        GLU,
        "rows longer than one threadgroup's elements left partly unwritten",
    ),
    # ---- residual add + RMSNorm (rms_norm.metal's add variants) ----
    _m(
        "add_rms_norm_backward_drops_the_residual_gradient",
        R,
        "          gv[i] += rv[i];",
        "          gv[i] += 0.0f;",
        ("tests/test_add_rms_norm.py",),
        "single_row backward: the residual stream's gradient not added to dx",
        ci=True,
    ),
    _m(
        "add_rms_norm_looped_backward_drops_the_residual_gradient",
        R,
        "const float through = ADD ? float(d_residual[ulong(row) * p.d_residual_row_stride + c]) : 0.0f;",
        "const float through = 0.0f;",
        ("tests/test_add_rms_norm.py",),
        "looped backward (rows > 8192): the residual stream's gradient not added to dx",
    ),
    _m(
        "add_rms_norm_residual_read_at_the_x_row_stride",
        R,
        "    load_row_elements<READS>(residual + ulong(row) * p.residual_row_stride, c0, p.cols, 0.0f, rv);",
        "    load_row_elements<READS>(residual + ulong(row) * p.x_row_stride, c0, p.cols, 0.0f, rv);",
        ("tests/test_add_rms_norm.py",),
        "the residual's rows addressed with x's row stride",
    ),
    # ---- rotary embedding ----
    _m(
        "rope_backward_keeps_the_forward_sines",
        RP,
        "const float sin_for_a = p.backward != 0 ? -sin_b : sin_a;",
        "const float sin_for_a = p.backward != 0 ? sin_a : sin_a;",
        ROPE,
        "backward rotates by the forward rotation instead of its transpose",
        ci=True,
    ),
    _m(
        "rope_interleaved_pairs_as_halves",
        RP,
        "const uint b = p.interleaved != 0 ? 2 * slot + 1 : slot + half_rotary;",
        "const uint b = slot + half_rotary;",
        ROPE,
        "interleaved pairs (2i, 2i + 1) taken as rotate_half's (i, i + d/2)",
    ),
    _m(
        "rope_k_walked_with_q_head_stride",
        RP,
        "rope_rotate_heads(k, k_base, p.k_head_stride,",
        "rope_rotate_heads(k, k_base, p.q_head_stride,",
        ROPE,
        "k's heads addressed with q's head stride (GQA, transposed projections)",
    ),
    _m(
        "rope_partial_rotary_copies_the_wrong_elements",
        RP,
        "const uint e = p.rotary_dim + (slot - half_rotary);",
        "const uint e = slot;",
        ROPE,
        "partial rotary: the pass-through elements copied from the rotated part",
    ),
    _m(
        "rope_launch_cos_per_sequence_when_shared",
        MP,
        "cos_batch_stride=0 if cos.shape[0] == 1 else seq * rotary_dim,",
        "cos_batch_stride=seq * rotary_dim,",
        ROPE,
        "cos/sin shared by the batch indexed as if per sequence",
    ),
    _m(
        "rope_cos_per_sequence_read_from_the_first",
        RP,
        "const ulong cs = ulong(bi) * p.cos_batch_stride + ulong(s) * p.rotary_dim;",
        "const ulong cs = ulong(s) * p.rotary_dim;",
        ROPE,
        "cos/sin given per sequence (position_ids differing by sequence) all read from the first sequence's table",
    ),
    _m(
        "rope_partner_takes_the_first_elements_cosine",
        RP,
        "const float cos_b = float(cos_table[cs + b]);",
        "const float cos_b = float(cos_table[cs + a]);",
        ROPE,
        "the pair's second element rotated by the first's cosine: right for HF's tables (duplicated halves), wrong for "
        "any cos table whose halves differ",
    ),
    _m(
        "exp_nonpositive_trusts_fast_exp2_with_nan",
        H,
        "  return isnan(x) ? x : fast::exp2(x * 1.4426950408889634f);",
        "  return fast::exp2(x * 1.4426950408889634f);",
        NAN_INF_SOFTMAX,
        "a NaN left to fast::exp2, whose result for NaN Apple does not document (the harness returns 0): a NaN logit "
        "dropped from its softmax row",
    ),
    # ---- attention ----
    _m(
        "attention_online_softmax_without_rescale",
        AT,
        "        o_acc[d].thread_elements() *= alpha;",
        "        o_acc[d].thread_elements() *= 1.0f;",
        ATTENTION,
        "the output accumulators not rescaled when a later key block raises the row maximum",
        ci=True,
    ),
    _m(
        "attention_causal_key_visible_off_by_one",
        AT,
        "return long(kj) <= last && (p.window == 0 || long(kj) > last - long(p.window));",
        "return long(kj) < last && (p.window == 0 || long(kj) > last - long(p.window));",
        ATTENTION,
        "causal mask drops the diagonal (each query's own key)",
    ),
    _m(
        "attention_causal_key_range_ends_one_early",
        AT,
        "const long end = clamp_long(long(q1) - 1 + offset + 1, 0, long(p.kv_len));",
        "const long end = clamp_long(long(q1) - 1 + offset, 0, long(p.kv_len));",
        ATTENTION,
        "the key blocks walked by a group of query rows stop one key before the last row's diagonal",
    ),
    _m(
        "attention_window_edge_inclusive",
        AT,
        "return long(kj) <= last && (p.window == 0 || long(kj) > last - long(p.window));",
        "return long(kj) <= last && (p.window == 0 || long(kj) >= last - long(p.window));",
        ATTENTION,
        "the sliding window one key wider than HF's (kv_idx > q_idx - sliding_window)",
    ),
    _m(
        "attention_dkdv_query_range_starts_one_late",
        AT,
        "const long begin = clamp_long(long(k0) - offset, 0, long(p.q_len));",
        "const long begin = clamp_long(long(k0) - offset + 1, 0, long(p.q_len));",
        ATTENTION,
        "dK/dV skip the first query that sees a group's first key (causal)",
    ),
    _m(
        "attention_dkdv_window_query_range_ends_one_early",
        AT,
        "const long end = clamp_long(long(k1) - 1 - offset + long(p.window), begin, long(p.q_len));",
        "const long end = clamp_long(long(k1) - 2 - offset + long(p.window), begin, long(p.q_len));",
        ATTENTION,
        "dK/dV stop one query before the last that sees a group's last key within the window (caught only where the "
        "edge falls on a staged block's boundary)",
    ),
    _m(
        "attention_dkdv_gqa_head_mapping",
        AT,
        "const uint h = hk * heads_per_kv + g;",
        "const uint h = g * p.kv_heads + hk;",
        ATTENTION,
        "dK/dV sum the query heads of a kv head interleaved (h % kv_heads) instead of grouped (h / group)",
    ),
    _m(
        "attention_dq_without_delta",
        AT,
        "ds = pe * (dp[j].thread_elements()[e] - row_delta) * (1.0f - t * t) * p.scale;",
        "ds = pe * dp[j].thread_elements()[e] * (1.0f - t * t) * p.scale;",
        ATTENTION,
        "dS = P * dP: the softmax backward's delta term dropped (dQ)",
    ),
    _m(
        "attention_delta_of_dout_alone",
        AT,
        "    sum += float(do_row[d]) * float(o_row[d]);",
        "    sum += float(do_row[d]);",
        ATTENTION,
        "delta = rowsum(dout) instead of rowsum(dout * out)",
    ),
    _m(
        "attention_dkdv_softcap_without_chain_rule",
        AT,
        "ds = pe * (dpt[j].thread_elements()[e] - c_delta) * (1.0f - t * t) * p.scale;",
        "ds = pe * (dpt[j].thread_elements()[e] - c_delta) * p.scale;",
        ATTENTION,
        "dK ignores the soft-cap's tanh derivative",
    ),
    _m(
        "attention_forward_tiles_restaged_without_barrier",
        AT,
        "    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are restaged by the next block",
        "",
        ATTENTION,
        "K and V restaged while slower SIMD-groups still read the previous block (a race)",
    ),
    _m(
        "attention_lse_of_the_sum_alone",
        AT,
        "lse[(ulong(b) * p.q_heads + h) * p.q_len + qi] = l == 0.0f ? -INFINITY : m + log(l);",
        "lse[(ulong(b) * p.q_heads + h) * p.q_len + qi] = l == 0.0f ? -INFINITY : log(l);",
        ATTENTION,
        "the saved log-sum-exp without the row maximum (backward probabilities off by exp(max))",
    ),
    _m(
        "attention_launch_dkdv_for_one_kv_head",
        MP,
        "for pipeline, rows_total, heads in ((dq_pipeline, q_len, q_heads), (dkdv_pipeline, kv_len, kv_heads)):",
        "for pipeline, rows_total, heads in ((dq_pipeline, q_len, q_heads), (dkdv_pipeline, kv_len, 1)):",
        ATTENTION,
        "the dK/dV grid covers the first kv head only",
    ),
    _m(
        "attention_plan_cache_key_without_window",
        MP,
        'key = ("forward", q.dtype, shapes, tuple(strides.items()), causal, window, scale, softcap)',
        'key = ("forward", q.dtype, shapes, tuple(strides.items()), causal, scale, softcap)',
        PLAN_CACHE,
        "a Mac's cached attention plan reused for another sliding window",
    ),
    # ---- launch plans (torch_metal_fused/backends/metal.py) ----
    _m(
        "plan_cache_key_without_eps",
        MP,
        "    key = (base, x2.dtype, rows, cols, _row_stride(x2), residual_stride, eps, offset)",
        "    key = (base, x2.dtype, rows, cols, _row_stride(x2), residual_stride, offset)",
        PLAN_CACHE,
        "a Mac's cached RMSNorm plan reused for another eps: the first call's eps in every later one",
    ),
    _m(
        "plan_cache_key_without_the_activation",
        MP,
        '        ("forward", activation, gate.dtype, *g2.shape, *strides),',
        '        ("forward", gate.dtype, *g2.shape, *strides),',
        PLAN_CACHE,
        "SwiGLU's cached plan (its kernel) reused for GeGLU of the same shape",
    ),
    _m(
        "launch_simd_rows_threshold",
        MP,
        "SIMD_ROWS_MAX_COLS = 256",
        "SIMD_ROWS_MAX_COLS = 512",
        SOFTMAX,
        "simd_rows chosen for rows longer than its 8 elements per lane hold",
        ci=True,
    ),
    _m(
        "launch_single_row_fits_strictly",
        MP,
        "        if needed <= pipeline.max_threads:",
        "        if needed < pipeline.max_threads:",
        (*SOFTMAX, *KERNELS),
        "4096-wide rows fall back to the looped variant (reads x twice)",
    ),
    _m(
        "launch_lora_group_too_tall",
        MP,
        "bm = min(wanted, round_down(cap // blocks, SIMD_WIDTH),",
        "bm = min(wanted, round_down(cap // blocks + SIMD_WIDTH, SIMD_WIDTH),",
        (*LORA, *KERNELS),
        "more token rows per tile than the pipeline's threads allow",
    ),
    _m(
        "launch_lora_reduce_tiles_too_short",
        MP,
        "LORA_REDUCE_TOKENS_PER_RANK = 16",
        "LORA_REDUCE_TOKENS_PER_RANK = 4",
        KERNELS,
        "A (B backward) re-read once per 4 · rank token rows: 1.2x the minimum at rank 64 (traffic)",
    ),
    _m(
        "launch_lora_threadgroup_memory_over_budget",
        MP,
        "budget = min(MAX_THREADGROUP_BYTES, threads * THREADGROUP_BYTES_PER_THREAD) // 4",
        "budget = min(MAX_THREADGROUP_BYTES, 2 * threads * THREADGROUP_BYTES_PER_THREAD) // 4",
        KERNELS,
        "staging tiles sized past 16 KiB per 256 threads (fewer groups per core)",
    ),
    _m(
        "launch_rms_norm_rows_per_weight_read",
        MP,
        "MIN_ROWS_PER_OPERAND_READ = 20",
        "MIN_ROWS_PER_OPERAND_READ = 1",
        (*RMS_NORM, *KERNELS),
        "the weight re-read for every row (traffic)",
    ),
    _m(
        "launch_rms_norm_backward_no_group_for_few_rows",
        MP,
        "min(max(rows // ROWS_PER_DW_PARTIAL_ROW, 1),",
        "min(max(rows // ROWS_PER_DW_PARTIAL_ROW, 0),",
        RMS_NORM,
        "fewer rows than one dw partial row takes launch no threadgroup: dx and dw never written",
    ),
    _m(
        "launch_rms_norm_dw_reduce_drops_the_column_tail",
        MP,
        "(ceil_div(cols, columns), 1, 1)",
        "(cols // columns, 1, 1)",
        RMS_NORM,
        "the dw reduction launched for whole 32-column blocks only: the last columns of dw never summed",
    ),
    _m(
        "launch_softmax_backward_strides_swapped",
        MP,
        '_row_params("softmax", rows, cols, cols, _row_stride(dy2), rpg)',
        '_row_params("softmax", rows, cols, _row_stride(dy2), cols, rpg)',
        SOFTMAX,
        "y (contiguous) read at dy's row stride and dy at y's: right only when dy is contiguous too",
    ),
    _m(
        "launch_cross_entropy_loss_only_writes_a_gradient",
        MP,
        "want_grad=int(want_grad),",
        "want_grad=1,",
        CROSS_ENTROPY,
        "a loss-only call told to write the gradient: it lands on the binding that stands in for it, the logits",
    ),
    _m(
        "glu_launch_dout_stride_ignored",
        MP,
        "else [*row_strides, cols][:3]",
        "else [*row_strides[:2], cols]",
        GLU,
        "the backward's incoming gradient addressed as contiguous rows whatever its row stride",
    ),
    _m(
        "row_store_tail_one_past_the_row",
        "shaders/row_io.h",
        "      if (c0 + i < cols) {",
        "      if (c0 + i <= cols) {",
        (*SOFTMAX, *RMS_NORM),
        "an off-by-one bound in the tail's stores: one element past the row written (the next row's first)",
    ),
    # The op layer's autograd semantics (issue 31): Python, guarded by the contract on the reference and the harness.
    _m(
        "linear_cross_entropy_keeps_the_gradients_it_hands_over",
        "torch_metal_fused/ops/cross_entropy.py",
        "ctx.eager_grads = None  # autograd owns them now",
        "pass  # autograd owns them now",
        AUTOGRAD_CONTRACT,
        "issue 31 as reported: loss.backward() hands the gradients computed in forward to autograd and keeps them, so "
        "a retained graph's next backward accumulates into them (third call: 'modified by an inplace operation')",
    ),
    _m(
        "lora_linear_saves_a_copy_of_its_input",
        "torch_metal_fused/ops/lora_linear.py",
        "ctx.save_for_backward(x if ctx.x_source is None else None,",
        "ctx.save_for_backward(x.clone() if ctx.x_source is None else None,",
        ("tests/test_bench.py",),
        "issue 30's memory finding in our own op: backward keeps a copy of the activations (a contiguous or upcast "
        "x) instead of the tensor the step holds anyway, one more activation per adapted projection",
        keyword="saves_for_backward",
    ),
    _m(
        "glu_activation_kept_for_the_down_projection",
        "torch_metal_fused/ops/glu.py",
        "            return _RecomputedGlu(node, t.shape)",
        "            return t",
        ("tests/test_glu.py", "tests/test_bench.py"),
        "the down projection keeps glu's output for backward again: a tokens x intermediate tensor per layer held "
        "until backward, the same values (only the memory tests see it)",
        keyword="keeps_no_activation or memory_counts",
    ),
    _m(
        "glu_overwrites_inputs_something_else_reads",
        "torch_metal_fused/ops/_dispatch.py",
        "    return all(c == private[1] if t._base is not None else c == private[0] for t, c in zip(tensors, counts))",
        "    return True",
        ("tests/test_glu.py",),
        "the SwiGLU backward writes its gradients over gate and up although the caller holds them (or a view, an alias "
        "or a base): what the caller holds silently becomes gradients",
        keyword="something_else_reads",
    ),
    _m(
        "glu_overwrites_inputs_of_a_retained_graph",
        "torch_metal_fused/ops/_dispatch.py",
        "if keep_graph is None or keep_graph() or create_graph_requested()",
        "if keep_graph is None or create_graph_requested()",
        ("tests/test_glu.py",),
        "retain_graph=True: the first backward writes over gate and up, the second reads gradients as activations",
        keyword="something_else_reads",
    ),
    _m(
        "norm_output_remade_after_an_in_place_change",
        "torch_metal_fused/ops/rms_norm.py",
        "            or y._version != node.remakeable_version\n",
        "",
        ("tests/test_lora_linear.py",),
        "an RMSNorm output changed in place before the LoRA op read it is remade from the norm's input for backward: "
        "the adapters' gradients are of other values than the forward used",
        keyword="norm_output",
    ),
    _m(
        "norm_output_remade_without_the_offset",
        "torch_metal_fused/ops/rms_norm.py",
        "x, weight, self.node.eps, self.node.offset)[0]",
        "x, weight, self.node.eps, 0.0)[0]",
        ("tests/test_lora_linear.py",),
        "Gemma's (1 + weight) dropped when the norm output is remade for backward: the adapters' gradients are off",
        keyword="norm_output",
    ),
    _m(
        "norm_output_remade_when_the_norm_was_checkpointed",
        "torch_metal_fused/ops/rms_norm.py",
        "remakeable = not torch.compiler.is_compiling() and saved_tensors_pass_through() and",
        "remakeable = not torch.compiler.is_compiling() and",
        ("tests/test_lora_linear.py",),
        "the norm alone under non-reentrant checkpointing (selective recompute): the first projection's remake "
        "unpacks the norm's checkpointed saved tensors, which checkpointing allows once, and the norm's backward fails",
        keyword="norm_output",
    ),
    _m(
        "norm_output_held_by_consumers_that_never_ask",
        "torch_metal_fused/ops/rms_norm.py",
        "        if not self.used:\n            self.handle._release()",
        "        pass",
        ("tests/test_lora_linear.py",),
        "a projection called under no_grad (or whose output is dropped) keeps its share of the remade norm output: "
        "the others' backward never releases it, one activation held while the graph lives",
        keyword="norm_output",
    ),
    _m(
        "norm_output_remade_per_consumer",
        "torch_metal_fused/ops/rms_norm.py",
        "        self.value = value\n        self._release()",
        "        self._release()",
        ("tests/test_lora_linear.py",),
        "q, k and v each remake the norm output: three norm passes per backward where one serves",
        keyword="norm_output",
    ),
    _m(
        "norm_output_remade_without_history",
        "torch_metal_fused/ops/rms_norm.py",
        "        if create_graph_requested():  # made by the op",
        "        if False:  # made by the op",
        ("tests/test_lora_linear.py",),
        "create_graph: the remade norm output carries no history, so second-order gradients miss the path through "
        "the norm to its input and weight",
        keyword="norm_output",
    ),
    _m(
        "norm_output_kept_for_backward",
        "torch_metal_fused/ops/lora_linear.py",
        "ctx.x_source = NormOutput.of(x)",
        "ctx.x_source = None",
        ("tests/test_lora_linear.py", "tests/test_bench.py"),
        "the LoRA op keeps the RMSNorm output it read for backward again: a tokens x hidden tensor per norm held until "
        "backward, the same values (only the memory tests see it)",
        keyword="norm_output or memory_counts",
    ),
    _m(
        "lora_dropout_mask_from_a_private_generator",
        "torch_metal_fused/ops/lora_linear.py",
        "bernoulli_(1.0 - dropout_p)",
        "bernoulli_(1.0 - dropout_p, generator=torch.Generator().manual_seed(id(x2)))",
        ("tests/test_patch.py",),
        "the LoRA dropout mask drawn from a generator gradient checkpointing does not restore: the recomputed forward "
        "draws another mask than the one the loss saw, so the adapters' gradients are silently off",
        keyword="gradient_checkpointing",
    ),
    _m(
        "softmax_double_backward_through_the_kernel",
        "torch_metal_fused/ops/softmax.py",
        "        if create_graph_requested():",
        "        if False:",
        AUTOGRAD_CONTRACT,
        "issue 31: backward with create_graph=True runs the non-differentiable kernel, so the second derivative "
        "silently misses the terms through dy and y",
    ),
    _m(
        "rms_norm_double_backward_with_the_saved_rstd",
        "torch_metal_fused/ops/rms_norm.py",
        "            rstd = reference.rms_norm_rstd(x, ctx.eps)\n",
        "",
        AUTOGRAD_CONTRACT,
        "issue 31 as reported (11-75 % off in gradgradcheck): the double-backward formula uses the rstd saved in "
        "forward, which carries no gradient of x",
    ),
    _m(
        "shared_dw_reduce_columns",
        "csrc/include/tmf/shader_args.h",
        "TMF_SHARED_CONSTANT uint kDwReduceColumns = 32;",
        "TMF_SHARED_CONSTANT uint kDwReduceColumns = 16;",
        RMS_NORM,
        "(control) a constant shared by host and shader changed on both sides at once",
        control=True,
    ),
]


@dataclass
class Result:
    mutant: Mutant
    outcome: str  # "killed", "killed (does not compile)", "survived", "error"
    seconds: float
    detail: str


def _copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files (the working tree as it is)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dest / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f.decode())


def _env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_METAL_FUSED_") or k.endswith("_CACHE")}
    env.update(PYTHONPATH=str(copy), CI=env.get("CI", "1"), TORCH_METAL_FUSED_STRICT="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def run_mutant(m: Mutant, copy: Path, timeout_s: float) -> Result:
    target = copy / m.path
    original = target.read_text()
    count = original.count(m.find)
    if count != 1:
        return Result(m, "error", 0.0, f"stale mutant: the text occurs {count} times in {m.path}")
    target.write_text(original.replace(m.find, m.replace))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", m.keyword, *m.tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout_s)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = -1, f"timed out after {timeout_s:.0f} s"
    finally:
        target.write_text(original)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR", "E ")) or "timed out" in ln]
    detail = " | ".join(lines[:3])[:300]
    if rc == 0:
        return Result(m, "survived", seconds, "")
    if rc == 5:
        return Result(m, "error", seconds, "no tests selected")
    if "ShaderCompileError" in out or "PrepassError" in out:
        return Result(m, "killed (does not compile)", seconds, detail)
    return Result(m, "killed", seconds, detail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ci", action="store_true", help="only the CI subset")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these mutants")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--keep", action="store_true", help="keep the repository copy (its path is printed)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant before it counts as killed")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if (not a.ci or m.ci) and (not a.only or m.name in a.only)]
    if a.list:
        for m in chosen:
            print(f"{m.name:<46} {'control ' if m.control else ''}{'ci ' if m.ci else ''}{m.path}: {m.why}")
        return 0
    if not chosen:
        print("no mutant selected", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tmf-mutate-"))
    copy = work / "repo"
    _copy_repo(copy)
    print(f"{len(chosen)} mutants ({sum(m.control for m in chosen)} controls) on a copy in {copy}", flush=True)
    results = []
    t0 = time.perf_counter()
    try:
        for m in chosen:
            r = run_mutant(m, copy, a.timeout)
            ok = (r.outcome == "survived") == m.control and r.outcome != "error"
            print(f"{'ok  ' if ok else 'BAD '} {r.outcome:<26} {r.seconds:6.1f} s  {m.name}  {r.detail}", flush=True)
            results.append(r)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    mutants = [r for r in results if not r.mutant.control]
    controls = [r for r in results if r.mutant.control]
    killed = [r for r in mutants if r.outcome.startswith("killed")]
    survivors = [r.mutant.name for r in mutants if not r.outcome.startswith("killed")]
    broken_controls = [r.mutant.name for r in controls if r.outcome != "survived"]
    score = 100.0 * len(killed) / max(len(mutants), 1)
    print(
        f"mutation score {score:.0f} % ({len(killed)}/{len(mutants)} killed, "
        f"{sum(r.outcome.endswith('compile)') for r in killed)} by the compiler); "
        f"controls {len(controls) - len(broken_controls)}/{len(controls)} passed; {time.perf_counter() - t0:.0f} s"
    )
    if survivors:
        print("survivors (not caught by any test): " + ", ".join(survivors))
    if broken_controls:
        print("controls that failed (tests too strict, or flaky): " + ", ".join(broken_controls))
    return 0 if not survivors and not broken_controls else 1


if __name__ == "__main__":
    sys.exit(main())
