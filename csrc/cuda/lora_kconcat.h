// The CUDA LoRA op's K-concatenated route (csrc/cuda/lora_kconcat.cu; the GEMM in cutlass_kconcat.cuh, its two
// configurations in lora_kconcat_cooperative.cu and lora_kconcat_pingpong.cu): built only
// with CUTLASS (setup.py: TMF_WITH_CUTLASS, sm_90a); taken by default where its tiles fill the GPU
// (launch::lora_kconcat_fills_device), for every eligible shape with TORCH_METAL_FUSED_LORA_KCONCAT=1, never with =0.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "tmf/launch/lora_linear.h"

namespace tmf::cuda {

// Whether the GEMM was built (CUTLASS's headers and sm_90a: setup.py).
bool lora_kconcat_built();

// How the route is chosen: never (not built, or TORCH_METAL_FUSED_LORA_KCONCAT=0), by size (unset: the default), or
// for every eligible shape (=1: what the tests use, their shapes being small); any other value raises. The environment
// variable is read once, at the first call, so a forward and its backward always agree on the route
// (torch_metal_fused/_config.py declares it).
enum class KConcatMode { never, by_size, always };
KConcatMode lora_kconcat_mode();

// Whether an M x K by K x N product fits the GEMM, which takes its sizes as int.
inline bool lora_kconcat_sizes_fit(int64_t m, int64_t k, int64_t n) {
  constexpr int64_t kMax = 2147483647;
  return m <= kMax && k <= kMax && n <= kMax;
}

// y [M, N] = x [M, K]·W [N, K]ᵀ + h [M, r]·bs [N, r]ᵀ (+ bias [N]) (bs = s·B), bfloat16, in one GEMM (the bias added in
// its epilogue). Every operand contiguous with a 16-byte aligned base, K, N and r multiples of 8, r <= 64, on a
// compute capability 9.0 device. gemm_choice: a configuration (tests, to run both), or none for the one in effect.
at::Tensor lora_kconcat_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& h,
                                const at::Tensor& bs, const std::optional<at::Tensor>& bias,
                                std::optional<launch::LoraKConcatGemm> gemm_choice = std::nullopt);

// dx [M, K] = dy [M, N]·W [N, K] + dh [M, r]·A [r, K], the same preconditions.
at::Tensor lora_kconcat_dx(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dh,
                           const at::Tensor& lora_a,
                           std::optional<launch::LoraKConcatGemm> gemm_choice = std::nullopt);

// The configuration a rows x cols GEMM runs on: launch::lora_kconcat_gemm_for's, or the one that
// TORCH_METAL_FUSED_LORA_KCONCAT_GEMM (cooperative, pingpong) forces.
launch::LoraKConcatGemm lora_kconcat_gemm_in_effect(int64_t rows, int64_t cols);
// How many K-concatenated GEMMs this process has launched on a configuration (tests: which one the op ran).
uint64_t lora_kconcat_gemm_launches(launch::LoraKConcatGemm gemm);
// Every configuration, for what names or counts them all.
constexpr launch::LoraKConcatGemm kLoraKConcatGemms[] = {launch::LoraKConcatGemm::cooperative_128x256,
                                                         launch::LoraKConcatGemm::pingpong_128x128};
// A configuration's name, as TORCH_METAL_FUSED_LORA_KCONCAT_GEMM and the test bindings spell it.
const char* lora_kconcat_gemm_name(launch::LoraKConcatGemm gemm);
// "cooperative", "pingpong", or "auto"/"" (none: the one in effect); anything else raises.
std::optional<launch::LoraKConcatGemm> lora_kconcat_gemm_named(const std::string& name);

// The two configurations' GEMMs (CUTLASS builds only; launch::lora_kconcat_gemm_for picks one per GEMM): D [m, n] =
// [a | a2]·op([b | b2]) with k columns in the first pair and k2 <= 64 in the second; op(b) = bᵀ (b = W [n, k]) when
// forward, else b (W [k, n]).
at::Tensor kconcat_gemm_cooperative_128x256(bool forward, const at::Tensor& a, const at::Tensor& b,
                                            const at::Tensor& a2, const at::Tensor& b2, int m, int n, int k, int k2,
                                            const at::Tensor* bias);
at::Tensor kconcat_gemm_pingpong_128x128(bool forward, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2,
                                         const at::Tensor& b2, int m, int n, int k, int k2, const at::Tensor* bias);

}  // namespace tmf::cuda

namespace tmf {
// Whether the CUDA LoRA op takes the route for these operands (csrc/cuda/lora_linear.cu: kconcat_route, no dropout).
bool lora_takes_kconcat_route(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a);
}  // namespace tmf
