// The LoRA op's K-concatenated GEMM on CUTLASS's ping-pong configuration (pingpong_128x128_c2x1 in cutlass_kconcat.cuh),
// which runs its wide outputs (launch::lora_kconcat_gemm_for). Empty without CUTLASS. Its scheduler swizzles by 4 where
// it rasters along N, which only a forced tall output does (TORCH_METAL_FUSED_LORA_KCONCAT_GEMM=pingpong): there
// swizzle 4 was the faster, along M (wide outputs) the slower (ledger: lora, op, H200, bfloat16 8192x4096x4096x16 and
// 2048x4096x11008x16, variants "TORCH_METAL_FUSED_LORA_KCONCAT=1, ping-pong GEMM, swizzle 1" and "…, swizzle 4").
#ifdef TMF_WITH_CUTLASS
#include "lora_kconcat.h"
#include "lora_kconcat_gemm.cuh"

TMF_KCONCAT_GEMM_DEFINE(pingpong_128x128, pingpong_128x128_c2x1, kLoraKConcatPingpongTileN, 4)
#endif
