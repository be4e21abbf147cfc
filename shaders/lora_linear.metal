// LoRA low-rank kernels in float32, float16 and bfloat16 (accumulation in float32).
// Launch code: csrc/include/tmf/launch/lora_linear.h. The big GEMMs are the platform's native matmul.
//
// One threadgroup (up to 256 threads) per kLoraTokensPerGroup (4) token rows, one dispatch per op call.
// Forward, after the base GEMM wrote y = x·Wᵀ + bias:
//   h = dropout(x)·Aᵀ: each thread walks its columns k, loads A[j, k] for 16 rank entries once and uses it for
//   the group's 4 rows (16 x 4 accumulators in registers); x is read ceil(r/16) times per row, A once per group.
//   simd_sum + one threadgroup exchange per 16 entries; h stays in threadgroup memory (float) and is written out
//   (r values per row) for backward.
//   y += scale · h·Bᵀ in place: each thread owns output columns o, reading B's row o once for the 4 rows and
//   y[o] of each row once. Never recomputes x·A per output element.
//   Traffic per row: in·sizeof(T)·ceil(r/16) (x) + r·in·sizeof(T)/4 (A) + out·r·sizeof(T)/4 (B) + 2·out·sizeof(T)
//   (y read and written) + r·sizeof(T) (h).
// Backward (lora_backward_lowrank_dx / _dh): dh = scale · dy·B (the same rank-chunked reduction over out, B read
//   once per group), written out for dA = dhᵀ·dropout(x) by the native GEMM; the _dx variant then adds
//   (dh·A)·mask into dx in place (dx holds dy·W), reading A once per group.
#include <metal_stdlib>
#include "tmf/shader_args.h"
using namespace metal;

constant constexpr uint TM = tmf::kLoraTokensPerGroup;
constant constexpr uint RANK_CHUNK = tmf::kLoraRankChunk;
constant constexpr uint MAX_RANK = tmf::kLoraMaxRank;

