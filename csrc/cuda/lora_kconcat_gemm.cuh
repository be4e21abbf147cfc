// One K-concatenated GEMM of the LoRA op's route on a CUTLASS configuration of cutlass_kconcat.cuh, run on the
// current stream; instantiated once per configuration, each in its own translation unit
// (lora_kconcat_cooperative.cu, lora_kconcat_pingpong.cu) so that the build compiles them in parallel.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cutlass_kconcat.cuh"
#include "row_launch.h"
#include "tmf/launch/lora_linear.h"

namespace tmf::cuda::kconcat {

// The launch rule (launch::lora_kconcat_tiles, launch::kLoraKConcatTileK) counts G's tiles and G's K tile bounds the
// rank.
template <class G, uint64_t kTileN>
constexpr bool tiles_match_launch_rule() {
  using Tile = typename G::Mainloop::TileShape;
  return int(cute::size<0>(Tile{})) == int(launch::kLoraKConcatTileM) && int(cute::size<1>(Tile{})) == int(kTileN) &&
         G::kTileK == int(launch::kLoraKConcatTileK);
}

// D [m, n] = [A | A2]·op([B | B2]) with k columns in the first pair and k2 (<= the tile's K) in the second, on a's
// device and its current stream. kSwizzleAlongN: the tile scheduler's swizzle where it rasters along N (where there
// are no more tiles along N than along M; along M it keeps CUTLASS's default, 1).
template <class G, int kSwizzleAlongN>
at::Tensor run_kconcat_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2, int m,
                            int n, int k, int k2, const at::Tensor* bias) {
  using T = typename G::T;
  const c10::cuda::CUDAGuard guard(a.device());  // the kernel attribute and the launch go to the current device
  at::Tensor d = at::empty({m, n}, a.options());
  if (m == 0 || n == 0) return d;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = a.get_device();
  hw.sm_count = tmf::sm_count(a);
  typename G::KConcat::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k + G::kTileK, 1},
      {reinterpret_cast<const T*>(a.data_ptr()), cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, k, 1}),
       reinterpret_cast<const T*>(b.data_ptr()), cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k, 1}),
       reinterpret_cast<const T*>(a2.data_ptr()), cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, k2, 1}),
       reinterpret_cast<const T*>(b2.data_ptr()), cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k2, 1}),
       k2},
      {{1.f, 0.f}, nullptr, {}, reinterpret_cast<T*>(d.data_ptr()),
       cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, n, 1})},
      hw};
  const bool along_n = launch::ceil_div(uint64_t(n), uint64_t(launch::kLoraKConcatPingpongTileN)) <=
                       launch::ceil_div(uint64_t(m), uint64_t(launch::kLoraKConcatTileM));
  args.scheduler.max_swizzle_size = along_n ? kSwizzleAlongN : 1;
  if (bias != nullptr) args.epilogue.thread.bias_ptr = reinterpret_cast<const T*>(bias->data_ptr());
  typename G::KConcat gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
              "lora_linear (K-concatenated GEMM): CUTLASS cannot run ", m, "x", n, "x", k, " + ", k2);
  const size_t workspace_bytes = G::KConcat::get_workspace_size(args);
  at::Tensor workspace = at::empty({int64_t(workspace_bytes)}, a.options().dtype(at::kByte));
  auto stream = c10::cuda::getCurrentCUDAStream(hw.device_id).stream();
  cutlass::Status status = gemm.initialize(args, workspace_bytes ? workspace.data_ptr() : nullptr, stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "lora_linear (K-concatenated GEMM): ",
              cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "lora_linear (K-concatenated GEMM): ",
              cutlassGetStatusString(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

}  // namespace tmf::cuda::kconcat

// Defines tmf::cuda::kconcat_gemm_<NAME> (lora_kconcat.h) on configuration CONFIG of cutlass_kconcat.cuh, whose tiles
// have TILE_N columns in the launch rule, its scheduler swizzled by SWIZZLE_ALONG_N where it runs along N: the whole
// of each configuration's translation unit.
#define TMF_KCONCAT_GEMM_DEFINE(NAME, CONFIG, TILE_N, SWIZZLE_ALONG_N)                                              \
  namespace tmf::cuda {                                                                                             \
  static_assert(kconcat::tiles_match_launch_rule<kconcat::CONFIG::Fwd, launch::TILE_N>() &&                         \
                    kconcat::tiles_match_launch_rule<kconcat::CONFIG::Bwd, launch::TILE_N>(),                       \
                "the launch rule (tmf/launch/lora_linear.h) counts other tiles than " #CONFIG "'s");                \
  at::Tensor kconcat_gemm_##NAME(bool forward, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2,      \
                                 const at::Tensor& b2, int m, int n, int k, int k2, const at::Tensor* bias) {       \
    using Fwd = kconcat::CONFIG::Fwd;                                                                               \
    using Bwd = kconcat::CONFIG::Bwd;                                                                               \
    return forward ? kconcat::run_kconcat_gemm<Fwd, SWIZZLE_ALONG_N>(a, b, a2, b2, m, n, k, k2, bias)               \
                   : kconcat::run_kconcat_gemm<Bwd, SWIZZLE_ALONG_N>(a, b, a2, b2, m, n, k, k2, bias);              \
  }                                                                                                                 \
  }
