// LoRA low-rank kernels in float32, float16 and bfloat16 (accumulation in float32).
// Launch code: csrc/include/tmf/launch/lora_linear.h. The big GEMMs are the platform's native matmul.
//
// Variant "tiled": one threadgroup of up to 256 threads per tile of BM = `tokens_per_group` token rows, one
// dispatch per op call. The host picks BM = min(128, 16·floor(threads / rank), 4096 / rank): 128 up to rank 32,
// 64 at rank 64, 16 at rank 256 (fewer only when the pipeline caps the threads below 256). Both kernels are the same two-phase body with roles swapped:
//   phase 1, h = in·Fᵀ over the group's rows: the reduced dimension is walked in chunks of `reduce_tile`; each
//     chunk of the input rows (BM x chunk, dropout applied) and of F (chunk x r) is staged once in threadgroup
//     memory as float; each thread accumulates one rank entry for up to kLoraAccumulatorsPerThread tokens in
//     registers (one F load per 16 FMAs). The result (BM x r floats) becomes the group's h tile in threadgroup
//     memory and is written out.
//   phase 2, out += s · h·S over chunks of `out_tile` output columns: each chunk of S (r x chunk) is staged once;
//     each thread takes one column for a block of 16 tokens, reading and writing each output element once.
// Forward: in = x, F = A (h = dropout(x)·Aᵀ, saved for backward), S = Bᵀ, out = y (holding x·Wᵀ + bias), s = scale.
// Backward: in = dy, F = Bᵀ (dh = scale·dy·B, saved for dA = dhᵀ·dropout(x) by the native GEMM), S = A,
//   out = dx (holding dy·W; the _dh variant, for a frozen-input call, stops after phase 1), and the dropout
//   mask multiplies the added term.
// Traffic per call: in, mask, h and out (read and written) exactly once; A and B once per group, i.e.
// ceil(tokens / BM) times: (groups - 1)·r·(in + out) elements over the minimum, about r·(in + out) / (BM·(in +
// 2·out)) of it for many tokens (forward): 8 % at rank 16 with square weights, 4 % at rank 8, 17 % at rank 32,
// 67 % at rank 64 (BM = 64). Taller groups would cut it further but leave a big GPU with too few threadgroups
// (tokens / BM of them); pinned by tests/test_emulator_kernels.py. Never recomputes x·A per output element.
// Registers, not simdgroup_matrix, do the products: the harness executes every line here; simdgroup_matrix
// tiles are the next step for arithmetic speed once a Mac can measure it.
// Threadgroup memory: kLoraRowTileFloats + kLoraRankTileFloats floats (24 KiB).
#include <metal_stdlib>
#include "tmf/shader_args.h"
using namespace metal;

constant constexpr uint ACCUMULATORS = tmf::kLoraAccumulatorsPerThread;

// Stages rows [0, rows) x columns [c0, c0 + width) of a row-major matrix (row i at m + i * ld) into
// tile[i * row_step + (c - c0) * col_step] as float, optionally times a mask of the same layout.
// Consecutive threads take consecutive columns, so device reads are coalesced along rows.
template <typename T>
inline void stage_block(device const T* m, ulong ld, device const T* mask, ulong mask_ld, bool masked, uint rows,
                        uint c0, uint width, threadgroup float* tile, uint row_step, uint col_step, uint tid,
                        uint threads) {
  for (uint e = tid; e < rows * width; e += threads) {
    const uint i = e / width, c = e % width;
    float v = float(m[i * ld + c0 + c]);
    if (masked) {
      v *= float(mask[i * mask_ld + c0 + c]);
    }
    tile[i * row_step + c * col_step] = v;
  }
}