// Sums acc[t][j] (t < nt, j < n) over the threadgroup into out[t * MAX_RANK + j0 + j] (threadgroup memory), scaled.
inline void reduce_rank_chunk(thread float (*acc)[RANK_CHUNK], uint nt, uint n, uint j0, float scale,
                              threadgroup float* partial, threadgroup float* out, uint tid, uint threads, uint lane,
                              uint simd_group, uint n_simd) {
  for (uint t = 0; t < TM; ++t) {
    if (t < nt) {
      for (uint j = 0; j < n; ++j) {
        const float s = simd_sum(acc[t][j]);
        if (lane == 0) {
          partial[(t * RANK_CHUNK + j) * 32 + simd_group] = s;
        }
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint idx = tid; idx < nt * n; idx += threads) {
    const uint t = idx / n, j = idx % n;
    float s = 0.0f;
    for (uint g = 0; g < n_simd; ++g) {
      s += partial[(t * RANK_CHUNK + j) * 32 + g];
    }
    out[t * MAX_RANK + j0 + j] = s * scale;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // `partial` is reused by the next chunk
}

template <typename T>
[[kernel]] void lora_forward_lowrank_row(
    device const T* x [[buffer(0)]],
    device const T* lora_a [[buffer(1)]],
    device const T* lora_b [[buffer(2)]],
    device const T* mask [[buffer(3)]],
    device T* y [[buffer(4)]],
    device T* h [[buffer(5)]],
    constant tmf::LoraParams& p [[buffer(6)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[TM * RANK_CHUNK * 32];
  threadgroup float h_rows[TM * MAX_RANK];
  const uint t0 = group * TM;
  const uint nt = min(TM, p.tokens - t0);  // rows of this group, uniform across the threadgroup
  for (uint j0 = 0; j0 < p.rank; j0 += RANK_CHUNK) {
    const uint n = min(RANK_CHUNK, p.rank - j0);
    float acc[TM][RANK_CHUNK];
    for (uint t = 0; t < TM; ++t) {
      for (uint j = 0; j < RANK_CHUNK; ++j) {
        acc[t][j] = 0.0f;
      }
    }
    for (uint k = tid; k < p.in_features; k += threads) {
      float a[RANK_CHUNK];
      for (uint j = 0; j < n; ++j) {
        a[j] = float(lora_a[ulong(j0 + j) * p.in_features + k]);
      }
      for (uint t = 0; t < TM; ++t) {
        if (t < nt) {
          const ulong row = t0 + t;
          float xv = float(x[row * p.x_row_stride + k]);
          if (p.has_mask != 0) {
            xv *= float(mask[row * p.in_features + k]);
          }
          for (uint j = 0; j < n; ++j) {
            acc[t][j] += xv * a[j];
          }
        }
      }
    }
    reduce_rank_chunk(acc, nt, n, j0, 1.0f, partial, h_rows, tid, threads, lane, simd_group, n_simd);
  }
  for (uint idx = tid; idx < nt * p.rank; idx += threads) {
    const uint t = idx / p.rank, j = idx % p.rank;
    h[ulong(t0 + t) * p.rank + j] = static_cast<T>(h_rows[t * MAX_RANK + j]);
  }
  for (uint o = tid; o < p.out_features; o += threads) {
    device const T* b = lora_b + ulong(o) * p.rank;
    float acc[TM];
    for (uint t = 0; t < TM; ++t) {
      acc[t] = 0.0f;
    }
    for (uint j = 0; j < p.rank; ++j) {
      const float bj = float(b[j]);
      for (uint t = 0; t < TM; ++t) {
        acc[t] += t < nt ? h_rows[t * MAX_RANK + j] * bj : 0.0f;  // rows past the end have no h
      }
    }
    for (uint t = 0; t < TM; ++t) {
      if (t < nt) {
        device T* yo = y + ulong(t0 + t) * p.out_features + o;
        *yo = static_cast<T>(float(*yo) + p.scale * acc[t]);
      }
    }
  }
}

template <typename T, bool DX>
[[kernel]] void lora_backward_lowrank_row(
    device const T* dy [[buffer(0)]],
    device const T* lora_a [[buffer(1)]],
    device const T* lora_b [[buffer(2)]],
    device const T* mask [[buffer(3)]],
    device T* dh [[buffer(4)]],
    device T* dx [[buffer(5)]],
    constant tmf::LoraParams& p [[buffer(6)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[TM * RANK_CHUNK * 32];
  threadgroup float dh_rows[TM * MAX_RANK];
  const uint t0 = group * TM;
  const uint nt = min(TM, p.tokens - t0);
  for (uint j0 = 0; j0 < p.rank; j0 += RANK_CHUNK) {
    const uint n = min(RANK_CHUNK, p.rank - j0);
    float acc[TM][RANK_CHUNK];
    for (uint t = 0; t < TM; ++t) {
      for (uint j = 0; j < RANK_CHUNK; ++j) {
        acc[t][j] = 0.0f;
      }
    }
    for (uint o = tid; o < p.out_features; o += threads) {
      float b[RANK_CHUNK];
      for (uint j = 0; j < n; ++j) {
        b[j] = float(lora_b[ulong(o) * p.rank + j0 + j]);
      }
      for (uint t = 0; t < TM; ++t) {
        if (t < nt) {
          const float g = float(dy[ulong(t0 + t) * p.dy_row_stride + o]);
          for (uint j = 0; j < n; ++j) {
            acc[t][j] += g * b[j];
          }
        }
      }
    }
    reduce_rank_chunk(acc, nt, n, j0, p.scale, partial, dh_rows, tid, threads, lane, simd_group, n_simd);
  }
  for (uint idx = tid; idx < nt * p.rank; idx += threads) {
    const uint t = idx / p.rank, j = idx % p.rank;
    dh[ulong(t0 + t) * p.rank + j] = static_cast<T>(dh_rows[t * MAX_RANK + j]);
  }
  if (DX) {
    for (uint k = tid; k < p.in_features; k += threads) {
      float acc[TM];
      for (uint t = 0; t < TM; ++t) {
        acc[t] = 0.0f;
      }
      for (uint j = 0; j < p.rank; ++j) {
        const float aj = float(lora_a[ulong(j) * p.in_features + k]);
        for (uint t = 0; t < TM; ++t) {
          acc[t] += t < nt ? dh_rows[t * MAX_RANK + j] * aj : 0.0f;
        }
      }
      for (uint t = 0; t < TM; ++t) {
        if (t < nt) {
          const ulong at = ulong(t0 + t) * p.in_features + k;
          const float m = p.has_mask != 0 ? float(mask[at]) : 1.0f;
          dx[at] = static_cast<T>(float(dx[at]) + acc[t] * m);
        }
      }
    }
  }
}

template [[host_name("lora_forward_lowrank_row_float")]] [[kernel]] decltype(lora_forward_lowrank_row<float>) lora_forward_lowrank_row<float>;
template [[host_name("lora_forward_lowrank_row_half")]] [[kernel]] decltype(lora_forward_lowrank_row<half>) lora_forward_lowrank_row<half>;
template [[host_name("lora_backward_lowrank_dx_row_float")]] [[kernel]] decltype(lora_backward_lowrank_row<float, true>) lora_backward_lowrank_row<float, true>;
template [[host_name("lora_backward_lowrank_dx_row_half")]] [[kernel]] decltype(lora_backward_lowrank_row<half, true>) lora_backward_lowrank_row<half, true>;
template [[host_name("lora_backward_lowrank_dh_row_float")]] [[kernel]] decltype(lora_backward_lowrank_row<float, false>) lora_backward_lowrank_row<float, false>;
template [[host_name("lora_backward_lowrank_dh_row_half")]] [[kernel]] decltype(lora_backward_lowrank_row<half, false>) lora_backward_lowrank_row<half, false>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("lora_forward_lowrank_row_bfloat")]] [[kernel]] decltype(lora_forward_lowrank_row<bfloat>) lora_forward_lowrank_row<bfloat>;
template [[host_name("lora_backward_lowrank_dx_row_bfloat")]] [[kernel]] decltype(lora_backward_lowrank_row<bfloat, true>) lora_backward_lowrank_row<bfloat, true>;
template [[host_name("lora_backward_lowrank_dh_row_bfloat")]] [[kernel]] decltype(lora_backward_lowrank_row<bfloat, false>) lora_backward_lowrank_row<bfloat, false>;
#endif
