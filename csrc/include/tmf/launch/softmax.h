// Launch code for shaders/softmax.metal, shared by the MPS dispatch and the Metal-on-CPU harness.
#pragma once

#include "tmf/launch/common.h"

namespace tmf::launch {

// y = softmax(x) over rows of `cols` elements. One dispatch.
template <class Encoder>
void softmax_forward(Encoder& enc, DType t, const DeviceBuffer& x, uint64_t x_row_stride, const DeviceBuffer& y,
                     uint64_t rows, uint64_t cols) {
  if (rows == 0 || cols == 0) return;
  check_u32(rows, "rows"), check_u32(cols, "row length"), check_u32(x_row_stride, "row stride");
  RowPlan plan = plan_rows(enc, "softmax_forward", t, uint32_t(rows), uint32_t(cols));
  RowParams p{uint32_t(rows), uint32_t(cols), uint32_t(x_row_stride), 0, plan.rows_per_group, 0.0f, 0.0f, 0};
  enc.set_pipeline(plan.pipeline);
  enc.set_buffer(0, x);
  enc.set_buffer(1, y);
  enc.set_bytes(2, &p, sizeof(p));
  enc.dispatch_threadgroups(plan.groups, plan.threads);
}

// dx = y * (dy - sum(dy * y)) over rows; y and dx contiguous, dy with its own row stride. One dispatch.
template <class Encoder>
void softmax_backward(Encoder& enc, DType t, const DeviceBuffer& y, const DeviceBuffer& dy, uint64_t dy_row_stride,
                      const DeviceBuffer& dx, uint64_t rows, uint64_t cols) {
  if (rows == 0 || cols == 0) return;
  check_u32(rows, "rows"), check_u32(cols, "row length"), check_u32(dy_row_stride, "row stride");
  RowPlan plan = plan_rows(enc, "softmax_backward", t, uint32_t(rows), uint32_t(cols));
  RowParams p{uint32_t(rows), uint32_t(cols), uint32_t(cols), uint32_t(dy_row_stride), plan.rows_per_group, 0.0f, 0.0f, 0};
  enc.set_pipeline(plan.pipeline);
  enc.set_buffer(0, y);
  enc.set_buffer(1, dy);
  enc.set_buffer(2, dx);
  enc.set_bytes(3, &p, sizeof(p));
  enc.dispatch_threadgroups(plan.groups, plan.threads);
}

}  // namespace tmf::launch
