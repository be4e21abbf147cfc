// The CUDA backend's LoRA linear (csrc/ops.h: lora_forward, lora_backward), moved out of ops.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "lora_kernels.cuh"

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

using cuda::ExpandAddend;

bool use_merged_weight(int64_t tokens, int64_t in_features, const OptTensor& dropout_mask) {
  return launch::lora_use_merged_weight(tokens, in_features, dropout_mask.has_value());
}

// ---- the tensor-core kernels (csrc/cuda/lora_kernels.cuh) -------------------------------------------------------
// Half precision, ranks 8/16/32/64, in and out features multiples of 8 (16-byte vectors), big operands with 16-byte
// rows; anything else takes cuBLAS.
bool tensor_core_ok(const at::Tensor& x, int64_t rank, int64_t in_features, int64_t out_features) {
  return (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) && cuda::lora_tensor_core_rank(rank) &&
         in_features % 8 == 0 && out_features % 8 == 0;
}

bool rows16(const at::Tensor& t) {
  return t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && row_stride(t) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// A rank-sized operand as the kernels read it (contiguous, 16-byte aligned): a copy only when it is not.
at::Tensor packed(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

template <typename F>
void dispatch_half(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    f(__half{});
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

int sms(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()));
  return count;
}

// scale · x·lᵀ (l: rank x k), one pass over x (rows16).
at::Tensor reduce(const at::Tensor& x, const at::Tensor& l, double scale) {
  at::Tensor out = at::empty({x.size(0), l.size(0)}, x.options());
  if (x.size(0) == 0) return out;
  const at::Tensor lp = packed(l);
  dispatch_half(x, [&](auto zero) {
    using T = decltype(zero);
    cuda::launch_lora_reduce<T>(ptr<T>(x), row_stride(x), ptr<T>(lp), ptr<T>(out), x.size(0), x.size(1), lp.size(0),
                                float(scale), sms(x), c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out (p x q, rows16) = addend + scale · lm·rtᵀ (lm: p x rank, rt: q x rank); addend: none, a q-vector, or a p x q
// matrix (rows16), by `add`.
void expand(const at::Tensor& lm, const at::Tensor& rt, ExpandAddend add, const at::Tensor* addend, at::Tensor& out,
            double scale) {
  if (out.numel() == 0) return;
  const at::Tensor lp = packed(lm), rp = packed(rt);
  const at::Tensor c = add == ExpandAddend::kRow ? packed(*addend) : add == ExpandAddend::kMatrix ? *addend : out;
  dispatch_half(out, [&](auto zero) {
    using T = decltype(zero);
    cuda::launch_lora_expand<T>(ptr<T>(lp), ptr<T>(rp), add, ptr<T>(c), row_stride(c), ptr<T>(out), row_stride(out),
                                out.size(0), out.size(1), lp.size(1), float(scale), sms(out),
                                c10::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// W' = W + s·B·A, in W's dtype (rounded once).
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                         bool tc) {
  if (!tc || !rows16(weight)) return at::addmm(weight, lora_b, lora_a, 1.0, scale);
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  expand(lora_b, lora_a.t(), ExpandAddend::kMatrix, &weight, out, scale);
  return out;
}

// The accumulate route's y: bias + scale·h·Bᵀ written (no read of y), then y += x·Wᵀ on the base GEMM (beta = 1).
at::Tensor accumulate_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                              const at::Tensor& h, const at::Tensor& lora_b, double scale, bool tc) {
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (tc) {
    expand(h, lora_b, bias ? ExpandAddend::kRow : ExpandAddend::kNone, bias ? &*bias : nullptr, y, scale);
  } else if (bias) {
    at::addmm_out(y, *bias, h, lora_b.t(), 1.0, scale);
  } else {
    y.addmm_(h, lora_b.t(), 0.0, scale);  // beta = 0: the uninitialised buffer is never read
  }
  return y.addmm_(x, weight.t());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                const OptTensor& dropout_mask) {
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_lora = dropout_mask ? x * *dropout_mask : x;
  const bool tc = tensor_core_ok(x, lora_a.size(0), x.size(1), weight.size(0));
  at::Tensor h = tc && rows16(x_lora) ? reduce(x_lora, lora_a, 1.0) : at::mm(x_lora, lora_a.t());
  if (x.scalar_type() != at::kFloat) {
    if (tc && use_merged_weight(x.size(0), x.size(1), dropout_mask)) {
      return {at::linear(x, merged_weight(weight, lora_a, lora_b, scale, tc), bias), h};
    }
    return {accumulate_forward(x, weight, bias, h, lora_b, scale, tc), h};
  }
  if (use_merged_weight(x.size(0), x.size(1), dropout_mask)) {
    return {at::linear(x, merged_weight(weight, lora_a, lora_b, scale, false), bias), h};
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
  const bool tc = tensor_core_ok(x, lora_a.size(0), x.size(1), weight.size(0));
  OptTensor dx, dw, dbias, da, dlb;
  if (needs_dx || needs_da) {
    at::Tensor dh = tc && rows16(dy2) ? reduce(dy2, lora_b.t(), scale) : at::mm(dy2, lora_b).mul_(scale);
    if (needs_dx) {
      if (use_merged_weight(x.size(0), x.size(1), dropout_mask)) {
        dx = at::mm(dy2, merged_weight(weight, lora_a, lora_b, scale, tc));
      } else {
        at::Tensor lora_dx = at::empty({dy2.size(0), lora_a.size(1)}, dy2.options());
        if (tc) {
          expand(dh, lora_a.t(), ExpandAddend::kNone, nullptr, lora_dx, 1.0);
        } else {
          at::mm_out(lora_dx, dh, lora_a);
        }
        if (dropout_mask) lora_dx.mul_(*dropout_mask);
        dx = lora_dx.addmm_(dy2, weight);  // in place: cuBLAS reads lora_dx as C (beta = 1), no copy of it
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
