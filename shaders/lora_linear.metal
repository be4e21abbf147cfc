// LoRA low-rank kernels in float32, float16 and bfloat16 (accumulation in float32, products on 8x8
// simdgroup_matrix tiles: simdgroup_multiply_accumulate in float). T is the activations' type (x, y, dy, dx, the
// dropout mask), W the adapters' (A, B) and the rank-r intermediates' (h, dh): W = T, or float ("float_adapters"
// variants) for PEFT's default of float32 adapters on a half/bfloat model, whose activations are then widened in
// registers, never copied to float32 in memory.
// Launch code and every size below: torch_metal_fused/backends/metal.py (lora_*). The big GEMMs are the platform's
// native matmul. Each op call is two kinds of dispatch, variants "tg<threadgroup floats>":
//   reduce (lora_forward_h, lora_backward_dh): h = scale · in·Fᵀ. One threadgroup per tile of BM token rows; each
//     SIMD-group owns 32 token rows and one rank block of up to kLoraRanksPerThread (64) rank entries, whose
//     32 x 64 float accumulators (4 x 8 simdgroup matrices, 64 floats per lane) stay in registers for the whole
//     reduced dimension. F's columns are staged `reduce_tile` at a time in threadgroup memory (zero-padded to
//     whole 8 x 8 tiles) and loaded with simdgroup_load; each lane reads its own elements of the input tiles
//     straight from device memory (dropout applied), so each input element is read once per rank block, with
//     no staging. BM = 16 · rank (at least 256, at most 1024 threads): F, read once per tile, costs at most 1/16
//     of the input's bytes.
//   expand (lora_forward_y, lora_backward_dx): out += scale · h·S (· mask backward). Each SIMD-group owns 32
//     output columns and holds their S values for one rank block as 8 x 4 simdgroup matrices (64 floats per
//     lane), so S is read once per threadgroup; the group walks its token rows `tokens_per_step` rows of h at a
//     time through threadgroup memory (simdgroup_load), and each lane reads and writes its elements of out once.
//     Ranks above 64 take one expand dispatch per rank block (out read and written once per block).
// Forward: reduce in = x, F = A (h = dropout(x)·Aᵀ, written for the expand and saved for backward); expand S = Bᵀ,
//   out = y (holding x·Wᵀ + bias), scale = the adapter's. Backward: reduce in = dy, F = Bᵀ (dh = scale·dy·B,
//   saved for dA = dhᵀ·dropout(x) by the native GEMM); expand S = A, out = dx (holding dy·W), times the dropout
//   mask; a frozen input needs dh only (no expand dispatch).
// Traffic per call (rank <= 64): in, mask and out (read and written) once; h written once and read once per
// expand column block (1024 columns); F once per reduce tile, S once per expand tile (32 · rank token rows):
// within 7 % of the minimum at tokens >= 1024, in/out 1024..8192 (pinned by tests/test_emulator_kernels.py).
// Threadgroup memory: a static array of TG_FLOATS floats (torch.mps.compile_shader cannot size threadgroup memory
// at launch), one variant per size: tg512 .. tg8192 (2 to 32 KiB; tg1536 for rank blocks of 3 at 32 token rows). The
// launch plan takes the largest within 64 bytes per thread (16 KiB per 256 threads) and sizes its tiles to it.
// The lanes' elements of a simdgroup matrix follow Apple's layout as MLX uses it (lane_matrix_position); the
// harness implements the same layout and runs simdgroup_matrix operations as 32-lane collectives.
#include <metal_stdlib>
#include "simdgroup_matrix.h"
#include "tmf/shader_args.h"
using namespace metal;

constant constexpr uint RANKS_PER_THREAD = tmf::kLoraRanksPerThread;

constant constexpr uint RANK_TILES = RANKS_PER_THREAD / TILE;      // 8x8 tiles across a rank block
constant constexpr uint TOKEN_TILES = 32 / TILE;                   // a SIMD-group's 32 token rows (reduce)
constant constexpr uint COLUMN_TILES = 32 / TILE;                  // a SIMD-group's 32 output columns (expand)

