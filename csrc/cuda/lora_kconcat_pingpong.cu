// The LoRA op's K-concatenated GEMM on CUTLASS's ping-pong configuration (pingpong_128x128_c2x1 in cutlass_kconcat.cuh),
// which runs its wide outputs (launch::lora_kconcat_gemm_for). Empty without CUTLASS.
#ifdef TMF_WITH_CUTLASS
#include "lora_kconcat.h"
#include "lora_kconcat_gemm.cuh"

TMF_KCONCAT_GEMM_DEFINE(pingpong_128x128, pingpong_128x128_c2x1, kLoraKConcatPingpongTileN)
#endif
