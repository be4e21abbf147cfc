// Launch code for shaders/lora_linear.metal, shared by the MPS dispatch and the Metal-on-CPU harness.
// The big GEMMs (x·Wᵀ, dy·W, dyᵀ·x, dyᵀ·h, dhᵀ·x) run on the platform's native matmul, issued by the caller;
// these kernels do the rank-r work: a reduce dispatch (h = in·Fᵀ, lora_reduce_plan) and, unless only dh is
// wanted, an expand dispatch per rank block of 64 (out += s·h·S, lora_expand_plans).
#pragma once

#include <vector>

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

// Threadgroup memory a kernel may use: 64 bytes per thread (16 KiB per 256 threads, so at least kGroupsPerCore
// groups of 256 threads fit a GPU core: issue #13's budget), and never more than Apple GPUs' 32 KiB per group.
constexpr uint32_t kThreadgroupBytesPerThread = 64;
constexpr uint32_t kMaxThreadgroupBytes = 32 * 1024;

inline uint32_t threadgroup_float_budget(uint32_t threads) {
  return std::min(kMaxThreadgroupBytes, threads * kThreadgroupBytesPerThread) / uint32_t(sizeof(float));
}

// The LoRA kernels' threads per threadgroup: up to 1024, whole SIMD-groups, within the pipeline's limit.
constexpr uint32_t kLoraMaxThreads = 1024;
// Reduce tiles hold this many token rows per rank entry: F (A or Bᵀ: rank x reduce_dim) is read once per tile, so
// its re-reads cost at most rank · reduce_dim / (16 · rank · reduce_dim) = 1/16 of the input's bytes. The
// tile's accumulators (16 · rank² floats at rank <= 64) are spread over one thread per token and rank block.
constexpr uint32_t kLoraReduceTokensPerRank = 16;
// ... and at least this many (small ranks: F re-read at most rank/256 of the input, and groups of >= 256 threads).
constexpr uint32_t kLoraReduceMinTokens = 256;
// Expand groups walk this many token rows per rank entry: S (out_dim x rank) is read once per group, at most
// rank / (2 · 32 · rank) = 1/64 of out's read-and-write; at least kLoraReduceMinTokens rows.
constexpr uint32_t kLoraExpandTokensPerRank = 32;

// The kernels' products run on 8 x 8 simdgroup matrices: staged tiles come in whole 8-row/column steps.
constexpr uint32_t kSimdgroupMatrixSize = 8;
// Reduced columns of F staged per step at most (64 x 64 floats: 16 KiB at rank 64).
constexpr uint32_t kLoraReduceTileColumns = 64;

inline uint32_t lora_rank_blocks(uint64_t rank) { return ceil_div(rank, kLoraRanksPerThread); }

inline uint32_t lora_threads_cap(const Pipeline& pipeline) {
  return std::min<uint32_t>(kLoraMaxThreads, round_down(pipeline.max_threads, kSimdWidth));
}

struct LoraReducePlan {
  LoraReduceParams params;
  uint32_t groups, threads, threadgroup_bytes;
};

