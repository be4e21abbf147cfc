// The RMSNorm launchers of csrc/cuda/ops.cu with add_rms_norm's extra operand, shared with csrc/cuda/add_rms_norm.cu.
#pragma once

#include "ops.h"

namespace tmf {

// residual/h: both null (RMSNorm), or add_rms_norm's residual and h = x + residual (x's shape, contiguous, written).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_launch(const at::Tensor& x, const OptTensor& weight, double eps,
                                                           double offset, const at::Tensor* residual, at::Tensor* h);
// dh: null (RMSNorm), or add_rms_norm's incoming gradient of h, added to dx in the dx kernel (needs_dx).
std::tuple<OptTensor, OptTensor> rms_norm_backward_launch(const at::Tensor& dy, const at::Tensor& x,
                                                          const OptTensor& weight, const at::Tensor& rstd,
                                                          bool needs_dx, bool needs_dw, double offset,
                                                          const at::Tensor* dh);

}  // namespace tmf
