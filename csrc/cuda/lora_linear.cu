// The CUDA backend's LoRA linear (csrc/ops.h: lora_forward, lora_backward), moved out of ops.cu.
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"
#include "tmf/launch/lora_linear.h"

namespace tmf {

// ---- LoRA: the products on cuBLAS; merged-weight route chosen by tmf::launch::lora_use_merged_weight --------
namespace {

bool use_merged_weight(int64_t tokens, int64_t in_features, const OptTensor& dropout_mask) {
  return launch::lora_use_merged_weight(tokens, in_features, dropout_mask.has_value());
}

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  return at::addmm(weight, lora_b, lora_a, 1.0, scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                const OptTensor& dropout_mask) {
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_lora = dropout_mask ? x * *dropout_mask : x;
  at::Tensor h = at::mm(x_lora, lora_a.t());
  if (use_merged_weight(x.size(0), x.size(1), dropout_mask)) {
    return {at::linear(x, merged_weight(weight, lora_a, lora_b, scale), bias), h};
  }
  at::Tensor y = at::linear(x, weight, bias);
  y.addmm_(h, lora_b.t(), 1.0, scale);
  return {y, h};
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> lora_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& h, double scale, const OptTensor& dropout_mask,
    std::array<bool, 5> needs) {
  c10::cuda::CUDAGuard guard(x.device());
  const auto [needs_dx, needs_dw, needs_db, needs_da, needs_dlb] = needs;
  at::Tensor dy2 = as_rows(dy);
  OptTensor dx, dw, dbias, da, dlb;
  if (needs_dx || needs_da) {
    at::Tensor dh = at::mm(dy2, lora_b).mul_(scale);
    if (needs_dx) {
      if (use_merged_weight(x.size(0), x.size(1), dropout_mask)) {
        dx = at::mm(dy2, merged_weight(weight, lora_a, lora_b, scale));
      } else {
        at::Tensor lora_dx = at::mm(dh, lora_a);
        if (dropout_mask) lora_dx.mul_(*dropout_mask);
        dx = at::addmm(lora_dx, dy2, weight);
      }
    }
    if (needs_da) da = at::mm(dh.t(), dropout_mask ? x * *dropout_mask : x);
  }
  if (needs_dlb) dlb = at::mm(dy2.t(), h).mul_(scale);
  if (needs_dw) dw = at::mm(dy2.t(), x);
  if (needs_db) dbias = dy2.sum(0);
  return {dx, dw, dbias, da, dlb};
}

}  // namespace tmf
