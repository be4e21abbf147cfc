// The CUDA backend's LoRA linear (csrc/ops.h: lora_forward, lora_backward), moved out of ops.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "lora_kconcat.h"
#include "lora_kernels.cuh"

#include "ops.h"
#include "row_launch.h"
#include "tmf/launch/lora_linear.h"

namespace tmf {

// ---- LoRA: the products on cuBLAS ----------------------------------------------------------------------------
// Routes. The base GEMM x·Wᵀ dominates, so a route is judged by the bytes it adds around it: the low-rank terms are
// K = r products (bandwidth-bound), and a pass over x, y or W costs about as much as any of them. Six candidates were
// composed side by side (ledger: lora, composition, H200, bfloat16 8192x4096x4096x16 / x64 and 2048x4096x11008x16 /
// x64, variants "route: …"): in half precision the forward takes the accumulate route (below the merged rule's token
// count, see h_in_backward): h = x·Aᵀ, y = bias + s·h·Bᵀ (a K = r product that only writes y), then the base GEMM adds
// x·Wᵀ into y (beta = 1: cuBLAS reads y in its epilogue, which a compute-bound GEMM hides better than a separate
// read-modify-write of y, and no W' pass at all) — "route: lowrank_beta" against "lowrank", "merged", "merged_kernel",
// "fold_cublas", "fold_kernel".
// float32 keeps the rule shared with Metal (tokens > in_features: merged weight, else low-rank add): its GEMMs run
// 16x longer and the routes differ by less than the run-to-run spread there (same rows, float32). The backward keeps
// the shared rule in every dtype (merged W' for many tokens).
// Product by product (ledger: lora, kernel, H200, bfloat16 8192x4096x4096x16, run cuda-h200-2026-12-01-lora-kernels-
// first): cuBLAS is faster than our tensor-core reduce and expand kernels for h, y and dh (ours keep too few bytes in
// flight), but W' = W + s·B·A is faster by lora_expand (one read and one write of W, where cuBLAS copies W first), so
// W' is built by lora_expand and the rest stays on cuBLAS. Running the skinny products on a second, high-priority
// stream a row chunk ahead of the GEMMs was slower at every chunk count: the GEMMs occupy every SM, nothing overlaps
// (run cuda-h200-2026-12-01-lora-pipelined).
// So half precision with many tokens (the merged-weight rule) takes the merged forward without h: y = x·W'ᵀ needs no
// h, and h's one use, dB = s·dyᵀ·h, computes it in the backward from the saved x — a K = r pass moved from the forward
// to the backward, which the forward's target needs and forward+backward does not notice (ledger: lora, op, H200,
// bfloat16 8192x4096x4096x16, run cuda-h200-2026-12-01-lora-8678f1d against -lora-1dacda9).
// Few tokens, ranks 8 and 16: y = bias + s·h·Bᵀ by lora_expand with staged stores (staged_y_ok below).
namespace {

bool use_merged_weight(int64_t tokens, int64_t in_features, const OptTensor& dropout_mask) {
  return launch::lora_use_merged_weight(tokens, in_features, dropout_mask.has_value());
}

// Whether the device is compute capability 9.0 (the K-concatenated GEMM is built for sm_90a only). The runtime
// answers from its cached device properties, as for sm_count at every launch.
bool compute_capability_9_0(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
}

// The K-concatenated route (lora_kconcat.h): y = [x | h]·[W | s·B]ᵀ and dx = [dy | dh]·[W; A] on CUTLASS's Hopper
// GEMM, no W'. Taken by default where its tiles fill the GPU (launch::lora_kconcat_fills_device says where it was
// measured to win through the op and where it lost), for every eligible shape with TORCH_METAL_FUSED_LORA_KCONCAT=1,
// never with =0, and only in a build with CUTLASS. Eligible: bfloat16, no dropout (dx's LoRA part is masked), ranks
// 8-64 in steps of 8, K and N multiples of 8 (the TMA's 16-byte strides), M, N and K under 2^31 (the GEMM takes
// them as int), a compute capability 9.0 device. The forward and the backward both ask this with the same tensors;
// the answer does not depend on dy or the bias.
bool kconcat_route(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                   const OptTensor& dropout_mask) {
  const cuda::KConcatMode mode = cuda::lora_kconcat_mode();
  if (mode == cuda::KConcatMode::never || dropout_mask || x.scalar_type() != at::kBFloat16) return false;
  const int64_t r = lora_a.size(0);
  const bool eligible = r >= 8 && r <= 64 && r % 8 == 0 && x.size(1) % 8 == 0 && weight.size(0) % 8 == 0 &&
                        x.size(0) > 0 && x.size(1) > 0 && weight.size(0) > 0 && cuda::lora_kconcat_sizes_fit(
                            x.size(0), x.size(1), weight.size(0)) &&
                        weight.scalar_type() == at::kBFloat16 && lora_a.scalar_type() == at::kBFloat16 &&
                        compute_capability_9_0(x.device().index());
  return eligible && (mode == cuda::KConcatMode::always ||
                      launch::lora_kconcat_fills_device(x.size(0), x.size(1), weight.size(0), sm_count(x)));
}

// Whether h = x·Aᵀ is computed by the backward instead of the forward (which then returns h filled with NaN, so that
// anything reading it — e.g. another backend's backward after the backend was switched mid-step — shows NaN rather
// than a plausible wrong gradient). The forward and the backward both ask this, with the same x (tokens x in), dtype
// and mask.
bool h_in_backward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                   const OptTensor& dropout_mask) {
  return x.scalar_type() != at::kFloat && use_merged_weight(x.size(0), x.size(1), dropout_mask) &&
         !kconcat_route(x, weight, lora_a, dropout_mask);
}

// The dtypes of the tensor-core kernels (csrc/cuda/lora_kernels.cuh), launched through launch_half.
bool half_precision(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// ---- W' on tensor cores (csrc/cuda/lora_kernels.cuh) ------------------------------------------------------------
// Half precision, ranks 8/16/32/64, in_features a multiple of 8, W with 16-byte rows; anything else takes cuBLAS.
bool expand_ok(const at::Tensor& weight, int64_t rank) {
  return half_precision(weight.scalar_type()) && cuda::lora_tensor_core_rank(rank) && weight.size(1) % 8 == 0 &&
         weight.stride(1) == 1 && aligned16(weight, row_stride(weight));
}

// f(T{}) with T the CUDA type of a half-precision dtype (bfloat16, else float16), then the launch check.
template <typename F>
void launch_half(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    f(__half{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// An operand as the tensor-core kernels and the K-concatenated GEMM's TMA read it (a matrix whose rows are 16-byte
// multiples, or a vector): contiguous and 16-byte aligned, a copy only when it is not.
at::Tensor packed(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c, c.dim() == 2 ? c.size(1) : 0) ? c : c.clone();
}

// W' = W + s·B·A in W's dtype, rounded once (cuBLAS: the same formula after a copy of W; the float32 sums may differ
// in order, so the two can differ by an ulp).
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         double scale) {
  // The Python op checks these; the raw op (torch.ops.torch_metal_fused.lora_linear_backward) must not reach the
  // kernel with operands it would read out of bounds.
  TORCH_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2 && lora_b.size(0) == weight.size(0) &&
                  lora_a.size(1) == weight.size(1) && lora_b.size(1) == lora_a.size(0),
              "lora_linear: lora_a (rank, in) and lora_b (out, rank) must match weight (out, in); got ",
              lora_a.sizes(), ", ", lora_b.sizes(), ", ", weight.sizes());
  TORCH_CHECK(lora_a.scalar_type() == weight.scalar_type() && lora_b.scalar_type() == weight.scalar_type() &&
                  lora_a.device() == weight.device() && lora_b.device() == weight.device(),
              "lora_linear: lora_a and lora_b must have weight's dtype and device");
  if (!expand_ok(weight, lora_a.size(0)) || weight.numel() == 0) {
    return at::addmm(weight, lora_b, lora_a, 1.0, scale);
  }
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  const at::Tensor b = packed(lora_b), a_t = packed(lora_a.t());
  launch_half(weight.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    cuda::launch_lora_expand<T>(ptr<T>(b), ptr<T>(a_t), cuda::ExpandAddend::kMatrix, ptr<T>(weight),
                                row_stride(weight), ptr<T>(out), out.size(1), out.size(0), out.size(1), b.size(1),
                                float(scale), sm_count(weight), c10::cuda::getCurrentCUDAStream());
  });
  return out;
}

// scale·a·b with the scale as cuBLAS's alpha: applied in float32 before the one rounding to the output dtype, no
// second pass over the output (at::mm then mul_ rounded twice and launched a kernel more). beta = 0, so the
// uninitialised output is never read.
// A zero scale keeps mm then mul_: cuBLAS with alpha = 0 reads neither operand, so a NaN in them would not show.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double scale) {
  if (scale == 0.0) return at::mm(a, b).mul_(scale);
  return at::empty({a.size(0), b.size(1)}, a.options()).addmm_(a, b, 0.0, scale);
}