// The reduce dispatch: tiles of BM token rows (a multiple of 32: each SIMD-group shares one rank block, so its
// reads of staged F are broadcasts), BM · rank blocks threads, BM = 16 · rank (>= 256) within the threads cap and
// the tokens; the staging width fills the threadgroup-memory budget ([BM][width + 1] input floats and
// [width][rank] F floats). Needs 32 threads per rank block (a SIMD-group of tokens each): a pipeline capped
// lower than that gets no plan, and the call is served by the reference.
inline LoraReducePlan lora_reduce_plan(const Pipeline& pipeline, uint64_t tokens, uint64_t reduce_dim, uint64_t rank,
                                       uint64_t in_row_stride, float scale, bool has_mask) {
  check_u32(tokens, "tokens"), check_u32(reduce_dim, "reduce_dim"), check_u32(in_row_stride, "row stride");
  if (rank == 0 || rank > kLoraMaxRank) throw std::invalid_argument("LoRA rank must be in [1, 256] for the kernels");
  const uint32_t blocks = lora_rank_blocks(rank), cap = lora_threads_cap(pipeline);
  if (cap < blocks * kSimdWidth) {
    throw KernelUnavailable("lora_linear", KernelUnavailable::Scope::call,
                            "LoRA rank " + std::to_string(rank) + " needs " + std::to_string(blocks * kSimdWidth) +
                                " threads per threadgroup (32 token rows per rank block of " +
                                std::to_string(kLoraRanksPerThread) + "); this device allows " +
                                std::to_string(cap) + " for the LoRA kernels");
  }
  const uint64_t wanted = std::max<uint64_t>(kLoraReduceMinTokens, kLoraReduceTokensPerRank * rank);
  const uint32_t bm = uint32_t(std::min<uint64_t>(
      {wanted, round_down(cap / blocks, kSimdWidth), round_up(uint32_t(std::max<uint64_t>(tokens, 1)), kSimdWidth)}));
  const uint32_t threads = bm * blocks;
  // F's staged columns: whole 8-column steps, as many as the budget holds up to kLoraReduceTileColumns (fewer
  // barriers per byte staged); at least one step (the budget of 32 threads holds 8 x 64 floats).
  const uint32_t rank8 = round_up(uint32_t(rank), kSimdgroupMatrixSize);
  const uint32_t width = std::max(kSimdgroupMatrixSize, std::min({kLoraReduceTileColumns,
                                                                  round_down(threadgroup_float_budget(threads) / rank8, kSimdgroupMatrixSize),
                                                                  round_up(uint32_t(std::max<uint64_t>(reduce_dim, 1)), kSimdgroupMatrixSize)}));
  LoraReducePlan plan;
  plan.params = LoraReduceParams{uint32_t(tokens), uint32_t(reduce_dim), uint32_t(rank), uint32_t(in_row_stride),
                                 scale, has_mask ? 1u : 0u, bm, width};
  plan.groups = ceil_div(tokens, bm);
  plan.threads = threads;
  plan.threadgroup_bytes = uint32_t(sizeof(float)) * width * rank8;
  return plan;
}

struct LoraExpandPlan {
  LoraExpandParams params;
  Size3 groups;
  uint32_t threads, threadgroup_bytes;
};

// The expand dispatches, one per rank block of 64: one thread per output column (up to 1024 per group, so h is
// read once per 1024 columns), 32 · block rank token rows per group (>= 256), h staged as many rows per step as
// the threadgroup-memory budget holds.
inline std::vector<LoraExpandPlan> lora_expand_plans(const Pipeline& pipeline, uint64_t tokens, uint64_t out_dim,
                                                     uint64_t rank, float scale, bool has_mask) {
  check_u32(tokens, "tokens"), check_u32(out_dim, "out_dim");
  const uint32_t columns = std::min(lora_threads_cap(pipeline), round_up(uint32_t(std::max<uint64_t>(out_dim, 1)), kSimdWidth));
  const uint32_t budget = threadgroup_float_budget(columns);
  std::vector<LoraExpandPlan> plans;
  for (uint32_t j0 = 0; j0 < rank; j0 += kLoraRanksPerThread) {
    const uint32_t nr = std::min<uint32_t>(kLoraRanksPerThread, uint32_t(rank) - j0);
    const uint32_t tokens_per_group = uint32_t(std::min<uint64_t>(
        std::max<uint64_t>(tokens, 1), std::max<uint32_t>(kLoraReduceMinTokens, kLoraExpandTokensPerRank * nr)));
    const uint32_t nr8 = round_up(nr, kSimdgroupMatrixSize);
    const uint32_t step = std::min(round_up(tokens_per_group, kSimdgroupMatrixSize),
                                   round_down(budget / nr8, kSimdgroupMatrixSize));
    LoraExpandPlan plan;
    plan.params = LoraExpandParams{uint32_t(tokens), uint32_t(out_dim), uint32_t(rank), j0, nr, scale,
                                   has_mask ? 1u : 0u, columns, tokens_per_group, step};
    plan.groups = Size3{ceil_div(out_dim, columns), ceil_div(tokens, tokens_per_group), 1};
    plan.threads = columns;
    plan.threadgroup_bytes = uint32_t(sizeof(float)) * step * nr8;
    plans.push_back(plan);
  }
  return plans;
}

