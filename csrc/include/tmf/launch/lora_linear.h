// Launch code for shaders/lora_linear.metal, shared by the MPS dispatch and the Metal-on-CPU harness.
// The big GEMMs (x·Wᵀ, dy·W, dyᵀ·x, dyᵀ·h, dhᵀ·x) run on the platform's native matmul, issued by the caller;
// these kernels do the rank-r work, one threadgroup per tile of token rows (lora_tiling).
#pragma once

#include "tmf/launch/common.h"

namespace tmf::launch {

constexpr uint32_t kLoraThreads = 256;
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


inline uint32_t lora_threadgroup_size(const Pipeline& pipeline) {
  return std::min<uint32_t>(kLoraThreads, round_down(pipeline.max_threads, kSimdWidth));
}

// Token rows per threadgroup and the staging widths. A and B are read once per group, so the group is made as
// tall as the register accumulators and the h tile allow: each thread accumulates one rank entry for up to
// kLoraAccumulatorsPerThread tokens, threads / rank threads per rank entry, so 128 rows up to rank 32 and
// about 4096 / rank beyond with 256 threads. The staging widths then fill the two threadgroup tiles (see
// LoraParams). Needs threads >= rank (256 >= kLoraMaxRank unless a pipeline caps the threads lower: then no plan
// fits and the call is served by the reference).
struct LoraTiling {
  uint32_t tokens_per_group, reduce_tile, out_tile;
};

inline LoraTiling lora_tiling(uint32_t threads, uint64_t tokens, uint64_t rank) {
  if (rank > threads) {
    throw KernelUnavailable("lora_linear", KernelUnavailable::Scope::call,
                            "LoRA rank " + std::to_string(rank) + " exceeds the " + std::to_string(threads) +
                                " threads per threadgroup this device allows for the LoRA kernels");
  }
  const uint64_t bm = std::max<uint64_t>(
      1, std::min<uint64_t>({kLoraMaxTokensPerGroup, threads / rank * kLoraAccumulatorsPerThread,
                             kLoraRankTileFloats / rank, tokens}));
  const uint64_t bk = std::min<uint64_t>(kLoraRankTileFloats / rank, kLoraRowTileFloats / bm);
  return LoraTiling{uint32_t(bm), uint32_t(bk), uint32_t(kLoraRowTileFloats / rank)};
}

// The checked argument struct of both low-rank kernels (row_stride: x's for forward, dy's for backward).
inline LoraParams lora_params(uint64_t tokens, uint64_t in_features, uint64_t out_features, uint64_t rank,
                              uint64_t row_stride, bool forward, float scale, bool has_mask, uint32_t threads) {
  check_u32(tokens, "tokens"), check_u32(in_features, "in_features"), check_u32(out_features, "out_features");
  check_u32(row_stride, "row stride");
  if (rank == 0 || rank > kLoraMaxRank) throw std::invalid_argument("LoRA rank must be in [1, 256] for the kernels");
  const LoraTiling tiling = lora_tiling(threads, tokens, rank);
  return LoraParams{uint32_t(tokens), uint32_t(in_features), uint32_t(out_features), uint32_t(rank),
                    forward ? uint32_t(row_stride) : 0u, forward ? 0u : uint32_t(row_stride), scale,
                    has_mask ? 1u : 0u, tiling.tokens_per_group, tiling.reduce_tile, tiling.out_tile};
}

// Both kernels bind (input rows, A, B, mask, slot 4, slot 5, params) and take one threadgroup per
// tokens_per_group rows; a missing mask binds the input in its place (never read: has_mask is 0).
template <class Encoder>
void encode_lora_lowrank(Encoder& enc, const std::string& kernel, bool forward, const DeviceBuffer& in,
                         uint64_t in_row_stride, const DeviceBuffer& lora_a, const DeviceBuffer& lora_b,
                         const DeviceBuffer& mask, const DeviceBuffer& slot4, const DeviceBuffer& slot5,
                         uint64_t tokens, uint64_t in_features, uint64_t out_features, uint64_t rank, float scale) {
  const bool has_mask = mask.handle != nullptr;
  const Pipeline pipeline = select_pipeline(enc, kernel);
  const uint32_t threads = lora_threadgroup_size(pipeline);
  const LoraParams p =
      lora_params(tokens, in_features, out_features, rank, in_row_stride, forward, scale, has_mask, threads);
  enc.set_pipeline(pipeline);
  enc.set_buffer(0, in);
  enc.set_buffer(1, lora_a);
  enc.set_buffer(2, lora_b);
  enc.set_buffer(3, has_mask ? mask : in);
  enc.set_buffer(4, slot4);
  enc.set_buffer(5, slot5);
  enc.set_bytes(6, &p, sizeof(p));
  enc.dispatch_threadgroups(Size3{ceil_div(tokens, p.tokens_per_group), 1, 1}, Size3{threads, 1, 1});
}

// y += scale * (dropout(x)·Aᵀ)·Bᵀ in place (y holds x·Wᵀ + bias), and h = dropout(x)·Aᵀ written out.
// One dispatch; x, y and h touched once, A and B once per group of tokens_per_group rows.
template <class Encoder>
void lora_forward_lowrank(Encoder& enc, DType t, const DeviceBuffer& x, uint64_t x_row_stride,
                          const DeviceBuffer& lora_a, const DeviceBuffer& lora_b, const DeviceBuffer& mask,
                          const DeviceBuffer& y, const DeviceBuffer& h, uint64_t tokens, uint64_t in_features,
                          uint64_t out_features, uint64_t rank, float scale) {
  if (tokens == 0) return;
  encode_lora_lowrank(enc, kernel_name("lora_forward_lowrank", "tiled", t), true, x, x_row_stride, lora_a, lora_b,
                      mask, y, h, tokens, in_features, out_features, rank, scale);
}

// dh = scale * dy·B written out (for dA = dhᵀ·dropout(x) by the native GEMM), and, if dx is given,
// dx += (dh·A) * mask in place (dx holds dy·W). One dispatch.
template <class Encoder>
void lora_backward_lowrank(Encoder& enc, DType t, const DeviceBuffer& dy, uint64_t dy_row_stride,
                           const DeviceBuffer& lora_a, const DeviceBuffer& lora_b, const DeviceBuffer& mask,
                           const DeviceBuffer& dh, const DeviceBuffer& dx, uint64_t tokens, uint64_t in_features,
                           uint64_t out_features, uint64_t rank, float scale) {
  if (tokens == 0) return;
  const bool wants_dx = dx.handle != nullptr;
  const char* kernel = wants_dx ? "lora_backward_lowrank_dx" : "lora_backward_lowrank_dh";
  encode_lora_lowrank(enc, kernel_name(kernel, "tiled", t), false, dy, dy_row_stride, lora_a, lora_b, mask, dh,
                      wants_dx ? dx : dh, tokens, in_features, out_features, rank, scale);
}

}  // namespace tmf::launch