// The shared body (see the header comment). FORWARD picks the roles: F = A and S = Bᵀ, or F = Bᵀ and S = A.
template <typename T, bool FORWARD, bool PHASE2>
inline void lora_lowrank_tile(device const T* in, ulong in_stride, uint reduce_dim, device const T* mask,
                              device const T* lora_a, device const T* lora_b, device T* h, device T* out,
                              uint out_dim, constant tmf::LoraParams& p, uint group, uint tid, uint threads,
                              threadgroup float* row_tile, threadgroup float* rank_tile) {
  const uint r = p.rank, bm = p.tokens_per_group, bk = p.reduce_tile, bn = p.out_tile;
  const uint t0 = group * bm;
  const uint nt = min(bm, p.tokens - t0);  // rows of this group, uniform across the threadgroup
  const bool has_mask = p.has_mask != 0;
  device const T* in_rows = in + ulong(t0) * in_stride;
  device const T* in_mask = mask + (FORWARD ? ulong(t0) * reduce_dim : 0ul);  // forward: dropout on x

  // Phase 1: thread tid owns rank entry j = tid % r of tokens slot, slot + slots, ... (slot = tid / r, slots =
  // threads / r; the host keeps r <= threads and bm <= slots * ACCUMULATORS), so each staged element of F it
  // loads serves all its tokens. The threads past slots * r (fewer than r) only help staging.
  const uint slots = threads / r, slot = tid / r, j = tid % r;
  const uint mine = slot < min(slots, nt) ? (nt - slot + slots - 1) / slots : 0;  // my tokens (<= ACCUMULATORS)
  float acc[ACCUMULATORS];
  for (uint i = 0; i < ACCUMULATORS; ++i) {
    acc[i] = 0.0f;
  }
  for (uint k0 = 0; k0 < reduce_dim; k0 += bk) {
    const uint w = min(bk, reduce_dim - k0);
    // in rows -> row_tile[t * bk + k]; F (r x w block) -> rank_tile[k * r + j].
    stage_block(in_rows, in_stride, in_mask, reduce_dim, FORWARD && has_mask, nt, k0, w, row_tile, bk, 1, tid,
                threads);
    if (FORWARD) {
      stage_block(lora_a, reduce_dim, lora_a, 0, false, r, k0, w, rank_tile, 1, r, tid, threads);  // A: r x in
    } else {
      // Bᵀ block: rows k0.. of B (out x r), each row contiguous, -> rank_tile[k * r + j]
      stage_block(lora_b + ulong(k0) * r, r, lora_b, 0, false, w, 0, r, rank_tile, r, 1, tid, threads);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (mine > 0) {
      for (uint k = 0; k < w; ++k) {
        const float f = rank_tile[k * r + j];
        for (uint i = 0; i < ACCUMULATORS; ++i) {
          if (i < mine) {
            acc[i] += row_tile[(slot + i * slots) * bk + k] * f;
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are restaged by the next chunk
  }
  const float h_scale = FORWARD ? 1.0f : p.scale;
  for (uint i = 0; i < ACCUMULATORS; ++i) {
    if (i < mine) {
      const uint t = slot + i * slots;
      const float v = acc[i] * h_scale;
      rank_tile[t * r + j] = v;  // the group's h tile
      h[ulong(t0 + t) * r + j] = static_cast<T>(v);
    }
  }
  if (!PHASE2) {
    return;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Phase 2: out[t][o] += out_scale * sum_j h[t][j] * S[j][o], S staged as row_tile[j * bn + o]. Work item c
  // takes column o = c % w for a block of ACCUMULATORS tokens, so each staged S element serves the block;
  // consecutive threads take consecutive columns (coalesced reads and writes of out).
  const float out_scale = FORWARD ? p.scale : 1.0f;
  const uint blocks = (nt + ACCUMULATORS - 1) / ACCUMULATORS;
  for (uint o0 = 0; o0 < out_dim; o0 += bn) {
    const uint w = min(bn, out_dim - o0);
    if (FORWARD) {
      // Bᵀ block: rows o0.. of B (out x r), each row contiguous, -> row_tile[j * bn + o]
      stage_block(lora_b + ulong(o0) * r, r, lora_b, 0, false, w, 0, r, row_tile, 1, bn, tid, threads);
    } else {
      stage_block(lora_a, out_dim, lora_a, 0, false, r, o0, w, row_tile, bn, 1, tid, threads);  // A: r x in
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint c = tid; c < blocks * w; c += threads) {
      const uint o = c % w, ta = c / w * ACCUMULATORS, n = min(ACCUMULATORS, nt - ta);
      float s[ACCUMULATORS];
      for (uint i = 0; i < ACCUMULATORS; ++i) {
        s[i] = 0.0f;
      }
      for (uint jj = 0; jj < r; ++jj) {
        const float sv = row_tile[jj * bn + o];
        for (uint i = 0; i < ACCUMULATORS; ++i) {
          if (i < n) {
            s[i] += rank_tile[(ta + i) * r + jj] * sv;
          }
        }
      }
      for (uint i = 0; i < ACCUMULATORS; ++i) {
        if (i < n) {
          const ulong at = ulong(t0 + ta + i) * out_dim + o0 + o;
          const float m = !FORWARD && has_mask ? float(mask[at]) : 1.0f;
          out[at] = static_cast<T>(float(out[at]) + out_scale * s[i] * m);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // row_tile is restaged by the next chunk
  }
}

template <typename T>
[[kernel]] void lora_forward_lowrank_tiled(
    device const T* x [[buffer(0)]],
    device const T* lora_a [[buffer(1)]],
    device const T* lora_b [[buffer(2)]],
    device const T* mask [[buffer(3)]],
    device T* y [[buffer(4)]],
    device T* h [[buffer(5)]],
    constant tmf::LoraParams& p [[buffer(6)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  threadgroup float row_tile[tmf::kLoraRowTileFloats];
  threadgroup float rank_tile[tmf::kLoraRankTileFloats];
  lora_lowrank_tile<T, true, true>(x, p.x_row_stride, p.in_features, mask, lora_a, lora_b, h, y, p.out_features,
                                   p, group, tid, threads, row_tile, rank_tile);
}

template <typename T, bool DX>
[[kernel]] void lora_backward_lowrank_tiled(
    device const T* dy [[buffer(0)]],
    device const T* lora_a [[buffer(1)]],
    device const T* lora_b [[buffer(2)]],
    device const T* mask [[buffer(3)]],
    device T* dh [[buffer(4)]],
    device T* dx [[buffer(5)]],
    constant tmf::LoraParams& p [[buffer(6)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  threadgroup float row_tile[tmf::kLoraRowTileFloats];
  threadgroup float rank_tile[tmf::kLoraRankTileFloats];
  lora_lowrank_tile<T, false, DX>(dy, p.dy_row_stride, p.out_features, mask, lora_a, lora_b, dh, dx,
                                  p.in_features, p, group, tid, threads, row_tile, rank_tile);
}

template [[host_name("lora_forward_lowrank_tiled_float")]] [[kernel]] decltype(lora_forward_lowrank_tiled<float>) lora_forward_lowrank_tiled<float>;
template [[host_name("lora_backward_lowrank_dx_tiled_float")]] [[kernel]] decltype(lora_backward_lowrank_tiled<float, true>) lora_backward_lowrank_tiled<float, true>;
template [[host_name("lora_backward_lowrank_dh_tiled_float")]] [[kernel]] decltype(lora_backward_lowrank_tiled<float, false>) lora_backward_lowrank_tiled<float, false>;
template [[host_name("lora_forward_lowrank_tiled_half")]] [[kernel]] decltype(lora_forward_lowrank_tiled<half>) lora_forward_lowrank_tiled<half>;
template [[host_name("lora_backward_lowrank_dx_tiled_half")]] [[kernel]] decltype(lora_backward_lowrank_tiled<half, true>) lora_backward_lowrank_tiled<half, true>;
template [[host_name("lora_backward_lowrank_dh_tiled_half")]] [[kernel]] decltype(lora_backward_lowrank_tiled<half, false>) lora_backward_lowrank_tiled<half, false>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("lora_forward_lowrank_tiled_bfloat")]] [[kernel]] decltype(lora_forward_lowrank_tiled<bfloat>) lora_forward_lowrank_tiled<bfloat>;
template [[host_name("lora_backward_lowrank_dx_tiled_bfloat")]] [[kernel]] decltype(lora_backward_lowrank_tiled<bfloat, true>) lora_backward_lowrank_tiled<bfloat, true>;
template [[host_name("lora_backward_lowrank_dh_tiled_bfloat")]] [[kernel]] decltype(lora_backward_lowrank_tiled<bfloat, false>) lora_backward_lowrank_tiled<bfloat, false>;
#endif