// Both kinds bind (input, factor, mask, output, params) and one threadgroup buffer; a missing mask binds the input
// in its place (never read: has_mask is 0).
template <class Encoder, class Params>
void encode_lora(Encoder& enc, const Pipeline& pipeline, const Params& params, Size3 groups, uint32_t threads,
                 uint32_t threadgroup_bytes, const DeviceBuffer& in, const DeviceBuffer& factor,
                 const DeviceBuffer& mask, const DeviceBuffer& out) {
  enc.set_pipeline(pipeline);
  enc.set_buffer(0, in);
  enc.set_buffer(1, factor);
  enc.set_buffer(2, params.has_mask ? mask : in);
  enc.set_buffer(3, out);
  enc.set_bytes(4, &params, sizeof(params));
  enc.set_threadgroup_memory(0, threadgroup_bytes);
  enc.dispatch_threadgroups(groups, Size3{threads, 1, 1});
}

// h = dropout(x)·Aᵀ written out (saved for backward), then y += scale · h·Bᵀ in place (y holds x·Wᵀ + bias).
// Two dispatches (one more per rank block above 64); both pipelines and plans are chosen before encoding.
template <class Encoder>
void lora_forward_lowrank(Encoder& enc, DType t, const DeviceBuffer& x, uint64_t x_row_stride,
                          const DeviceBuffer& lora_a, const DeviceBuffer& lora_b, const DeviceBuffer& mask,
                          const DeviceBuffer& y, const DeviceBuffer& h, uint64_t tokens, uint64_t in_features,
                          uint64_t out_features, uint64_t rank, float scale) {
  if (tokens == 0) return;
  const bool has_mask = mask.handle != nullptr;
  const Pipeline reduce = select_pipeline(enc, kernel_name("lora_forward_h", "tiled", t));
  const Pipeline expand = select_pipeline(enc, kernel_name("lora_forward_y", "tiled", t));
  const LoraReducePlan rp = lora_reduce_plan(reduce, tokens, in_features, rank, x_row_stride, 1.0f, has_mask);
  const std::vector<LoraExpandPlan> eps = lora_expand_plans(expand, tokens, out_features, rank, scale, false);
  encode_lora(enc, reduce, rp.params, Size3{rp.groups, 1, 1}, rp.threads, rp.threadgroup_bytes, x, lora_a, mask, h);
  for (const LoraExpandPlan& ep : eps) {
    encode_lora(enc, expand, ep.params, ep.groups, ep.threads, ep.threadgroup_bytes, h, lora_b, mask, y);
  }
}

// dh = scale · dy·B written out (for dA = dhᵀ·dropout(x) by the native GEMM), and, if dx is given,
// dx += (dh·A) · mask in place (dx holds dy·W). One dispatch for dh, plus the expand dispatches for dx.
template <class Encoder>
void lora_backward_lowrank(Encoder& enc, DType t, const DeviceBuffer& dy, uint64_t dy_row_stride,
                           const DeviceBuffer& lora_a, const DeviceBuffer& lora_b, const DeviceBuffer& mask,
                           const DeviceBuffer& dh, const DeviceBuffer& dx, uint64_t tokens, uint64_t in_features,
                           uint64_t out_features, uint64_t rank, float scale) {
  if (tokens == 0) return;
  const bool wants_dx = dx.handle != nullptr, has_mask = mask.handle != nullptr;
  const Pipeline reduce = select_pipeline(enc, kernel_name("lora_backward_dh", "tiled", t));
  const LoraReducePlan rp = lora_reduce_plan(reduce, tokens, out_features, rank, dy_row_stride, scale, false);
  std::vector<LoraExpandPlan> eps;
  Pipeline expand;
  if (wants_dx) {
    expand = select_pipeline(enc, kernel_name("lora_backward_dx", "tiled", t));
    eps = lora_expand_plans(expand, tokens, in_features, rank, 1.0f, has_mask);
  }
  encode_lora(enc, reduce, rp.params, Size3{rp.groups, 1, 1}, rp.threads, rp.threadgroup_bytes, dy, lora_b, mask,
              dh);
  for (const LoraExpandPlan& ep : eps) {
    encode_lora(enc, expand, ep.params, ep.groups, ep.threads, ep.threadgroup_bytes, dh, lora_a, mask, dx);
  }
}

}  // namespace tmf::launch