// Whether the accumulate route's first write, y = bias + s·h·Bᵀ, takes lora_expand with staged stores (ranks 8
// and 16, half precision, out_features a multiple of 8, a 16-byte aligned contiguous bias), where it beats cuBLAS
// (lora_kernels.cuh, STAGED_STORES, names the ledger rows).
// Anything else (and operands that do not match, from a raw op call) takes cuBLAS, which also reports the mismatch.
bool staged_y_ok(const at::Tensor& h, const at::Tensor& lora_b, const OptTensor& bias) {
  const auto dtype = h.scalar_type();
  return half_precision(dtype) && cuda::lora_staged_rank(h.size(1)) && h.size(0) > 0 &&
         lora_b.dim() == 2 && lora_b.size(1) == h.size(1) && lora_b.scalar_type() == dtype &&
         lora_b.device() == h.device() && lora_b.size(0) > 0 && lora_b.size(0) % 8 == 0 &&
         (!bias || (bias->dim() == 1 && bias->size(0) == lora_b.size(0) && bias->scalar_type() == dtype &&
                    bias->device() == h.device() && bias->is_contiguous() && aligned16(*bias, 0)));
}

// The accumulate route's y: bias + scale·h·Bᵀ written (y not read before), then y += x·Wᵀ on the base GEMM.
at::Tensor accumulate_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                              const at::Tensor& h, const at::Tensor& lora_b, double scale) {
  at::Tensor y;
  if (staged_y_ok(h, lora_b, bias)) {
    y = at::empty({h.size(0), lora_b.size(0)}, h.options());
    const at::Tensor lm = packed(h), rt = packed(lora_b);
    launch_half(h.scalar_type(), [&](auto zero) {
      using T = decltype(zero);
      cuda::launch_lora_expand_staged<T>(ptr<T>(lm), ptr<T>(rt), bias ? ptr<T>(*bias) : nullptr, ptr<T>(y),
                                         y.size(1), y.size(0), y.size(1), h.size(1), float(scale), sm_count(h),
                                         c10::cuda::getCurrentCUDAStream());
    });
  } else {
    y = bias ? at::addmm(*bias, h, lora_b.t(), 1.0, scale) : scaled_mm(h, lora_b.t(), scale);
  }
  return y.addmm_(x, weight.t());
}

}  // namespace

