// The CUDA backend's LoRA linear (csrc/ops.h: lora_forward, lora_backward), moved out of ops.cu.
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"
#include "tmf/launch/lora_linear.h"

namespace tmf {

// ---- LoRA: the products on cuBLAS ----------------------------------------------------------------------------
// Routes, from one H200 run of the candidates side by side (benchmarks/cuda_lora_variants.py, results in
// benchmarks/results/cuda-h200-2026-12-01-lora-variants.txt; bf16, median µs, cold L2):
//  forward, 8192x4096->4096 r16 / r64 (base GEMM x·Wᵀ 346 / 348):
//    accumulate (below) 406 / 403; merged weight 415 / 416; low-rank add after the GEMM 423 / 423;
//    [W'; A] folded into one GEMM (y and h from one read of x) 414 / 412; one-pass W' kernel on CUDA cores
//    422 / 540 (its r FMAs per weight make it compute-bound at rank 64).
//  forward, 2048x4096->11008 r16 / r64 (base 245): accumulate 290 / 291; low-rank add 293 / 293; merged 375 / 375.
//  backward (W frozen), 8192 tokens: merged 464 / 462, low-rank 496 / 495, [W' | s·B] folded 485 / 478;
//    2048 tokens: low-rank 298 / 300, merged 396 / 397.
// So in half precision the forward always takes the accumulate route: h = x·Aᵀ, y = bias + s·h·Bᵀ (a K = r
// product that only writes y), then the base GEMM adds x·Wᵀ into y (beta = 1: cuBLAS reads y in its epilogue,
// which a compute-bound GEMM hides better than a separate read-modify-write of y, and no W' pass at all).
// float32 keeps the rule shared with Metal (tokens > in_features: merged weight, else low-rank add): its GEMMs run
// 16x longer, the routes differ by less than the run-to-run spread there, and the accumulate route measured
// 1-8% slower in that run. The backward keeps the shared rule in every dtype (merged W' for many tokens).
namespace {

bool use_merged_weight(int64_t tokens, int64_t in_features, const OptTensor& dropout_mask) {
  return launch::lora_use_merged_weight(tokens, in_features, dropout_mask.has_value());
}

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  return at::addmm(weight, lora_b, lora_a, 1.0, scale);
}

// The accumulate route's y: bias + scale·h·Bᵀ written (no read of y: beta = 0 when there is no bias, so the
// uninitialised buffer is never read), then y += x·Wᵀ on the base GEMM.
at::Tensor accumulate_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                              const at::Tensor& h, const at::Tensor& lora_b, double scale) {
  at::Tensor y;
  if (bias) {
    y = at::addmm(*bias, h, lora_b.t(), 1.0, scale);
  } else {
    y = at::empty({x.size(0), weight.size(0)}, x.options());
    y.addmm_(h, lora_b.t(), 0.0, scale);
  }
  return y.addmm_(x, weight.t());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                const OptTensor& dropout_mask) {
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_lora = dropout_mask ? x * *dropout_mask : x;
  at::Tensor h = at::mm(x_lora, lora_a.t());
  if (x.scalar_type() != at::kFloat) return {accumulate_forward(x, weight, bias, h, lora_b, scale), h};
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
