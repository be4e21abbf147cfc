// The LoRA op's K-concatenated GEMM on CUTLASS's ping-pong configuration (pingpong_128x128_c2x1 in cutlass_kconcat.cuh),
// which runs its wide outputs (launch::lora_kconcat_gemm_for). Empty without CUTLASS.
#ifdef TMF_WITH_CUTLASS
#include "lora_kconcat.h"
#include "lora_kconcat_gemm.cuh"

namespace tmf::cuda {

namespace config = kconcat::pingpong_128x128_c2x1;
static_assert(kconcat::tiles_match_launch_rule<config::Fwd, launch::kLoraKConcatPingpongTileN>() &&
                  kconcat::tiles_match_launch_rule<config::Bwd, launch::kLoraKConcatPingpongTileN>(),
              "the launch rule (tmf/launch/lora_linear.h) counts other tiles than this configuration's");

at::Tensor kconcat_gemm_pingpong_128x128(bool forward, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2,
                                         const at::Tensor& b2, int m, int n, int k, int k2, const at::Tensor* bias) {
  return forward ? kconcat::run_kconcat_gemm<config::Fwd>(a, b, a2, b2, m, n, k, k2, bias)
                 : kconcat::run_kconcat_gemm<config::Bwd>(a, b, a2, b2, m, n, k, k2, bias);
}

}  // namespace tmf::cuda
#endif