bool lora_takes_kconcat_route(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a) {
  return kconcat_route(x, weight, lora_a, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                const OptTensor& dropout_mask) {
  c10::cuda::CUDAGuard guard(x.device());
  if (kconcat_route(x, weight, lora_a, dropout_mask)) {
    const at::Tensor xc = packed(x);
    at::Tensor h = at::mm(xc, lora_a.t());
    // The bias in the GEMM's epilogue: a separate pass over y (tokens x out read and written once more) would cost
    // about what the route gains by not building W'.
    const OptTensor bias_ready = bias ? OptTensor(packed(*bias)) : std::nullopt;
    return {cuda::lora_kconcat_forward(xc, packed(weight), h, packed(lora_b * scale), bias_ready), h};
  }
  if (h_in_backward(x, weight, lora_a, dropout_mask)) {
    return {at::linear(x, merged_weight(weight, lora_a, lora_b, scale), bias),
            at::full({x.size(0), lora_a.size(0)}, std::numeric_limits<double>::quiet_NaN(), x.options())};
  }
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
    at::Tensor dh = scaled_mm(dy2, lora_b, scale);
    if (needs_dx && kconcat_route(x, weight, lora_a, dropout_mask)) {
      dx = cuda::lora_kconcat_dx(packed(dy2), packed(weight), packed(dh), packed(lora_a));
    } else if (needs_dx) {
      if (use_merged_weight(x.size(0), x.size(1), dropout_mask)) {
        dx = at::mm(dy2, merged_weight(weight, lora_a, lora_b, scale));
      } else {
        at::Tensor lora_dx = at::mm(dh, lora_a);
        if (dropout_mask) lora_dx.mul_(*dropout_mask);
        dx = lora_dx.addmm_(dy2, weight);  // in place: cuBLAS takes lora_dx as C (beta = 1), no copy of it first
      }
    }
    if (needs_da) da = at::mm(dh.t(), dropout_mask ? x * *dropout_mask : x);
  }
  if (needs_dlb) {
    // h from the forward, or computed here (h_in_backward: the merged route, so no dropout mask)
    dlb = scaled_mm(dy2.t(), h_in_backward(x, weight, lora_a, dropout_mask) ? at::mm(x, lora_a.t()) : h, scale);
  }
  if (needs_dw) dw = at::mm(dy2.t(), x);
  if (needs_db) dbias = dy2.sum(0);
  return {dx, dw, dbias, da, dlb};
}

}  // namespace tmf
