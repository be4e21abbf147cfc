// The LoRA op's K-concatenated GEMM on CUTLASS's cooperative configuration (coop_128x256_c2x1 in cutlass_kconcat.cuh),
// which runs its tall outputs (launch::lora_kconcat_gemm_for). Empty without CUTLASS. CUTLASS's default swizzle (1):
// the only setting it was measured at.
#ifdef TMF_WITH_CUTLASS
#include "lora_kconcat.h"
#include "lora_kconcat_gemm.cuh"

TMF_KCONCAT_GEMM_DEFINE(cooperative_128x256, coop_128x256_c2x1, kLoraKConcatCoopTileN, 1)
#endif
