// LoRA low-rank kernels in float32, float16 and bfloat16 (accumulation in float32).
// Launch code and every size below: csrc/include/tmf/launch/lora_linear.h. The big GEMMs are the platform's
// native matmul. Each op call is two kinds of dispatch, variant "tiled":
//   reduce (lora_forward_h, lora_backward_dh): h = scale · in·Fᵀ. One threadgroup per tile of BM token rows, one
//     thread per token row and rank block of up to kLoraRanksPerThread (64) rank entries, whose accumulators stay
//     in registers for the whole reduced dimension. The reduced dimension is walked `reduce_tile` columns at a
//     time: the tile's input rows (dropout applied) and F's matching columns are staged once in threadgroup
//     memory as float; each staged input element serves the thread's whole rank block, each staged F element is
//     read by a SIMD-group of 32 tokens at one address (a broadcast). BM = 16 · rank (at least 256, at most 1024
//     threads): F, read once per tile, costs at most 1/16 of the input's bytes.
//   expand (lora_forward_y, lora_backward_dx): out += scale · h·S (· mask backward). One thread per output column,
//     holding that column of S for one rank block in registers, so S is read once per threadgroup; the group walks
//     its token rows `tokens_per_step` rows of h at a time through threadgroup memory (read at one address by
//     all threads), and reads and writes each out element once, consecutive threads on consecutive columns.
//     Ranks above 64 take one expand dispatch per rank block (out read and written once per block).
// Forward: reduce in = x, F = A (h = dropout(x)·Aᵀ, written for the expand and saved for backward); expand S = Bᵀ,
//   out = y (holding x·Wᵀ + bias), scale = the adapter's. Backward: reduce in = dy, F = Bᵀ (dh = scale·dy·B,
//   saved for dA = dhᵀ·dropout(x) by the native GEMM); expand S = A, out = dx (holding dy·W), times the dropout
//   mask; a frozen input needs dh only (no expand dispatch).
// Traffic per call (rank <= 64): in, mask and out (read and written) once; h written once and read once per
// expand column block (1024 columns); F once per reduce tile, S once per expand tile (32 · rank token rows):
// within 7 % of the minimum at tokens >= 1024, in/out 1024..8192 (pinned by tests/test_emulator_kernels.py).
// Threadgroup memory: one [[threadgroup(0)]] buffer sized by the host, at most 64 bytes per thread (16 KiB per
// 256 threads) and 32 KiB.
// Registers, not simdgroup_matrix, do the products: the harness executes every line here; simdgroup_matrix
// tiles are the next step for arithmetic speed once a Mac can measure it.
#include <metal_stdlib>
#include "tmf/shader_args.h"
using namespace metal;

constant constexpr uint RANKS_PER_THREAD = tmf::kLoraRanksPerThread;

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

