// Launch code for shaders/rms_norm.metal, shared by the MPS dispatch and the Metal-on-CPU harness.
#pragma once

#include "tmf/launch/common.h"

namespace tmf::launch {

// The backward dx kernel's threadgroups, each writing one float32 row of dw partial sums: kGroupsPerCore per GPU
// core, and at most one per kRowsPerDwPartialRow rows, so writing and re-reading the partial rows (8 B per column
// each) plus the weight re-read per group stay small next to x, dy and dx (<= 10 % of the minimum traffic at 4096
// rows and more, <= 25 % from 1024 rows, with the harness's stand-in core count and with 40 cores).
constexpr uint32_t kRowsPerDwPartialRow = 16;

// y = x * rstd * (w + weight_offset), rstd (float32, one per row) saved for backward. One dispatch.
// `weight` with handle == nullptr means no weight (kernel variant without it reads none).
// With a `residual` (add_rms_norm; needs a weight): the row is h = x + residual (rounded to the dtype), written to `h`
// (contiguous) and normalised in the same pass.
template <class Encoder>
void rms_norm_forward(Encoder& enc, DType t, const DeviceBuffer& x, uint64_t x_row_stride, const DeviceBuffer& weight,
                      const DeviceBuffer& y, const DeviceBuffer& rstd, uint64_t rows, uint64_t cols, float eps,
                      float weight_offset, const DeviceBuffer& residual = {}, uint64_t residual_row_stride = 0,
                      const DeviceBuffer& h = {}) {
  if (rows == 0 || cols == 0) return;  // the caller fills rstd for empty rows
  check_u32(rows, "rows"), check_u32(cols, "row length"), check_u32(x_row_stride, "row stride");
  check_u32(residual_row_stride, "row stride");
  const bool has_weight = weight.handle != nullptr;
  const bool add = residual.handle != nullptr;
  if (add && !has_weight) throw std::invalid_argument("rms_norm_add_forward needs a weight");
  std::string base = add ? "rms_norm_add_forward" : has_weight ? "rms_norm_forward" : "rms_norm_forward_noweight";
  // The weight is kept in registers and read once per row walker (plan_rows: >= 20 rows each).
  RowPlan plan = plan_rows(enc, base.c_str(), t, uint32_t(rows), uint32_t(cols), /*reuses_column_operand=*/true);
  RowParams p{uint32_t(rows),    uint32_t(cols), uint32_t(x_row_stride),         0, plan.rows_per_group,
              eps,               weight_offset,  uint32_t(residual_row_stride)};
  enc.set_pipeline(plan.pipeline);
  enc.set_buffer(0, x);
  enc.set_buffer(1, has_weight ? weight : x);  // unread without weight; Metal wants every index bound
  enc.set_buffer(2, y);
  enc.set_buffer(3, rstd);
  enc.set_bytes(4, &p, sizeof(p));
  enc.set_buffer(5, add ? residual : x);  // unread, and
  enc.set_buffer(6, add ? h : x);         // unwritten, without a residual
  enc.dispatch_threadgroups(plan.groups, plan.threads);
}

// Threadgroups of the backward dx kernel, and so rows of the float32 dw partial-sum buffer the caller allocates
// (see kRowsPerDwPartialRow).
inline uint32_t rms_norm_backward_groups(uint64_t rows, uint32_t gpu_cores) {
  const uint64_t per_cores = uint64_t(kGroupsPerCore) * std::max<uint32_t>(gpu_cores, 1);
  return uint32_t(std::clamp<uint64_t>(rows / kRowsPerDwPartialRow, 1, per_cores));
}

// dx (contiguous) and, if `dw_partial` is given, dw: the dx kernel walks rows group, group + groups, ...
// keeping each thread's dw columns in registers (single_row) and writes one partial row per group;
// rms_norm_backward_dw_reduce then sums the partial rows into dw. Two dispatches with dw, one without.
template <class Encoder>
void rms_norm_backward(Encoder& enc, DType t, const DeviceBuffer& dy, uint64_t dy_row_stride, const DeviceBuffer& x,
                       uint64_t x_row_stride, const DeviceBuffer& weight, const DeviceBuffer& rstd,
                       const DeviceBuffer& dx, const DeviceBuffer& dw_partial, const DeviceBuffer& dw, uint64_t rows,
                       uint64_t cols, float weight_offset, const DeviceBuffer& d_residual = {},
                       uint64_t d_residual_row_stride = 0) {
  if (rows == 0 || cols == 0) return;
  check_u32(rows, "rows"), check_u32(cols, "row length");
  check_u32(x_row_stride, "row stride"), check_u32(dy_row_stride, "row stride");
  const bool has_weight = weight.handle != nullptr;
  const bool wants_dw = dw_partial.handle != nullptr;
  const bool wants_dx = dx.handle != nullptr;
  const bool add = d_residual.handle != nullptr;  // add_rms_norm: dx += the incoming gradient of h
  check_u32(d_residual_row_stride, "row stride");
  if (add && !wants_dx) throw std::invalid_argument("rms_norm_add_backward computes dx");
  const uint32_t groups = rms_norm_backward_groups(rows, enc.gpu_cores());
  RmsNormBackwardParams p{uint32_t(rows), uint32_t(cols), uint32_t(x_row_stride), uint32_t(dy_row_stride), groups,
                          has_weight ? 1u : 0u, weight_offset, uint32_t(d_residual_row_stride)};
  const char* mode = wants_dx ? (wants_dw ? "dx_dw" : "dx") : "dw";
  const std::string kernel = std::string(add ? "rms_norm_add_backward_" : "rms_norm_backward_") + mode;
  // Both pipelines are selected before anything is encoded (see select_pipeline).
  const uint32_t needed = round_up(ceil_div(cols, kReadsPerThread), kSimdWidth);
  Pipeline rows_pipeline = select_pipeline(enc, kernel_name(kernel.c_str(), "single_row", t));
  uint32_t threads = needed;
  if (needed > rows_pipeline.max_threads) {
    rows_pipeline = select_pipeline(enc, kernel_name(kernel.c_str(), "looped", t));
    threads = std::min<uint32_t>(1024, round_down(rows_pipeline.max_threads, kSimdWidth));
  }
  Pipeline reduce_pipeline;
  if (wants_dw) reduce_pipeline = select_pipeline(enc, kernel_name("rms_norm_backward_dw_reduce", "columns", t));
  enc.set_pipeline(rows_pipeline);
  enc.set_buffer(0, dy);
  enc.set_buffer(1, x);
  enc.set_buffer(2, has_weight ? weight : x);
  enc.set_buffer(3, rstd);
  enc.set_buffer(4, wants_dx ? dx : x);
  enc.set_buffer(5, wants_dw ? dw_partial : x);
  enc.set_bytes(6, &p, sizeof(p));
  enc.set_buffer(7, add ? d_residual : dy);  // unread without add
  enc.dispatch_threadgroups(Size3{groups, 1, 1}, Size3{threads, 1, 1});
  if (!wants_dw) return;
  // 32 columns x (threads / 32) slices of partial rows per threadgroup (see the kernel).
  const uint32_t reduce_threads = std::min<uint32_t>(256, round_down(reduce_pipeline.max_threads, kSimdWidth));
  enc.set_pipeline(reduce_pipeline);
  enc.set_buffer(0, dw_partial);
  enc.set_buffer(1, dw);
  enc.set_bytes(2, &p, sizeof(p));
  enc.dispatch_threadgroups(Size3{ceil_div(cols, kDwReduceColumns), 1, 1}, Size3{reduce_threads, 1, 1});
}

}  // namespace tmf::launch
