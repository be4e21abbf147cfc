// Softmax on MPS tensors: shaders/softmax.metal through the shared launch code (tmf/launch/softmax.h).
#include "mps_encoder.h"
#include "ops.h"
#include "tmf/launch/softmax.h"

namespace tmf {

at::Tensor softmax_forward(const at::Tensor& x) {
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  at::Tensor x2 = as_rows(x);
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::softmax_forward(enc, mps::dtype_of(x), mps::buffer_of(x2), row_stride(x2), mps::buffer_of(y), x2.size(0),
                            x2.size(1));
  });
  return y;
}

at::Tensor softmax_backward(const at::Tensor& y, const at::Tensor& dy) {
  at::Tensor dx = at::empty(y.sizes(), y.options());
  if (y.numel() == 0) return dx;
  at::Tensor y2 = as_rows(y.contiguous()), dy2 = as_rows(dy);
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::softmax_backward(enc, mps::dtype_of(y), mps::buffer_of(y2), mps::buffer_of(dy2), row_stride(dy2),
                             mps::buffer_of(dx), y2.size(0), y2.size(1));
  });
  return dx;
}

}  // namespace tmf
