// add_rms_norm on CUDA tensors (csrc/ops.h), fused as the Metal kernels (shaders/rms_norm.metal, add variants):
// forward, one kernel writes h = x + residual (rounded to the dtype as torch's add rounds it) and normalises it in
// the same pass; backward, the dx kernel adds h's incoming gradient dh before rounding dx (dx is the gradient of
// both x and the residual), dw as RMSNorm's. The kernels are RMSNorm's with their ADD parameter
// (csrc/cuda/row_kernels.cuh), launched by RMSNorm's launch code (csrc/cuda/ops.cu).
#include "row_launch.h"

namespace tmf {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_add_forward(const at::Tensor& x, const at::Tensor& residual,
                                                                    const at::Tensor& weight, double eps,
                                                                    double offset) {
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x's shape and dtype");
  at::Tensor h = at::empty(x.sizes(), x.options());  // contiguous
  auto [y, rstd] = rms_norm_forward_launch(x, weight, eps, offset, &residual, &h);
  return {y, h, rstd};
}

std::tuple<at::Tensor, OptTensor> rms_norm_add_backward(const at::Tensor& dy, const at::Tensor& dh, const at::Tensor& h,
                                                        const at::Tensor& weight, const at::Tensor& rstd,
                                                        bool needs_dw, double offset) {
  TORCH_CHECK(dh.sizes() == h.sizes() && dh.scalar_type() == h.scalar_type(),
              "add_rms_norm backward: dh must match h's shape and dtype");
  auto [dx, dw] = rms_norm_backward_launch(dy, h, weight, rstd, true, needs_dw, offset, &dh);
  return {*dx, dw};
}

}  // namespace tmf
