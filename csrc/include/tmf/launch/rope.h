// Launch code for shaders/rope.metal (rotary position embedding of q and k, forward and backward), shared by the MPS
// dispatch and the Metal-on-CPU harness.
#pragma once

#include "tmf/launch/common.h"

namespace tmf::launch {

// Threads per threadgroup: one thread per (batch, position, slot), each walking every head; nothing is shared
// within a group, so the size only spreads the work (an 8 x 4096-token batch with head_dim 128 is 2 M threads).
constexpr uint32_t kRopeThreadsPerGroup = 256;

// A rotated tensor: its buffer, its strides in elements (batch, head, seq; head_dim contiguous), its head count.
struct RopeOperand {
  DeviceBuffer buffer;
  uint64_t batch_stride, head_stride, seq_stride, heads;
};

// q and k (inputs, or the incoming gradients with `backward`) -> q_out and k_out, contiguous (batch, heads, seq,
// head_dim). cos and sin: contiguous (cos_batches, seq, rotary_dim) with cos_batches 1 (shared by the batch) or
// `batch`. One dispatch.
template <class Encoder>
void rope_apply(Encoder& enc, DType t, const RopeOperand& q, const RopeOperand& k, const DeviceBuffer& cos_table,
                const DeviceBuffer& sin_table, uint64_t cos_batches, const DeviceBuffer& q_out,
                const DeviceBuffer& k_out, uint64_t batch, uint64_t seq, uint64_t head_dim, uint64_t rotary_dim,
                bool interleaved, bool backward) {
  if (batch == 0 || seq == 0 || head_dim == 0 || q.heads + k.heads == 0) return;
  if (rotary_dim % 2 != 0 || rotary_dim > head_dim) {
    throw std::invalid_argument("rotary_dim must be even and at most head_dim");
  }
  const uint64_t slots = rotary_dim / 2 + (head_dim - rotary_dim);
  check_u32(batch * seq * slots, "threads (batch x seq x slots)");
  for (uint64_t v : {q.batch_stride, q.head_stride, q.seq_stride, k.batch_stride, k.head_stride, k.seq_stride,
                     q.heads, k.heads, seq * head_dim, seq * rotary_dim}) {
    check_u32(v, "a stride or head count");
  }
  const Pipeline pipeline = select_pipeline(enc, kernel_name("rope", "apply", t));
  const uint64_t total = batch * seq * slots;
  Size3 threads, groups;
  threads.x = std::min({round_up(uint32_t(std::min<uint64_t>(total, kRopeThreadsPerGroup)), kSimdWidth),
                        kRopeThreadsPerGroup, round_down(pipeline.max_threads, kSimdWidth)});
  groups.x = ceil_div(total, threads.x);
  const RopeParams p{uint32_t(batch),          uint32_t(seq),           uint32_t(head_dim),
                     uint32_t(rotary_dim),     uint32_t(q.heads),       uint32_t(k.heads),
                     uint32_t(q.batch_stride), uint32_t(q.head_stride), uint32_t(q.seq_stride),
                     uint32_t(k.batch_stride), uint32_t(k.head_stride), uint32_t(k.seq_stride),
                     uint32_t(cos_batches == 1 ? 0 : seq * rotary_dim),
                     uint32_t(interleaved),    uint32_t(backward)};
  enc.set_pipeline(pipeline);
  enc.set_buffer(0, q.buffer);
  enc.set_buffer(1, k.buffer);
  enc.set_buffer(2, cos_table);
  enc.set_buffer(3, sin_table);
  enc.set_buffer(4, q_out);
  enc.set_buffer(5, k_out);
  enc.set_bytes(6, &p, sizeof(p));
  enc.dispatch_threadgroups(groups, threads);
}

}  // namespace tmf::launch
