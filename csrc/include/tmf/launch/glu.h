// Launch code for shaders/glu.metal (SwiGLU / GeGLU forward and backward), shared by the MPS dispatch and the
// Metal-on-CPU harness.
#pragma once

#include "tmf/launch/common.h"

namespace tmf::launch {

// Threads per threadgroup of the elementwise GLU kernels: no reduction or threadgroup memory ties a group's size to
// the row, so this only sets how many groups the GPU's cores share (256 · 4 = 1024 elements per group: an
// 8192 x 11008 MLP activation is ~88 000 groups; the tail group of a row idles the rest of its threads).
constexpr uint32_t kGluThreadsPerGroup = 256;

inline const char* glu_variant(uint32_t activation) {
  if (activation == kGluSilu) return "silu";
  if (activation == kGluGeluTanh) return "gelu_tanh";
  throw std::invalid_argument("unknown GLU activation code " + std::to_string(activation));
}

struct GluPlan {
  Pipeline pipeline;
  Size3 groups, threads;
  GluParams params{};
};

// rows x cols elements, each operand with its own row stride (elements). Operands laid out as one contiguous
// block (every row stride == cols) are launched as a single flat row, so short rows waste no threads.
template <class Encoder>
GluPlan plan_glu(Encoder& enc, const char* base, uint32_t activation, DType t, uint64_t rows, uint64_t cols,
                 std::initializer_list<uint64_t> row_strides) {
  bool flat = rows > 1 && rows * cols <= UINT32_MAX;
  for (uint64_t s : row_strides) flat = flat && s == cols;
  if (flat) cols *= rows, rows = 1;
  check_u32(rows, "rows"), check_u32(cols, "row length");
  for (uint64_t s : row_strides) check_u32(s, "row stride");
  GluPlan plan;
  plan.pipeline = select_pipeline(enc, kernel_name(base, glu_variant(activation), t));
  const uint32_t needed = round_up(ceil_div(cols, kGluElementsPerThread), kSimdWidth);
  plan.threads.x = std::min({needed, kGluThreadsPerGroup, round_down(plan.pipeline.max_threads, kSimdWidth)});
  const uint32_t groups_per_row = ceil_div(cols, uint64_t(plan.threads.x) * kGluElementsPerThread);
  check_u32(rows * groups_per_row, "threadgroups (rows x groups per row)");
  plan.groups.x = uint32_t(rows * groups_per_row);
  auto stride = row_strides.begin();
  plan.params = GluParams{uint32_t(rows), uint32_t(cols), groups_per_row, uint32_t(flat ? cols : stride[0]),
                          uint32_t(flat ? cols : stride[1]), uint32_t(flat || row_strides.size() < 3 ? cols : stride[2])};
  return plan;
}

// out = act(gate) · up; out contiguous. One dispatch.
template <class Encoder>
void glu_forward(Encoder& enc, DType t, uint32_t activation, const DeviceBuffer& gate, uint64_t gate_row_stride,
                 const DeviceBuffer& up, uint64_t up_row_stride, const DeviceBuffer& out, uint64_t rows,
                 uint64_t cols) {
  if (rows == 0 || cols == 0) return;
  const GluPlan plan = plan_glu(enc, "glu_forward", activation, t, rows, cols, {gate_row_stride, up_row_stride});
  enc.set_pipeline(plan.pipeline);
  enc.set_buffer(0, gate);
  enc.set_buffer(1, up);
  enc.set_buffer(2, out);
  enc.set_bytes(3, &plan.params, sizeof(plan.params));
  enc.dispatch_threadgroups(plan.groups, plan.threads);
}

// dgate = dout · up · act'(gate), dup = dout · act(gate); dgate and dup contiguous. One dispatch.
template <class Encoder>
void glu_backward(Encoder& enc, DType t, uint32_t activation, const DeviceBuffer& gate, uint64_t gate_row_stride,
                  const DeviceBuffer& up, uint64_t up_row_stride, const DeviceBuffer& dout, uint64_t dout_row_stride,
                  const DeviceBuffer& dgate, const DeviceBuffer& dup, uint64_t rows, uint64_t cols) {
  if (rows == 0 || cols == 0) return;
  const GluPlan plan = plan_glu(enc, "glu_backward", activation, t, rows, cols,
                                {gate_row_stride, up_row_stride, dout_row_stride});
  enc.set_pipeline(plan.pipeline);
  enc.set_buffer(0, gate);
  enc.set_buffer(1, up);
  enc.set_buffer(2, dout);
  enc.set_buffer(3, dgate);
  enc.set_buffer(4, dup);
  enc.set_bytes(5, &plan.params, sizeof(plan.params));
  enc.dispatch_threadgroups(plan.groups, plan.threads);
}

}  // namespace tmf::launch
