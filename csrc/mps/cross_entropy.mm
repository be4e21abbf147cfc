// The cross-entropy row pass on MPS tensors: shaders/cross_entropy.metal through the shared launch code
// (tmf/launch/cross_entropy.h).
#include "mps_encoder.h"
#include "ops.h"
#include "tmf/launch/cross_entropy.h"

namespace tmf {

std::tuple<at::Tensor, OptTensor> cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing, double softcap,
                                                     const OptTensor& row_scale, bool in_place) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor loss;
  OptTensor grad;
  std::tie(loss, grad) = cross_entropy_outputs(logits, row_scale, in_place);  // the lambda below captures them
  if (rows == 0) return {loss, grad};
  at::Tensor l2 = as_rows(logits), t = target.to(at::kInt).contiguous();
  at::Tensor scale = row_scale ? row_scale->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor g = grad ? *grad : at::Tensor();
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::cross_entropy_rows(enc, mps::dtype_of(logits), mps::buffer_of(l2), row_stride(l2), mps::buffer_of(t),
                               mps::buffer_of(scale), mps::buffer_of(loss), mps::buffer_of(g), rows, vocab,
                               ignore_index, float(label_smoothing), float(softcap));
  });
  return {loss, grad};
}

}  // namespace tmf
