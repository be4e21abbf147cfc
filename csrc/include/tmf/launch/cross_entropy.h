// Launch code for shaders/cross_entropy.metal, shared by the MPS dispatch and the Metal-on-CPU harness.
#pragma once

#include "tmf/launch/common.h"

namespace tmf::launch {

// The loss of each row of `logits` (rows x vocab, rows `row_stride` elements apart) against `target` (int32 per
// row) into `loss` (float32 per row), and, when `row_scale` (float32 per row) is given, row_scale · d(loss)/d(logits)
// into `grad` (contiguous rows; may be the logits buffer itself). One threadgroup per row, one dispatch.
template <class Encoder>
void cross_entropy_rows(Encoder& enc, DType t, const DeviceBuffer& logits, uint64_t row_stride,
                        const DeviceBuffer& target, const DeviceBuffer& row_scale, const DeviceBuffer& loss,
                        const DeviceBuffer& grad, uint64_t rows, uint64_t vocab, int64_t ignore_index,
                        float label_smoothing, float softcap) {
  if (rows == 0) return;
  check_u32(rows, "rows"), check_u32(vocab, "vocabulary size"), check_u32(row_stride, "row stride");
  if (vocab == 0) throw std::invalid_argument("cross-entropy over an empty vocabulary");
  if (ignore_index < INT32_MIN || ignore_index > INT32_MAX) {
    throw std::invalid_argument("ignore_index must fit in 32 bits for the kernels");
  }
  const bool want_grad = row_scale.handle != nullptr;
  const Pipeline pipeline = select_pipeline(enc, kernel_name("cross_entropy_rows", "looped", t));
  // Long rows: as many threads as the pipeline allows, but no more than the row has 32-element chunks.
  const uint32_t threads =
      std::min<uint32_t>({1024, round_down(pipeline.max_threads, kSimdWidth), round_up(uint32_t(vocab), kSimdWidth)});
  const CrossEntropyParams p{uint32_t(rows),     uint32_t(vocab), uint32_t(row_stride), int(ignore_index),
                             label_smoothing, softcap,         want_grad ? 1u : 0u};
  enc.set_pipeline(pipeline);
  enc.set_buffer(0, logits);
  enc.set_buffer(1, target);
  enc.set_buffer(2, want_grad ? row_scale : loss);  // unread without a gradient; Metal wants every index bound
  enc.set_buffer(3, loss);
  enc.set_buffer(4, want_grad ? grad : logits);     // unwritten without a gradient
  enc.set_bytes(5, &p, sizeof(p));
  enc.dispatch_threadgroups(Size3{uint32_t(rows), 1, 1}, Size3{threads, 1, 1});
}

}  // namespace tmf::launch
