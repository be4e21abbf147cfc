// LoRA low-rank kernels in float32, float16 and bfloat16 (accumulation in float32).
// Launch code: csrc/include/tmf/launch/lora_linear.h. The big GEMMs are the platform's native matmul.
//
// Forward, one threadgroup per token row (up to 256 threads), one dispatch per op call after the base GEMM:
//   h = dropout(x)·Aᵀ: each thread walks its columns k of x, accumulating 16 rank entries at a time in
//   registers (x is read ceil(r/16) times per row, A once per row); simd_sum + one threadgroup exchange per
//   16 entries; h is kept in threadgroup memory (float) and written out (r values) for backward.
//   y += scale · h·Bᵀ in place: each thread owns output columns o, reading B's row o (r values) and y[o]
//   once. Never recomputes x·A per output element.
//   Traffic per row: in·sizeof(T)·ceil(r/16) (x) + r·in·sizeof(T) (A) + out·r·sizeof(T) (B) + 2·out·sizeof(T)
//   (y read and written) + r·sizeof(T) (h); A and B are re-read by every row (served from cache on a GPU).
// Backward (lora_backward_lowrank_dx / _dh): dh = scale · dy·B (same rank-chunked reduction over out), written
//   out for dA = dhᵀ·dropout(x) by the native GEMM; the _dx variant then adds (dh·A)·mask into dx in place
//   (dx holds dy·W from the native GEMM).
#include <metal_stdlib>
#include "tmf/shader_args.h"
using namespace metal;

constant constexpr uint RANK_CHUNK = 16;   // rank entries accumulated per pass
constant constexpr uint MAX_RANK = 256;    // tmf::launch::kLoraMaxRank

// sum over the threadgroup of acc[j] for j < n, into out[j0 + j] (threadgroup memory), scaled.
inline void reduce_rank_chunk(thread float* acc, uint n, uint j0, float scale, threadgroup float* partial,
                              threadgroup float* out, uint tid, uint lane, uint simd_group, uint n_simd) {
  for (uint j = 0; j < n; ++j) {
    const float s = simd_sum(acc[j]);
    if (lane == 0) {
      partial[j * 32 + simd_group] = s;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < n) {
    float s = 0.0f;
    for (uint g = 0; g < n_simd; ++g) {
      s += partial[tid * 32 + g];
    }
    out[j0 + tid] = s * scale;
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
    uint token [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[RANK_CHUNK * 32];
  threadgroup float h_row[MAX_RANK];
  device const T* xr = x + ulong(token) * p.x_row_stride;
  device const T* mr = mask + ulong(token) * p.in_features;
  for (uint j0 = 0; j0 < p.rank; j0 += RANK_CHUNK) {
    const uint n = min(RANK_CHUNK, p.rank - j0);
    float acc[RANK_CHUNK];
    for (uint j = 0; j < RANK_CHUNK; ++j) {
      acc[j] = 0.0f;
    }
    for (uint k = tid; k < p.in_features; k += threads) {
      float xv = float(xr[k]);
      if (p.has_mask != 0) {
        xv *= float(mr[k]);
      }
      device const T* a = lora_a + ulong(j0) * p.in_features + k;
      for (uint j = 0; j < n; ++j) {
        acc[j] += xv * float(a[ulong(j) * p.in_features]);
      }
    }
    reduce_rank_chunk(acc, n, j0, 1.0f, partial, h_row, tid, lane, simd_group, n_simd);
  }
  for (uint j = tid; j < p.rank; j += threads) {
    h[ulong(token) * p.rank + j] = static_cast<T>(h_row[j]);
  }
  device T* yr = y + ulong(token) * p.out_features;
  for (uint o = tid; o < p.out_features; o += threads) {
    device const T* b = lora_b + ulong(o) * p.rank;
    float acc = 0.0f;
    for (uint j = 0; j < p.rank; ++j) {
      acc += h_row[j] * float(b[j]);
    }
    yr[o] = static_cast<T>(float(yr[o]) + p.scale * acc);
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
    uint token [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[RANK_CHUNK * 32];
  threadgroup float dh_row[MAX_RANK];
  device const T* dyr = dy + ulong(token) * p.dy_row_stride;
  for (uint j0 = 0; j0 < p.rank; j0 += RANK_CHUNK) {
    const uint n = min(RANK_CHUNK, p.rank - j0);
    float acc[RANK_CHUNK];
    for (uint j = 0; j < RANK_CHUNK; ++j) {
      acc[j] = 0.0f;
    }
    for (uint o = tid; o < p.out_features; o += threads) {
      const float g = float(dyr[o]);
      device const T* b = lora_b + ulong(o) * p.rank + j0;
      for (uint j = 0; j < n; ++j) {
        acc[j] += g * float(b[j]);
      }
    }
    reduce_rank_chunk(acc, n, j0, p.scale, partial, dh_row, tid, lane, simd_group, n_simd);
  }
  for (uint j = tid; j < p.rank; j += threads) {
    dh[ulong(token) * p.rank + j] = static_cast<T>(dh_row[j]);
  }
  if (DX) {
    device T* dxr = dx + ulong(token) * p.in_features;
    device const T* mr = mask + ulong(token) * p.in_features;
    for (uint k = tid; k < p.in_features; k += threads) {
      float acc = 0.0f;
      for (uint j = 0; j < p.rank; ++j) {
        acc += dh_row[j] * float(lora_a[ulong(j) * p.in_features + k]);
      }
      if (p.has_mask != 0) {
        acc *= float(mr[k]);
      }
      dxr[k] = static_cast<T>(float(dxr[k]) + acc);
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
