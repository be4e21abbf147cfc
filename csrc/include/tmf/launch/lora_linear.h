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
// two configurations, chosen per GEMM (y: tokens x out_features, dx: tokens x in_features) by its output's shape.
// Through the op on an H200 (README, CUDA section; benchmarks/results/cuda-h200-2026-12-0[12]-lora-*):
// - cooperative, 128x256 tiles, where the tokens' 128-row tiles are at least as many as the features' 128-column
//   ones (tall outputs, ties included): at 8192x4096->4096 forward+backward 1.165-1.175x the base GEMM pair in three
//   runs on 12-01, where ping-pong ran 1.222x / 1.236x (r16 / r64) with this scheduler's default swizzle on 12-02
//   (...-lora-op-pingpong-swizzle1-63ab3ac.md) and 1.194-1.204x with swizzle 4; the op without this GEMM, the
//   control, measured 1.206x / 1.248x and 1.212x / 1.253x on the two days;
// - ping-pong, 128x128 tiles, where the features' tiles are more (wide outputs): at 2048x4096->11008 forward
//   1.074-1.080x in three runs against the cooperative one's 1.146-1.157x, forward+backward 1.133-1.152x (r16) and
//   1.124-1.143x (r64) against 1.173-1.182x and 1.133-1.161x.
// Only those two shapes (2:1 tall, 1:2.7 wide) were measured through the op; the split between is an extrapolation.
// The route is taken by default only where each of the two GEMMs has at least one of its own tiles per SM. The
// cooperative configuration lost where its tiles did not fill the GPU (1000x1048->1016 r16: 3.02x against 2.74x; 512
// tokens: forward 18.8 against 14.7 µs). A ping-pong tile keeps one of its two consumer warp groups busy, so that
// threshold lets ping-pong in at half the output area the cooperative one needs; in the GEMM benchmark ping-pong won
// at 1000x1048->1016 (64 tiles of 128x128: 2.48x against 2.72x), which supports the leniency.
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
