// SwiGLU / GeGLU on MPS tensors: shaders/glu.metal through the shared launch code (tmf/launch/glu.h).
#include "mps_encoder.h"
#include "ops.h"
#include "tmf/launch/glu.h"

namespace tmf {

at::Tensor glu_forward(const at::Tensor& gate, const at::Tensor& up, int64_t activation) {
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return out;
  at::Tensor g2 = as_rows(gate), u2 = as_rows(up);
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::glu_forward(enc, mps::dtype_of(gate), uint32_t(activation), mps::buffer_of(g2), row_stride(g2),
                        mps::buffer_of(u2), row_stride(u2), mps::buffer_of(out), g2.size(0), g2.size(1));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_backward(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                                int64_t activation) {
  at::Tensor dgate = at::empty(gate.sizes(), gate.options()), dup = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return {dgate, dup};
  at::Tensor g2 = as_rows(gate), u2 = as_rows(up), d2 = as_rows(dout);
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::glu_backward(enc, mps::dtype_of(gate), uint32_t(activation), mps::buffer_of(g2), row_stride(g2),
                         mps::buffer_of(u2), row_stride(u2), mps::buffer_of(d2), row_stride(d2), mps::buffer_of(dgate),
                         mps::buffer_of(dup), g2.size(0), g2.size(1));
  });
  return {dgate, dup};
}

}  // namespace tmf
