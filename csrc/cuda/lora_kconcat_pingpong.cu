// The LoRA op's K-concatenated GEMM on CUTLASS's ping-pong configuration (pingpong_128x128_c2x1 in cutlass_kconcat.cuh),
// which runs its wide outputs (launch::lora_kconcat_gemm_for). Empty without CUTLASS. Its scheduler swizzles by 4 where
// it rasters along N, which only a forced tall output does (TORCH_METAL_FUSED_LORA_KCONCAT_GEMM=pingpong): at
// 8192x4096->4096 on an H200 swizzle 4 took forward+backward from 1.222x to 1.194-1.204x the base pair, at
// 2048x4096->11008 (along M) it was slower (benchmarks/results/cuda-h200-2026-12-02-lora-op-pingpong-*).
#ifdef TMF_WITH_CUTLASS
#include "lora_kconcat.h"
#include "lora_kconcat_gemm.cuh"

TMF_KCONCAT_GEMM_DEFINE(pingpong_128x128, pingpong_128x128_c2x1, kLoraKConcatPingpongTileN, 4)
#endif
