// What csrc/cuda/ops.cu shares with the other CUDA sources: the RMSNorm launchers with add_rms_norm's extra operand
// (csrc/cuda/add_rms_norm.cu) and two host helpers (csrc/cuda/lora_linear.cu).
#pragma once

#include "ops.h"

namespace tmf {

// Whether t's base and its rows (row_stride_elems elements apart) start on 16 bytes: 16-byte vector access is legal.
bool aligned16(const at::Tensor& t, int64_t row_stride_elems);
// The number of SMs of t's device.
int sm_count(const at::Tensor& t);

// residual/h: both null (RMSNorm), or add_rms_norm's residual and h = x + residual (x's shape, contiguous, written).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_launch(const at::Tensor& x, const OptTensor& weight, double eps,
                                                           double offset, const at::Tensor* residual, at::Tensor* h);
// dh: null (RMSNorm), or add_rms_norm's incoming gradient of h, added to dx in the dx kernel (needs_dx).
std::tuple<OptTensor, OptTensor> rms_norm_backward_launch(const at::Tensor& dy, const at::Tensor& x,
                                                          const OptTensor& weight, const at::Tensor& rstd,
                                                          bool needs_dx, bool needs_dw, double offset,
                                                          const at::Tensor* dh);

}  // namespace tmf