// h[t][j] = p.scale · Σ_k in[t][k]·F[j][k] for the group's token rows (see the header comment). FORWARD picks F:
// A (rank x reduce_dim, row-major) or Bᵀ (B is reduce_dim x rank, row-major).
template <typename T, bool FORWARD>
inline void lora_reduce_tile(device const T* in, device const T* factor, device const T* mask, device T* h,
                             constant tmf::LoraReduceParams& p, uint group, uint tid, uint threads,
                             threadgroup float* tiles) {
  const uint r = p.rank, bm = p.tokens_per_group, bk = p.reduce_tile;
  const uint pitch = bk + 1;  // odd row pitch: the 32 tokens of a SIMD-group read 32 different banks
  const uint t0 = group * bm;
  const uint nt = min(bm, p.tokens - t0);  // rows of this group, uniform across the threadgroup
  // Thread tid owns token row t and rank entries [j0, j0 + nr); bm is a multiple of 32, so a SIMD-group shares j0.
  const uint t = tid % bm, j0 = tid / bm * RANKS_PER_THREAD;
  const uint nr = min(RANKS_PER_THREAD, r - j0);
  threadgroup float* in_tile = tiles;                     // [bm][pitch]
  threadgroup float* factor_tile = tiles + bm * pitch;    // [bk][r]
  device const T* in_rows = in + ulong(t0) * p.in_row_stride;
  device const T* mask_rows = mask + ulong(t0) * p.reduce_dim;  // forward: dropout on x, contiguous
  float acc[RANKS_PER_THREAD];
  for (uint j = 0; j < RANKS_PER_THREAD; ++j) {
    acc[j] = 0.0f;
  }
  for (uint k0 = 0; k0 < p.reduce_dim; k0 += bk) {
    const uint w = min(bk, p.reduce_dim - k0);
    stage_block(in_rows, p.in_row_stride, mask_rows, p.reduce_dim, p.has_mask != 0, nt, k0, w, in_tile, pitch, 1,
                tid, threads);
    if (FORWARD) {
      stage_block(factor, p.reduce_dim, factor, 0, false, r, k0, w, factor_tile, 1, r, tid, threads);  // A: r x in
    } else {
      // Bᵀ block: rows k0.. of B (out x r), each row contiguous, -> factor_tile[k * r + j]
      stage_block(factor + ulong(k0) * r, r, factor, 0, false, w, 0, r, factor_tile, r, 1, tid, threads);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t < nt) {
      for (uint k = 0; k < w; ++k) {
        const float v = in_tile[t * pitch + k];
        threadgroup const float* f = factor_tile + k * r + j0;
        for (uint j = 0; j < RANKS_PER_THREAD; ++j) {
          if (j < nr) {
            acc[j] += v * f[j];
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are restaged by the next chunk
  }
  if (t < nt) {
    device T* h_row = h + ulong(t0 + t) * r + j0;
    for (uint j = 0; j < RANKS_PER_THREAD; ++j) {
      if (j < nr) {
        h_row[j] = static_cast<T>(acc[j] * p.scale);
      }
    }
  }
}

// out[t][o] += p.scale · Σ_j h[t][j]·S[j][o] (· mask[t][o] when has_mask) over the rank block and the group's
// columns and token rows (see the header comment). FORWARD picks S: Bᵀ (B is out_dim x rank) or A (rank x out_dim).
template <typename T, bool FORWARD>
inline void lora_expand_tile(device const T* h, device const T* factor, device const T* mask, device T* out,
                             constant tmf::LoraExpandParams& p, uint2 group, uint tid, uint threads,
                             threadgroup float* h_tile) {
  const uint r = p.rank, j0 = p.rank_offset, nr = p.rank_count;
  const uint o = group.x * p.columns_per_group + tid;
  const bool has_column = o < p.out_dim;
  float s[RANKS_PER_THREAD];  // column o of S for ranks j0.. : read once per threadgroup
  for (uint j = 0; j < RANKS_PER_THREAD; ++j) {
    s[j] = 0.0f;
    if (has_column && j < nr) {
      s[j] = FORWARD ? float(factor[ulong(o) * r + j0 + j]) : float(factor[ulong(j0 + j) * p.out_dim + o]);
    }
  }
  const uint t_begin = group.y * p.tokens_per_group;
  const uint t_end = min(t_begin + p.tokens_per_group, p.tokens);
  for (uint t0 = t_begin; t0 < t_end; t0 += p.tokens_per_step) {
    const uint n = min(p.tokens_per_step, t_end - t0);
    // h rows t0.., ranks j0.. -> h_tile[i * nr + j]
    stage_block(h + ulong(t0) * r, r, h, 0, false, n, j0, nr, h_tile, nr, 1, tid, threads);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (has_column) {
      for (uint i = 0; i < n; ++i) {
        threadgroup const float* h_row = h_tile + i * nr;
        float v = 0.0f;
        for (uint j = 0; j < RANKS_PER_THREAD; ++j) {
          if (j < nr) {
            v += h_row[j] * s[j];
          }
        }
        const ulong at = ulong(t0 + i) * p.out_dim + o;
        const float m = p.has_mask != 0 ? float(mask[at]) : 1.0f;
        out[at] = static_cast<T>(float(out[at]) + p.scale * v * m);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // h_tile is restaged by the next step
  }
}

// h = dropout(x)·Aᵀ
template <typename T>
[[kernel]] void lora_forward_h(
    device const T* x [[buffer(0)]],
    device const T* lora_a [[buffer(1)]],
    device const T* mask [[buffer(2)]],
    device T* h [[buffer(3)]],
    constant tmf::LoraReduceParams& p [[buffer(4)]],
    threadgroup float* tiles [[threadgroup(0)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  lora_reduce_tile<T, true>(x, lora_a, mask, h, p, group, tid, threads, tiles);
}

// y += scale · h·Bᵀ
template <typename T>
[[kernel]] void lora_forward_y(
    device const T* h [[buffer(0)]],
    device const T* lora_b [[buffer(1)]],
    device const T* mask [[buffer(2)]],
    device T* y [[buffer(3)]],
    constant tmf::LoraExpandParams& p [[buffer(4)]],
    threadgroup float* h_tile [[threadgroup(0)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  lora_expand_tile<T, true>(h, lora_b, mask, y, p, group, tid, threads, h_tile);
}

// dh = scale · dy·B
template <typename T>
[[kernel]] void lora_backward_dh(
    device const T* dy [[buffer(0)]],
    device const T* lora_b [[buffer(1)]],
    device const T* mask [[buffer(2)]],
    device T* dh [[buffer(3)]],
    constant tmf::LoraReduceParams& p [[buffer(4)]],
    threadgroup float* tiles [[threadgroup(0)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  lora_reduce_tile<T, false>(dy, lora_b, mask, dh, p, group, tid, threads, tiles);
}

// dx += (dh·A) · mask
template <typename T>
[[kernel]] void lora_backward_dx(
    device const T* dh [[buffer(0)]],
    device const T* lora_a [[buffer(1)]],
    device const T* mask [[buffer(2)]],
    device T* dx [[buffer(3)]],
    constant tmf::LoraExpandParams& p [[buffer(4)]],
    threadgroup float* h_tile [[threadgroup(0)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  lora_expand_tile<T, false>(dh, lora_a, mask, dx, p, group, tid, threads, h_tile);
}

template [[host_name("lora_forward_h_tiled_float")]] [[kernel]] decltype(lora_forward_h<float>) lora_forward_h<float>;
template [[host_name("lora_forward_y_tiled_float")]] [[kernel]] decltype(lora_forward_y<float>) lora_forward_y<float>;
template [[host_name("lora_backward_dh_tiled_float")]] [[kernel]] decltype(lora_backward_dh<float>) lora_backward_dh<float>;
template [[host_name("lora_backward_dx_tiled_float")]] [[kernel]] decltype(lora_backward_dx<float>) lora_backward_dx<float>;
template [[host_name("lora_forward_h_tiled_half")]] [[kernel]] decltype(lora_forward_h<half>) lora_forward_h<half>;
template [[host_name("lora_forward_y_tiled_half")]] [[kernel]] decltype(lora_forward_y<half>) lora_forward_y<half>;
template [[host_name("lora_backward_dh_tiled_half")]] [[kernel]] decltype(lora_backward_dh<half>) lora_backward_dh<half>;
template [[host_name("lora_backward_dx_tiled_half")]] [[kernel]] decltype(lora_backward_dx<half>) lora_backward_dx<half>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("lora_forward_h_tiled_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat>) lora_forward_h<bfloat>;
template [[host_name("lora_forward_y_tiled_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat>) lora_forward_y<bfloat>;
template [[host_name("lora_backward_dh_tiled_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat>) lora_backward_dh<bfloat>;
template [[host_name("lora_backward_dx_tiled_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat>) lora_backward_dx<bfloat>;
#endif
