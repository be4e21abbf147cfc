// Rotary position embedding on MPS tensors: shaders/rope.metal through the shared launch code (tmf/launch/rope.h).
#include "mps_encoder.h"
#include "ops.h"
#include "tmf/launch/rope.h"

namespace tmf {

std::tuple<at::Tensor, at::Tensor> rope_apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, bool interleaved, bool backward) {
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  if (q.numel() + k.numel() == 0) return {q_out, k_out};
  const at::Tensor q4 = rope_operand(q), k4 = rope_operand(k);
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::rope_apply(enc, mps::dtype_of(q),
                       {mps::buffer_of(q4), uint64_t(q4.stride(0)), uint64_t(q4.stride(1)), uint64_t(q4.stride(2)),
                        uint64_t(q4.size(1))},
                       {mps::buffer_of(k4), uint64_t(k4.stride(0)), uint64_t(k4.stride(1)), uint64_t(k4.stride(2)),
                        uint64_t(k4.size(1))},
                       mps::buffer_of(cos), mps::buffer_of(sin), cos.size(0), mps::buffer_of(q_out),
                       mps::buffer_of(k_out), q.size(0), q.size(2), q.size(3), cos.size(2), interleaved, backward);
  });
  return {q_out, k_out};
}

}  // namespace tmf
