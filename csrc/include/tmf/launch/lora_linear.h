// The CUDA LoRA op's launch rules (csrc/cuda/lora_linear.cu, lora_kconcat*.cu), exposed to the harness's C entry
// points so that CI tests them. The Metal kernels' launch plans are in torch_metal_fused/backends/metal.py.
#pragma once

#include "tmf/launch/common.h"

namespace tmf::launch {

constexpr uint64_t kLoraMergedMinTokens = 1024;

// The merged-weight route: W' = W + s·B·A (a K = r product: one read and one write of W), then y = x·W'ᵀ and
// h = x·Aᵀ on the native matmul, and dx = dy·W' in backward (W' recomputed, not saved). It replaces the
// low-rank kernels' read-modify-write of y (tokens x out) with a pass over W (out x in): chosen when
// tokens > in_features (fewer bytes), never for few tokens (launch-bound either way), never with dropout
// (the adapter then sees another input than the base weight). W' is rounded to the weight's dtype once: a
// perturbation of at most half an ulp per weight, the size of the weight's own rounding. All backends use
// this rule.
inline bool lora_use_merged_weight(uint64_t tokens, uint64_t in_features, bool has_dropout) {
  return !has_dropout && tokens >= kLoraMergedMinTokens && tokens > in_features;
}

// The CUDA backend's K-concatenated GEMM (csrc/cuda/lora_kconcat.cu, bfloat16 on CUTLASS's Hopper GEMMs) comes in
// two configurations, chosen per GEMM (y: tokens x out_features, dx: tokens x in_features) by its output's shape:
// - cooperative, 128x256 tiles, where the tokens' 128-row tiles are at least as many as the features' 128-column
//   ones (tall outputs, ties included; both consumer warp groups on one 128x256 tile): through the op it was the
//   faster at 8192x4096->4096 (ledger: lora, op, H200, bfloat16 8192x4096x4096x16
//   and x64, variant "TORCH_METAL_FUSED_LORA_KCONCAT=1 (cooperative GEMM)" against "…, ping-pong GEMM, swizzle 1 / 4"
//   and the control "TORCH_METAL_FUSED_LORA_KCONCAT=0");
// - ping-pong, 128x128 tiles, where the features' tiles are more (wide outputs; each consumer warp group on its own
//   tile, one's epilogue overlapping the other's mainloop): through the op it was the faster at 2048x4096->11008
//   (same rows, 2048x4096x11008x16 and x64).
// Only those two shapes (2:1 tall, 1:2.7 wide) were measured through the op; the split between is an extrapolation.
// The route is taken by default only where each of the two GEMMs has at least one of its own tiles per SM: with fewer
// tiles than SMs part of the GPU idles while the merged-weight route keeps it busy (ledger: lora, op, H200, bfloat16
// 512x512x512x8, variant "…=1 (cooperative GEMM)" against "…=0"). A ping-pong tile keeps one of its two consumer warp
// groups busy, so that threshold lets ping-pong in at half the output area the cooperative one needs; in the GEMM
// benchmark ping-pong won at 1000x1048->1016, 64 tiles of 128x128 (ledger: lora, kernel, H200, bfloat16
// 1000x1048x1016x16, variants "pingpong 128x128 c2x1, …" against "coop 128x256 c2x1, …"), which supports the leniency.
enum class LoraKConcatGemm : uint8_t { cooperative_128x256, pingpong_128x128 };
constexpr uint64_t kLoraKConcatTileM = 128;      // both configurations' tile rows
constexpr uint64_t kLoraKConcatCoopTileN = 256;  // the cooperative configuration's tile columns
constexpr uint64_t kLoraKConcatPingpongTileN = 128;
constexpr uint64_t kLoraKConcatTileK = 64;  // both: the LoRA rank's K tile, so ranks up to 64

inline LoraKConcatGemm lora_kconcat_gemm_for(uint64_t rows, uint64_t cols) {
  return ceil_div(cols, kLoraKConcatPingpongTileN) > ceil_div(rows, kLoraKConcatTileM)
             ? LoraKConcatGemm::pingpong_128x128
             : LoraKConcatGemm::cooperative_128x256;
}

// The output tiles of the configuration that runs a rows x cols GEMM.
inline uint64_t lora_kconcat_tiles(uint64_t rows, uint64_t cols) {
  const uint64_t tile_n = lora_kconcat_gemm_for(rows, cols) == LoraKConcatGemm::pingpong_128x128
                              ? kLoraKConcatPingpongTileN
                              : kLoraKConcatCoopTileN;
  return uint64_t(ceil_div(rows, kLoraKConcatTileM)) * ceil_div(cols, tile_n);
}

inline bool lora_kconcat_fills_device(uint64_t tokens, uint64_t in_features, uint64_t out_features, uint64_t sms) {
  return lora_kconcat_tiles(tokens, out_features) >= sms && lora_kconcat_tiles(tokens, in_features) >= sms;
}

}  // namespace tmf::launch
