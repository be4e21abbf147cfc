// The kernel entry points the compiled CUDA backend (csrc/cuda/ops.cu) provides, with the signatures of
// torch_metal_fused/reference.py and torch_metal_fused/backends/metal.py.
#pragma once

#include <torch/extension.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace tmf {

using OptTensor = std::optional<at::Tensor>;

at::Tensor softmax_forward(const at::Tensor& x);
at::Tensor softmax_backward(const at::Tensor& y, const at::Tensor& dy);
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const OptTensor& weight, double eps,
                                                    double offset);
std::tuple<OptTensor, OptTensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight,
                                                   const at::Tensor& rstd, bool needs_dx, bool needs_dw,
                                                   double offset);
// add_rms_norm: (y, h, rstd) with h = x + residual; backward (dx, dw), dx = RMSNorm's dx + dh (CUDA:
// csrc/cuda/add_rms_norm.cu composes the add with the RMSNorm kernels).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_add_forward(const at::Tensor& x, const at::Tensor& residual,
                                                                    const at::Tensor& weight, double eps,
                                                                    double offset);
std::tuple<at::Tensor, OptTensor> rms_norm_add_backward(const at::Tensor& dy, const at::Tensor& dh, const at::Tensor& h,
                                                        const at::Tensor& weight, const at::Tensor& rstd,
                                                        bool needs_dw, double offset);
std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                const OptTensor& dropout_mask);
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> lora_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& h, double scale, const OptTensor& dropout_mask,
    std::array<bool, 5> needs);

// The cross-entropy row pass (CUDA: csrc/cuda/ops.cu).
std::tuple<at::Tensor, OptTensor> cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing, double softcap,
                                                     const OptTensor& row_scale, bool in_place);

// SwiGLU / GeGLU: activation tmf::kGluSilu or tmf::kGluGeluTanh (CUDA: csrc/cuda/glu.cu).
at::Tensor glu_forward(const at::Tensor& gate, const at::Tensor& up, int64_t activation);
// in_place: the gradients are written over gate and up (both contiguous; torch_metal_fused/ops/glu.py decides when
// nothing else reads them) and returned.
std::tuple<at::Tensor, at::Tensor> glu_backward(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                                int64_t activation, bool in_place);

// Rotary embedding of q and k (batch, heads, seq, head_dim), cos/sin contiguous (1 or batch, seq, rotary_dim);
// outputs contiguous (CUDA: csrc/cuda/rope.cu).
std::tuple<at::Tensor, at::Tensor> rope_apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, bool interleaved, bool backward);

// Helpers shared by the backends' host code.
inline at::Tensor as_rows(const at::Tensor& t) {
  // A (rows, cols) view with a unit inner stride, copying only when no such view exists.
  at::Tensor t2 = t.dim() == 2 ? t : t.reshape({-1, t.size(-1)});
  if (t2.size(1) > 1 && t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}
// A rotary operand (batch, heads, seq, head_dim) with head_dim contiguous, copying only when it is not.
inline at::Tensor rope_operand(const at::Tensor& t) {
  return t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t;
}
inline int64_t row_stride(const at::Tensor& t2) { return t2.size(0) > 1 ? t2.stride(0) : t2.size(1); }

// RMSNorm forward outputs: y like x (contiguous) and a float32 rstd per row. Rows of length 0 have no kernel
// work; their rstd is rsqrt(0 + eps), as the reference computes it.
inline std::tuple<at::Tensor, at::Tensor> rms_norm_outputs(const at::Tensor& x, double eps) {
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (x.size(-1) == 0) rstd.fill_(eps > 0 ? 1.0 / std::sqrt(eps) : std::numeric_limits<double>::infinity());
  return {y, rstd};
}

// Cross-entropy row pass outputs: a float32 loss per row and, with row_scale, the gradient (written over the
// logits when in_place, which needs them contiguous).
inline std::tuple<at::Tensor, OptTensor> cross_entropy_outputs(const at::Tensor& logits, const OptTensor& row_scale,
                                                               bool in_place) {
  TORCH_CHECK(!in_place || logits.is_contiguous(), "torch_metal_fused: in-place cross-entropy needs contiguous logits");
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  OptTensor grad;
  if (row_scale) grad = in_place ? logits : at::empty(logits.sizes(), logits.options());
  return {loss, grad};
}

}  // namespace tmf
