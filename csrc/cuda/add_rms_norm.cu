// add_rms_norm on CUDA tensors (csrc/ops.h). Not fused here yet: torch's add, then our RMSNorm kernels
// (csrc/cuda/ops.cu), and backward our RMSNorm backward plus torch's add of h's incoming gradient — correct, but
// it moves the residual stream twice more than the Metal kernels (shaders/rms_norm.metal, add variants) do.
#include "ops.h"

namespace tmf {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_add_forward(const at::Tensor& x, const at::Tensor& residual,
                                                                    const at::Tensor& weight, double eps,
                                                                    double offset) {
  at::Tensor h = at::add(x, residual).contiguous();
  auto [y, rstd] = rms_norm_forward(h, weight, eps, offset);
  return {y, h, rstd};
}

std::tuple<at::Tensor, OptTensor> rms_norm_add_backward(const at::Tensor& dy, const at::Tensor& dh, const at::Tensor& h,
                                                        const at::Tensor& weight, const at::Tensor& rstd,
                                                        bool needs_dw, double offset) {
  auto [dx, dw] = rms_norm_backward(dy, h, weight, rstd, true, needs_dw, offset);
  return {dx->add_(dh), dw};
}

}  // namespace tmf
