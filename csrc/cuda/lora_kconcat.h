// The CUDA LoRA op's K-concatenated route (csrc/cuda/lora_kconcat.cu; the GEMM in cutlass_kconcat.cuh): built only
// with CUTLASS (setup.py: TMF_WITH_CUTLASS, sm_90a), taken only on request (TORCH_METAL_FUSED_LORA_KCONCAT=1) until its
// op-level measurement says where it wins.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace tmf::cuda {

// Whether the GEMM was built (CUTLASS's headers and sm_90a: setup.py).
bool lora_kconcat_built();

// Whether the route was built and requested (the environment variable is read once, at the first call, so a
// forward and its backward always agree on the route).
bool lora_kconcat_enabled();

// y [M, N] = x [M, K]·W [N, K]ᵀ + h [M, r]·bs [N, r]ᵀ (+ bias [N]) (bs = s·B), bfloat16, in one GEMM (the bias added in
// its epilogue). Every operand contiguous with a 16-byte aligned base, K, N and r multiples of 8, r <= 64, on a
// compute capability 9.0 device.
at::Tensor lora_kconcat_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& h,
                                const at::Tensor& bs, const std::optional<at::Tensor>& bias);

// dx [M, K] = dy [M, N]·W [N, K] + dh [M, r]·A [r, K], the same preconditions.
at::Tensor lora_kconcat_dx(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dh,
                           const at::Tensor& lora_a);

}  // namespace tmf::cuda

namespace tmf {
// Whether the CUDA LoRA op takes the route for these operands (csrc/cuda/lora_linear.cu: kconcat_route, no dropout).
bool lora_takes_kconcat_route(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a);
}  // namespace tmf