// h[t][j] = p.scale · Σ_k in[t][k]·F[j][k] for the group's token rows (see the header comment). FORWARD picks F:
// A (rank x reduce_dim, row-major) or Bᵀ (B is reduce_dim x rank, row-major). SIMD-group s takes 32 token rows
// and one rank block: its 32 x 64 accumulators are 4 x 8 simdgroup matrices (64 floats per lane).
template <typename T, typename W, bool FORWARD>
inline void lora_reduce_tile(device const T* in, device const W* factor, device const T* mask, device W* h,
                             constant tmf::LoraReduceParams& p, uint group, uint tid, uint threads, uint lane,
                             uint simd_group, threadgroup float* factor_tile) {
  const uint r = p.rank, r8 = (r + TILE - 1) / TILE * TILE, bm = p.tokens_per_group, bk = p.reduce_tile;
  const uint t0 = group * bm;
  const uint nt = min(bm, p.tokens - t0);  // rows of this group, uniform across the threadgroup
  // bm is a multiple of 32: SIMD-group s owns token rows [tok0, tok0 + 32) of rank block j0 / 64.
  const uint token_groups = bm / 32;
  const uint tok0 = simd_group % token_groups * 32, j0 = simd_group / token_groups * RANKS_PER_THREAD;
  const uint rank_tiles = (min(RANKS_PER_THREAD, r - j0) + TILE - 1) / TILE;    // uniform per SIMD-group
  const uint token_tiles = tok0 < nt ? min(TOKEN_TILES, (nt - tok0 + TILE - 1) / TILE) : 0;
  const LanePosition at = lane_matrix_position(lane);
  device const T* in_rows = in + ulong(t0) * p.in_row_stride;
  device const T* mask_rows = mask + ulong(t0) * p.reduce_dim;  // forward: dropout on x, contiguous
  simdgroup_float8x8 acc[TOKEN_TILES][RANK_TILES];
  #pragma clang loop unroll(full)
  for (uint m = 0; m < TOKEN_TILES; ++m) {
    #pragma clang loop unroll(full)
    for (uint q = 0; q < RANK_TILES; ++q) {
      acc[m][q] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }
  for (uint k0 = 0; k0 < p.reduce_dim; k0 += bk) {
    const uint w = min(bk, p.reduce_dim - k0), w8 = (w + TILE - 1) / TILE * TILE;
    // F's columns k0.. -> factor_tile[k * r8 + j], zero past the reduced dimension and past the rank.
    for (uint e = tid; e < w8 * r8; e += threads) {
      const uint k = e / r8, j = e % r8;
      float v = 0.0f;
      if (k < w && j < r) {
        v = FORWARD ? float(factor[ulong(j) * p.reduce_dim + k0 + k]) : float(factor[ulong(k0 + k) * r + j]);
      }
      factor_tile[e] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < w8; kk += TILE) {
      // This lane's elements of the SIMD-group's 4 input tiles (8 token rows x 8 columns each), read from device
      // memory once (dropout applied), zero past the tokens and the reduced dimension.
      simdgroup_float8x8 x_tiles[TOKEN_TILES];
      #pragma clang loop unroll(full)
      for (uint m = 0; m < TOKEN_TILES; ++m) {
        const uint t = tok0 + m * TILE + at.row;
        #pragma clang loop unroll(full)
        for (uint e = 0; e < 2; ++e) {
          const uint k = k0 + kk + at.col + e;
          float v = 0.0f;
          if (t < nt && k < p.reduce_dim) {
            v = float(in_rows[ulong(t) * p.in_row_stride + k]);
            if (p.has_mask != 0) {
              v *= float(mask_rows[ulong(t) * p.reduce_dim + k]);
            }
          }
          x_tiles[m].thread_elements()[e] = v;
        }
      }
      #pragma clang loop unroll(full)
      for (uint q = 0; q < RANK_TILES; ++q) {
        if (q < rank_tiles && token_tiles > 0) {
          simdgroup_float8x8 f_tile;
          simdgroup_load(f_tile, factor_tile + kk * r8 + j0 + q * TILE, r8);
          #pragma clang loop unroll(full)
          for (uint m = 0; m < TOKEN_TILES; ++m) {
            if (m < token_tiles) {
              simdgroup_multiply_accumulate(acc[m][q], x_tiles[m], f_tile, acc[m][q]);
            }
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are restaged by the next chunk
  }
  #pragma clang loop unroll(full)
  for (uint m = 0; m < TOKEN_TILES; ++m) {
    #pragma clang loop unroll(full)
    for (uint q = 0; q < RANK_TILES; ++q) {
      const uint t = tok0 + m * TILE + at.row;
      #pragma clang loop unroll(full)
      for (uint e = 0; e < 2; ++e) {
        const uint j = j0 + q * TILE + at.col + e;
        if (m < token_tiles && q < rank_tiles && t < nt && j < r) {
          h[ulong(t0 + t) * r + j] = static_cast<W>(acc[m][q].thread_elements()[e] * p.scale);
        }
      }
    }
  }
}

// out[t][o] += p.scale · Σ_j h[t][j]·S[j][o] (· mask[t][o] when has_mask) over the rank block and the group's
// columns and token rows (see the header comment). FORWARD picks S: Bᵀ (B is out_dim x rank) or A (rank x out_dim).
// SIMD-group s takes 32 output columns: their S values are 8 x 4 simdgroup matrices (64 floats per lane).
template <typename T, typename W, bool FORWARD>
inline void lora_expand_tile(device const W* h, device const W* factor, device const T* mask, device T* out,
                             constant tmf::LoraExpandParams& p, uint2 group, uint tid, uint threads, uint lane,
                             uint simd_group, threadgroup float* h_tile) {
  const uint r = p.rank, j0 = p.rank_offset, nr = p.rank_count, nr8 = (nr + TILE - 1) / TILE * TILE;
  const uint o0 = group.x * p.columns_per_group + simd_group * 32;  // this SIMD-group's first column
  const bool has_columns = o0 < p.out_dim;                          // uniform per SIMD-group
  const uint rank_tiles = nr8 / TILE;
  const LanePosition at = lane_matrix_position(lane);
  simdgroup_float8x8 s_tiles[RANK_TILES][COLUMN_TILES];  // S[j0 + 8q + row][o0 + 8c + col]: read once per group
  #pragma clang loop unroll(full)
  for (uint q = 0; q < RANK_TILES; ++q) {
    #pragma clang loop unroll(full)
    for (uint c = 0; c < COLUMN_TILES; ++c) {
      #pragma clang loop unroll(full)
      for (uint e = 0; e < 2; ++e) {
        const uint j = q * TILE + at.row, o = o0 + c * TILE + at.col + e;
        float v = 0.0f;
        if (j < nr && o < p.out_dim) {
          v = FORWARD ? float(factor[ulong(o) * r + j0 + j]) : float(factor[ulong(j0 + j) * p.out_dim + o]);
        }
        s_tiles[q][c].thread_elements()[e] = v;
      }
    }
  }
  const uint t_begin = group.y * p.tokens_per_group;
  const uint t_end = min(t_begin + p.tokens_per_group, p.tokens);
  for (uint t0 = t_begin; t0 < t_end; t0 += p.tokens_per_step) {
    const uint n = min(p.tokens_per_step, t_end - t0), n8 = (n + TILE - 1) / TILE * TILE;
    // h rows t0.., ranks j0.. -> h_tile[i * nr8 + j], zero past the rows and the rank block
    for (uint e = tid; e < n8 * nr8; e += threads) {
      const uint i = e / nr8, j = e % nr8;
      h_tile[e] = i < n && j < nr ? float(h[ulong(t0 + i) * r + j0 + j]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i0 = 0; i0 < n8 && has_columns; i0 += TILE) {
      simdgroup_float8x8 sums[COLUMN_TILES];
      #pragma clang loop unroll(full)
      for (uint c = 0; c < COLUMN_TILES; ++c) {
        sums[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      }
      #pragma clang loop unroll(full)
      for (uint q = 0; q < RANK_TILES; ++q) {
        if (q < rank_tiles) {
          simdgroup_float8x8 h_part;
          simdgroup_load(h_part, h_tile + i0 * nr8 + q * TILE, nr8);
          #pragma clang loop unroll(full)
          for (uint c = 0; c < COLUMN_TILES; ++c) {
            simdgroup_multiply_accumulate(sums[c], h_part, s_tiles[q][c], sums[c]);
          }
        }
      }
      const uint t = t0 + i0 + at.row;
      #pragma clang loop unroll(full)
      for (uint c = 0; c < COLUMN_TILES; ++c) {
        #pragma clang loop unroll(full)
        for (uint e = 0; e < 2; ++e) {
          const uint o = o0 + c * TILE + at.col + e;
          if (i0 + at.row < n && o < p.out_dim) {
            const ulong idx = ulong(t) * p.out_dim + o;
            const float m = p.has_mask != 0 ? float(mask[idx]) : 1.0f;
            out[idx] = static_cast<T>(float(out[idx]) + p.scale * sums[c].thread_elements()[e] * m);
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // h_tile is restaged by the next step
  }
}

// h = dropout(x)·Aᵀ
template <typename T, typename W, uint TG_FLOATS>
[[kernel]] void lora_forward_h(
    device const T* x [[buffer(0)]],
    device const W* lora_a [[buffer(1)]],
    device const T* mask [[buffer(2)]],
    device W* h [[buffer(3)]],
    constant tmf::LoraReduceParams& p [[buffer(4)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tiles[TG_FLOATS];
  lora_reduce_tile<T, W, true>(x, lora_a, mask, h, p, group, tid, threads, lane, simd_group, tiles);
}

// y += scale · h·Bᵀ
template <typename T, typename W, uint TG_FLOATS>
[[kernel]] void lora_forward_y(
    device const W* h [[buffer(0)]],
    device const W* lora_b [[buffer(1)]],
    device const T* mask [[buffer(2)]],
    device T* y [[buffer(3)]],
    constant tmf::LoraExpandParams& p [[buffer(4)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint2 tid [[thread_position_in_threadgroup]],  // vectors like `group`: MSL forbids mixing
    uint2 threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]]) {
  threadgroup float h_tile[TG_FLOATS];
  lora_expand_tile<T, W, true>(h, lora_b, mask, y, p, group, tid.x, threads.x, lane, simd_group, h_tile);
}

// dh = scale · dy·B
template <typename T, typename W, uint TG_FLOATS>
[[kernel]] void lora_backward_dh(
    device const T* dy [[buffer(0)]],
    device const W* lora_b [[buffer(1)]],
    device const T* mask [[buffer(2)]],
    device W* dh [[buffer(3)]],
    constant tmf::LoraReduceParams& p [[buffer(4)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]]) {
  threadgroup float tiles[TG_FLOATS];
  lora_reduce_tile<T, W, false>(dy, lora_b, mask, dh, p, group, tid, threads, lane, simd_group, tiles);
}

// dx += (dh·A) · mask
template <typename T, typename W, uint TG_FLOATS>
[[kernel]] void lora_backward_dx(
    device const W* dh [[buffer(0)]],
    device const W* lora_a [[buffer(1)]],
    device const T* mask [[buffer(2)]],
    device T* dx [[buffer(3)]],
    constant tmf::LoraExpandParams& p [[buffer(4)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint2 tid [[thread_position_in_threadgroup]],  // vectors like `group`: MSL forbids mixing
    uint2 threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]]) {
  threadgroup float h_tile[TG_FLOATS];
  lora_expand_tile<T, W, false>(dh, lora_a, mask, dx, p, group, tid.x, threads.x, lane, simd_group, h_tile);
}

template [[host_name("lora_forward_h_tg512_float")]] [[kernel]] decltype(lora_forward_h<float, float, 512>) lora_forward_h<float, float, 512>;
template [[host_name("lora_forward_h_tg1024_float")]] [[kernel]] decltype(lora_forward_h<float, float, 1024>) lora_forward_h<float, float, 1024>;
template [[host_name("lora_forward_h_tg1536_float")]] [[kernel]] decltype(lora_forward_h<float, float, 1536>) lora_forward_h<float, float, 1536>;
template [[host_name("lora_forward_h_tg2048_float")]] [[kernel]] decltype(lora_forward_h<float, float, 2048>) lora_forward_h<float, float, 2048>;
template [[host_name("lora_forward_h_tg4096_float")]] [[kernel]] decltype(lora_forward_h<float, float, 4096>) lora_forward_h<float, float, 4096>;
template [[host_name("lora_forward_h_tg8192_float")]] [[kernel]] decltype(lora_forward_h<float, float, 8192>) lora_forward_h<float, float, 8192>;
template [[host_name("lora_forward_y_tg512_float")]] [[kernel]] decltype(lora_forward_y<float, float, 512>) lora_forward_y<float, float, 512>;
template [[host_name("lora_forward_y_tg1024_float")]] [[kernel]] decltype(lora_forward_y<float, float, 1024>) lora_forward_y<float, float, 1024>;
template [[host_name("lora_forward_y_tg1536_float")]] [[kernel]] decltype(lora_forward_y<float, float, 1536>) lora_forward_y<float, float, 1536>;
template [[host_name("lora_forward_y_tg2048_float")]] [[kernel]] decltype(lora_forward_y<float, float, 2048>) lora_forward_y<float, float, 2048>;
template [[host_name("lora_forward_y_tg4096_float")]] [[kernel]] decltype(lora_forward_y<float, float, 4096>) lora_forward_y<float, float, 4096>;
template [[host_name("lora_forward_y_tg8192_float")]] [[kernel]] decltype(lora_forward_y<float, float, 8192>) lora_forward_y<float, float, 8192>;
template [[host_name("lora_backward_dh_tg512_float")]] [[kernel]] decltype(lora_backward_dh<float, float, 512>) lora_backward_dh<float, float, 512>;
template [[host_name("lora_backward_dh_tg1024_float")]] [[kernel]] decltype(lora_backward_dh<float, float, 1024>) lora_backward_dh<float, float, 1024>;
template [[host_name("lora_backward_dh_tg1536_float")]] [[kernel]] decltype(lora_backward_dh<float, float, 1536>) lora_backward_dh<float, float, 1536>;
template [[host_name("lora_backward_dh_tg2048_float")]] [[kernel]] decltype(lora_backward_dh<float, float, 2048>) lora_backward_dh<float, float, 2048>;
template [[host_name("lora_backward_dh_tg4096_float")]] [[kernel]] decltype(lora_backward_dh<float, float, 4096>) lora_backward_dh<float, float, 4096>;
template [[host_name("lora_backward_dh_tg8192_float")]] [[kernel]] decltype(lora_backward_dh<float, float, 8192>) lora_backward_dh<float, float, 8192>;
template [[host_name("lora_backward_dx_tg512_float")]] [[kernel]] decltype(lora_backward_dx<float, float, 512>) lora_backward_dx<float, float, 512>;
template [[host_name("lora_backward_dx_tg1024_float")]] [[kernel]] decltype(lora_backward_dx<float, float, 1024>) lora_backward_dx<float, float, 1024>;
template [[host_name("lora_backward_dx_tg1536_float")]] [[kernel]] decltype(lora_backward_dx<float, float, 1536>) lora_backward_dx<float, float, 1536>;
template [[host_name("lora_backward_dx_tg2048_float")]] [[kernel]] decltype(lora_backward_dx<float, float, 2048>) lora_backward_dx<float, float, 2048>;
template [[host_name("lora_backward_dx_tg4096_float")]] [[kernel]] decltype(lora_backward_dx<float, float, 4096>) lora_backward_dx<float, float, 4096>;
template [[host_name("lora_backward_dx_tg8192_float")]] [[kernel]] decltype(lora_backward_dx<float, float, 8192>) lora_backward_dx<float, float, 8192>;
template [[host_name("lora_forward_h_tg512_half")]] [[kernel]] decltype(lora_forward_h<half, half, 512>) lora_forward_h<half, half, 512>;
template [[host_name("lora_forward_h_tg1024_half")]] [[kernel]] decltype(lora_forward_h<half, half, 1024>) lora_forward_h<half, half, 1024>;
template [[host_name("lora_forward_h_tg1536_half")]] [[kernel]] decltype(lora_forward_h<half, half, 1536>) lora_forward_h<half, half, 1536>;
template [[host_name("lora_forward_h_tg2048_half")]] [[kernel]] decltype(lora_forward_h<half, half, 2048>) lora_forward_h<half, half, 2048>;
template [[host_name("lora_forward_h_tg4096_half")]] [[kernel]] decltype(lora_forward_h<half, half, 4096>) lora_forward_h<half, half, 4096>;
template [[host_name("lora_forward_h_tg8192_half")]] [[kernel]] decltype(lora_forward_h<half, half, 8192>) lora_forward_h<half, half, 8192>;
template [[host_name("lora_forward_y_tg512_half")]] [[kernel]] decltype(lora_forward_y<half, half, 512>) lora_forward_y<half, half, 512>;
template [[host_name("lora_forward_y_tg1024_half")]] [[kernel]] decltype(lora_forward_y<half, half, 1024>) lora_forward_y<half, half, 1024>;
template [[host_name("lora_forward_y_tg1536_half")]] [[kernel]] decltype(lora_forward_y<half, half, 1536>) lora_forward_y<half, half, 1536>;
template [[host_name("lora_forward_y_tg2048_half")]] [[kernel]] decltype(lora_forward_y<half, half, 2048>) lora_forward_y<half, half, 2048>;
template [[host_name("lora_forward_y_tg4096_half")]] [[kernel]] decltype(lora_forward_y<half, half, 4096>) lora_forward_y<half, half, 4096>;
template [[host_name("lora_forward_y_tg8192_half")]] [[kernel]] decltype(lora_forward_y<half, half, 8192>) lora_forward_y<half, half, 8192>;
template [[host_name("lora_backward_dh_tg512_half")]] [[kernel]] decltype(lora_backward_dh<half, half, 512>) lora_backward_dh<half, half, 512>;
template [[host_name("lora_backward_dh_tg1024_half")]] [[kernel]] decltype(lora_backward_dh<half, half, 1024>) lora_backward_dh<half, half, 1024>;
template [[host_name("lora_backward_dh_tg1536_half")]] [[kernel]] decltype(lora_backward_dh<half, half, 1536>) lora_backward_dh<half, half, 1536>;
template [[host_name("lora_backward_dh_tg2048_half")]] [[kernel]] decltype(lora_backward_dh<half, half, 2048>) lora_backward_dh<half, half, 2048>;
template [[host_name("lora_backward_dh_tg4096_half")]] [[kernel]] decltype(lora_backward_dh<half, half, 4096>) lora_backward_dh<half, half, 4096>;
template [[host_name("lora_backward_dh_tg8192_half")]] [[kernel]] decltype(lora_backward_dh<half, half, 8192>) lora_backward_dh<half, half, 8192>;
template [[host_name("lora_backward_dx_tg512_half")]] [[kernel]] decltype(lora_backward_dx<half, half, 512>) lora_backward_dx<half, half, 512>;
template [[host_name("lora_backward_dx_tg1024_half")]] [[kernel]] decltype(lora_backward_dx<half, half, 1024>) lora_backward_dx<half, half, 1024>;
template [[host_name("lora_backward_dx_tg1536_half")]] [[kernel]] decltype(lora_backward_dx<half, half, 1536>) lora_backward_dx<half, half, 1536>;
template [[host_name("lora_backward_dx_tg2048_half")]] [[kernel]] decltype(lora_backward_dx<half, half, 2048>) lora_backward_dx<half, half, 2048>;
template [[host_name("lora_backward_dx_tg4096_half")]] [[kernel]] decltype(lora_backward_dx<half, half, 4096>) lora_backward_dx<half, half, 4096>;
template [[host_name("lora_backward_dx_tg8192_half")]] [[kernel]] decltype(lora_backward_dx<half, half, 8192>) lora_backward_dx<half, half, 8192>;
template [[host_name("lora_forward_h_tg512_float_adapters_half")]] [[kernel]] decltype(lora_forward_h<half, float, 512>) lora_forward_h<half, float, 512>;
template [[host_name("lora_forward_h_tg1024_float_adapters_half")]] [[kernel]] decltype(lora_forward_h<half, float, 1024>) lora_forward_h<half, float, 1024>;
template [[host_name("lora_forward_h_tg1536_float_adapters_half")]] [[kernel]] decltype(lora_forward_h<half, float, 1536>) lora_forward_h<half, float, 1536>;
template [[host_name("lora_forward_h_tg2048_float_adapters_half")]] [[kernel]] decltype(lora_forward_h<half, float, 2048>) lora_forward_h<half, float, 2048>;
template [[host_name("lora_forward_h_tg4096_float_adapters_half")]] [[kernel]] decltype(lora_forward_h<half, float, 4096>) lora_forward_h<half, float, 4096>;
template [[host_name("lora_forward_h_tg8192_float_adapters_half")]] [[kernel]] decltype(lora_forward_h<half, float, 8192>) lora_forward_h<half, float, 8192>;
template [[host_name("lora_forward_y_tg512_float_adapters_half")]] [[kernel]] decltype(lora_forward_y<half, float, 512>) lora_forward_y<half, float, 512>;
template [[host_name("lora_forward_y_tg1024_float_adapters_half")]] [[kernel]] decltype(lora_forward_y<half, float, 1024>) lora_forward_y<half, float, 1024>;
template [[host_name("lora_forward_y_tg1536_float_adapters_half")]] [[kernel]] decltype(lora_forward_y<half, float, 1536>) lora_forward_y<half, float, 1536>;
template [[host_name("lora_forward_y_tg2048_float_adapters_half")]] [[kernel]] decltype(lora_forward_y<half, float, 2048>) lora_forward_y<half, float, 2048>;
template [[host_name("lora_forward_y_tg4096_float_adapters_half")]] [[kernel]] decltype(lora_forward_y<half, float, 4096>) lora_forward_y<half, float, 4096>;
template [[host_name("lora_forward_y_tg8192_float_adapters_half")]] [[kernel]] decltype(lora_forward_y<half, float, 8192>) lora_forward_y<half, float, 8192>;
template [[host_name("lora_backward_dh_tg512_float_adapters_half")]] [[kernel]] decltype(lora_backward_dh<half, float, 512>) lora_backward_dh<half, float, 512>;
template [[host_name("lora_backward_dh_tg1024_float_adapters_half")]] [[kernel]] decltype(lora_backward_dh<half, float, 1024>) lora_backward_dh<half, float, 1024>;
template [[host_name("lora_backward_dh_tg1536_float_adapters_half")]] [[kernel]] decltype(lora_backward_dh<half, float, 1536>) lora_backward_dh<half, float, 1536>;
template [[host_name("lora_backward_dh_tg2048_float_adapters_half")]] [[kernel]] decltype(lora_backward_dh<half, float, 2048>) lora_backward_dh<half, float, 2048>;
template [[host_name("lora_backward_dh_tg4096_float_adapters_half")]] [[kernel]] decltype(lora_backward_dh<half, float, 4096>) lora_backward_dh<half, float, 4096>;
template [[host_name("lora_backward_dh_tg8192_float_adapters_half")]] [[kernel]] decltype(lora_backward_dh<half, float, 8192>) lora_backward_dh<half, float, 8192>;
template [[host_name("lora_backward_dx_tg512_float_adapters_half")]] [[kernel]] decltype(lora_backward_dx<half, float, 512>) lora_backward_dx<half, float, 512>;
template [[host_name("lora_backward_dx_tg1024_float_adapters_half")]] [[kernel]] decltype(lora_backward_dx<half, float, 1024>) lora_backward_dx<half, float, 1024>;
template [[host_name("lora_backward_dx_tg1536_float_adapters_half")]] [[kernel]] decltype(lora_backward_dx<half, float, 1536>) lora_backward_dx<half, float, 1536>;
template [[host_name("lora_backward_dx_tg2048_float_adapters_half")]] [[kernel]] decltype(lora_backward_dx<half, float, 2048>) lora_backward_dx<half, float, 2048>;
template [[host_name("lora_backward_dx_tg4096_float_adapters_half")]] [[kernel]] decltype(lora_backward_dx<half, float, 4096>) lora_backward_dx<half, float, 4096>;
template [[host_name("lora_backward_dx_tg8192_float_adapters_half")]] [[kernel]] decltype(lora_backward_dx<half, float, 8192>) lora_backward_dx<half, float, 8192>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("lora_forward_h_tg512_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, bfloat, 512>) lora_forward_h<bfloat, bfloat, 512>;
template [[host_name("lora_forward_h_tg1024_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, bfloat, 1024>) lora_forward_h<bfloat, bfloat, 1024>;
template [[host_name("lora_forward_h_tg1536_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, bfloat, 1536>) lora_forward_h<bfloat, bfloat, 1536>;
template [[host_name("lora_forward_h_tg2048_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, bfloat, 2048>) lora_forward_h<bfloat, bfloat, 2048>;
template [[host_name("lora_forward_h_tg4096_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, bfloat, 4096>) lora_forward_h<bfloat, bfloat, 4096>;
template [[host_name("lora_forward_h_tg8192_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, bfloat, 8192>) lora_forward_h<bfloat, bfloat, 8192>;
template [[host_name("lora_forward_y_tg512_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, bfloat, 512>) lora_forward_y<bfloat, bfloat, 512>;
template [[host_name("lora_forward_y_tg1024_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, bfloat, 1024>) lora_forward_y<bfloat, bfloat, 1024>;
template [[host_name("lora_forward_y_tg1536_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, bfloat, 1536>) lora_forward_y<bfloat, bfloat, 1536>;
template [[host_name("lora_forward_y_tg2048_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, bfloat, 2048>) lora_forward_y<bfloat, bfloat, 2048>;
template [[host_name("lora_forward_y_tg4096_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, bfloat, 4096>) lora_forward_y<bfloat, bfloat, 4096>;
template [[host_name("lora_forward_y_tg8192_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, bfloat, 8192>) lora_forward_y<bfloat, bfloat, 8192>;
template [[host_name("lora_backward_dh_tg512_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, bfloat, 512>) lora_backward_dh<bfloat, bfloat, 512>;
template [[host_name("lora_backward_dh_tg1024_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, bfloat, 1024>) lora_backward_dh<bfloat, bfloat, 1024>;
template [[host_name("lora_backward_dh_tg1536_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, bfloat, 1536>) lora_backward_dh<bfloat, bfloat, 1536>;
template [[host_name("lora_backward_dh_tg2048_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, bfloat, 2048>) lora_backward_dh<bfloat, bfloat, 2048>;
template [[host_name("lora_backward_dh_tg4096_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, bfloat, 4096>) lora_backward_dh<bfloat, bfloat, 4096>;
template [[host_name("lora_backward_dh_tg8192_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, bfloat, 8192>) lora_backward_dh<bfloat, bfloat, 8192>;
template [[host_name("lora_backward_dx_tg512_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, bfloat, 512>) lora_backward_dx<bfloat, bfloat, 512>;
template [[host_name("lora_backward_dx_tg1024_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, bfloat, 1024>) lora_backward_dx<bfloat, bfloat, 1024>;
template [[host_name("lora_backward_dx_tg1536_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, bfloat, 1536>) lora_backward_dx<bfloat, bfloat, 1536>;
template [[host_name("lora_backward_dx_tg2048_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, bfloat, 2048>) lora_backward_dx<bfloat, bfloat, 2048>;
template [[host_name("lora_backward_dx_tg4096_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, bfloat, 4096>) lora_backward_dx<bfloat, bfloat, 4096>;
template [[host_name("lora_backward_dx_tg8192_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, bfloat, 8192>) lora_backward_dx<bfloat, bfloat, 8192>;
template [[host_name("lora_forward_h_tg512_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, float, 512>) lora_forward_h<bfloat, float, 512>;
template [[host_name("lora_forward_h_tg1024_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, float, 1024>) lora_forward_h<bfloat, float, 1024>;
template [[host_name("lora_forward_h_tg1536_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, float, 1536>) lora_forward_h<bfloat, float, 1536>;
template [[host_name("lora_forward_h_tg2048_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, float, 2048>) lora_forward_h<bfloat, float, 2048>;
template [[host_name("lora_forward_h_tg4096_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, float, 4096>) lora_forward_h<bfloat, float, 4096>;
template [[host_name("lora_forward_h_tg8192_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_h<bfloat, float, 8192>) lora_forward_h<bfloat, float, 8192>;
template [[host_name("lora_forward_y_tg512_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, float, 512>) lora_forward_y<bfloat, float, 512>;
template [[host_name("lora_forward_y_tg1024_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, float, 1024>) lora_forward_y<bfloat, float, 1024>;
template [[host_name("lora_forward_y_tg1536_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, float, 1536>) lora_forward_y<bfloat, float, 1536>;
template [[host_name("lora_forward_y_tg2048_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, float, 2048>) lora_forward_y<bfloat, float, 2048>;
template [[host_name("lora_forward_y_tg4096_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, float, 4096>) lora_forward_y<bfloat, float, 4096>;
template [[host_name("lora_forward_y_tg8192_float_adapters_bfloat")]] [[kernel]] decltype(lora_forward_y<bfloat, float, 8192>) lora_forward_y<bfloat, float, 8192>;
template [[host_name("lora_backward_dh_tg512_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, float, 512>) lora_backward_dh<bfloat, float, 512>;
template [[host_name("lora_backward_dh_tg1024_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, float, 1024>) lora_backward_dh<bfloat, float, 1024>;
template [[host_name("lora_backward_dh_tg1536_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, float, 1536>) lora_backward_dh<bfloat, float, 1536>;
template [[host_name("lora_backward_dh_tg2048_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, float, 2048>) lora_backward_dh<bfloat, float, 2048>;
template [[host_name("lora_backward_dh_tg4096_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, float, 4096>) lora_backward_dh<bfloat, float, 4096>;
template [[host_name("lora_backward_dh_tg8192_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dh<bfloat, float, 8192>) lora_backward_dh<bfloat, float, 8192>;
template [[host_name("lora_backward_dx_tg512_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, float, 512>) lora_backward_dx<bfloat, float, 512>;
template [[host_name("lora_backward_dx_tg1024_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, float, 1024>) lora_backward_dx<bfloat, float, 1024>;
template [[host_name("lora_backward_dx_tg1536_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, float, 1536>) lora_backward_dx<bfloat, float, 1536>;
template [[host_name("lora_backward_dx_tg2048_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, float, 2048>) lora_backward_dx<bfloat, float, 2048>;
template [[host_name("lora_backward_dx_tg4096_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, float, 4096>) lora_backward_dx<bfloat, float, 4096>;
template [[host_name("lora_backward_dx_tg8192_float_adapters_bfloat")]] [[kernel]] decltype(lora_backward_dx<bfloat, float, 8192>) lora_backward_dx<bfloat, float, 8192>;
#endif
