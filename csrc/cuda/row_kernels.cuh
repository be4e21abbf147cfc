// Row kernels for the CUDA backend: softmax forward/backward and RMSNorm forward/backward.
//
// One block per row (RMSNorm backward: one block per block of rows). Each thread owns ITEMS vectors of VEC
// elements (16-byte loads where the rows are 16-byte aligned) held in registers, so every input is read once
// and every output written once; rows too long for registers (ITEMS > 8) use the looped variants, which read
// the input twice. Statistics in float32. Block reductions: warp shuffles, then one float per warp in shared
// memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cp_async.cuh"

namespace tmf::cuda {

constexpr int kMaxItems = 8;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half(v);
}

// VEC elements starting at `col` of a row: a 16-byte load when the whole vector is inside the row (rows are
// 16-byte aligned whenever VEC > 1), element by element at the row's end; `fill` outside the row.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* row, int col, int cols, float (&out)[VEC], float fill) {
  if (VEC > 1 && col + VEC <= cols) {
    struct alignas(sizeof(T) * VEC) Pack {
      T v[VEC];
    };
    Pack p = *reinterpret_cast<const Pack*>(row + col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = col + k < cols ? to_float(row[col + k]) : fill;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* row, int col, int cols, const float (&in)[VEC]) {
  if (VEC > 1 && col + VEC <= cols) {
    struct alignas(sizeof(T) * VEC) Pack {
      T v[VEC];
    };
    Pack p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Pack*>(row + col) = p;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (col + k < cols) row[col + k] = from_float<T>(in[k]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum/max; `scratch` holds 32 floats. The leading sync lets back-to-back calls share scratch.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? scratch[lane] : (MAX ? -INFINITY : 0.0f);
  return MAX ? warp_max(r) : warp_sum(r);
}

// Two block-wide sums at once (one pair of barriers for two rows).
__device__ __forceinline__ float2 block_sum2(float2 v, float2* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float2 r = lane < nwarps ? scratch[lane] : make_float2(0.0f, 0.0f);
  return make_float2(warp_sum(r.x), warp_sum(r.y));
}

// NaN-propagating max, as torch's softmax (a NaN anywhere makes the row NaN).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : (b != b ? b : fmaxf(a, b)); }

// ---- softmax --------------------------------------------------------------------------------------------
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(512) softmax_forward_registers(const T* __restrict__ x, T* __restrict__ y, int cols, int64_t x_stride) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  float v[ITEMS][VEC];
  float m = -INFINITY;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
    load_vec<T, VEC>(xr, col, cols, v[it], -INFINITY);
#pragma unroll
    for (int k = 0; k < VEC; ++k) m = nan_max(m, v[it][k]);
  }
  m = block_reduce<true>(m, scratch);
  float s = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[it][k] = col + k < cols ? __expf(v[it][k] - m) : 0.0f;
      s += v[it][k];
    }
  }
  const float inv = 1.0f / block_reduce<false>(s, scratch);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[it][k] *= inv;
    store_vec<T, VEC>(yr, (it * blockDim.x + threadIdx.x) * VEC, cols, v[it]);
  }
}

template <typename T>
__global__ void softmax_forward_looped(const T* __restrict__ x, T* __restrict__ y, int cols, int64_t x_stride) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  float m = -INFINITY;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) m = nan_max(m, to_float(xr[c]));
  m = block_reduce<true>(m, scratch);
  float s = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) s += __expf(to_float(xr[c]) - m);
  const float inv = 1.0f / block_reduce<false>(s, scratch);
  for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = from_float<T>(__expf(to_float(xr[c]) - m) * inv);
}

// softmax_backward_registers: below, with the vector kernels (one kernel for both load policies).

template <typename T>
__global__ void softmax_backward_looped(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                                        int cols, int64_t dy_stride) {
  __shared__ float scratch[32];
  const T* yr = y + blockIdx.x * int64_t(cols);
  const T* dyr = dy + blockIdx.x * dy_stride;
  T* dxr = dx + blockIdx.x * int64_t(cols);
  float dot = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += to_float(yr[c]) * to_float(dyr[c]);
  dot = block_reduce<false>(dot, scratch);
  for (int c = threadIdx.x; c < cols; c += blockDim.x)
    dxr[c] = from_float<T>(to_float(yr[c]) * (to_float(dyr[c]) - dot));
}

// ---- RMSNorm --------------------------------------------------------------------------------------------
// ADD (add_rms_norm): the row normalised is h = x + res, rounded to T as torch's add rounds it, and h is written to
// `h` (contiguous rows) in the same pass; without ADD `res`/`h` are unused.
template <typename T, int VEC, int ITEMS, bool ADD = false>
__global__ void __launch_bounds__(512) rms_norm_forward_registers(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                           float* __restrict__ rstd, int cols, int64_t x_stride, float eps,
                                           float offset, const T* __restrict__ res = nullptr, int64_t res_stride = 0,
                                           T* __restrict__ h = nullptr) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  float v[ITEMS][VEC];
  float ss = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
    load_vec<T, VEC>(xr, col, cols, v[it], 0.0f);
    if constexpr (ADD) {
      float rv[VEC];
      load_vec<T, VEC>(res + blockIdx.x * res_stride, col, cols, rv, 0.0f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[it][k] = to_float(from_float<T>(v[it][k] + rv[k]));
      store_vec<T, VEC>(h + blockIdx.x * int64_t(cols), col, cols, v[it]);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) ss += v[it][k] * v[it][k];
  }
  const float r = rsqrtf(block_reduce<false>(ss, scratch) / float(cols) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
    float wv[VEC];
    if (w != nullptr) {
      load_vec<T, VEC>(w, col, cols, wv, 0.0f);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) wv[k] = 1.0f - offset;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[it][k] = v[it][k] * r * (wv[k] + offset);
    store_vec<T, VEC>(yr, col, cols, v[it]);
  }
}

// ADD: pass 1 writes h = x + res (rounded to T) and pass 2 reads it back (each thread its own columns).
template <typename T, bool ADD = false>
__global__ void rms_norm_forward_looped(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                        float* __restrict__ rstd, int cols, int64_t x_stride, float eps, float offset,
                                        const T* __restrict__ res = nullptr, int64_t res_stride = 0, T* h = nullptr) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  T* hr = ADD ? h + blockIdx.x * int64_t(cols) : nullptr;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float v = to_float(xr[c]);
    if constexpr (ADD) {
      const T hv = from_float<T>(v + to_float(res[blockIdx.x * res_stride + c]));
      hr[c] = hv;
      v = to_float(hv);
    }
    ss += v * v;
  }
  const float r = rsqrtf(block_reduce<false>(ss, scratch) / float(cols) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float wc = w != nullptr ? to_float(w[c]) + offset : 1.0f;
    yr[c] = from_float<T>(to_float(ADD ? hr[c] : xr[c]) * r * wc);
  }
}

// dx for rows blockIdx.x, blockIdx.x + gridDim.x, ..., two rows per iteration (both rows' loads in flight
// before the reduction, one barrier pair for both); with DW, each thread keeps dy * x * rstd for its columns in
// registers and the block writes one float32 partial row (summed by rms_norm_dw_reduce). ADD (add_rms_norm's
// backward): dx += dh, the residual stream's incoming gradient, before dx is rounded and written (DX only).
template <typename T, int VEC, int ITEMS, bool DX, bool DW, bool ADD = false>
__global__ void __launch_bounds__(512) rms_norm_backward_registers(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
    T* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows, int cols, int64_t x_stride, int64_t dy_stride,
    float offset, const T* __restrict__ dh = nullptr, int64_t dh_stride = 0) {
  __shared__ float2 scratch[32];
  float wv[ITEMS][VEC], acc[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
    if (w != nullptr) {
      load_vec<T, VEC>(w, col, cols, wv[it], 0.0f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) wv[it][k] += offset;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) wv[it][k] = 1.0f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[it][k] = 0.0f;
  }
  const float inv_cols = 1.0f / float(cols);
  for (int64_t row0 = blockIdx.x; row0 < rows; row0 += 2 * int64_t(gridDim.x)) {
    const int64_t row1 = row0 + gridDim.x;
    const bool has1 = row1 < rows;  // uniform across the block
    const float r0 = rstd[row0], r1 = has1 ? rstd[row1] : 0.0f;
    float xv[2][ITEMS][VEC], gv[2][ITEMS][VEC];
    float2 dot = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * blockDim.x + threadIdx.x) * VEC;
      load_vec<T, VEC>(x + row0 * x_stride, col, cols, xv[0][it], 0.0f);
      load_vec<T, VEC>(dy + row0 * dy_stride, col, cols, gv[0][it], 0.0f);
      if (has1) {
        load_vec<T, VEC>(x + row1 * x_stride, col, cols, xv[1][it], 0.0f);
        load_vec<T, VEC>(dy + row1 * dy_stride, col, cols, gv[1][it], 0.0f);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xv[1][it][k] = gv[1][it][k] = 0.0f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (DW) acc[it][k] += gv[0][it][k] * xv[0][it][k] * r0 + gv[1][it][k] * xv[1][it][k] * r1;
        gv[0][it][k] *= wv[it][k];
        gv[1][it][k] *= wv[it][k];
        dot.x += gv[0][it][k] * xv[0][it][k];
        dot.y += gv[1][it][k] * xv[1][it][k];
      }
    }
    if (DX) {
      const float2 total = block_sum2(dot, scratch);
      const float coef0 = r0 * r0 * total.x * inv_cols, coef1 = r1 * r1 * total.y * inv_cols;
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int col = (it * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          gv[0][it][k] = r0 * (gv[0][it][k] - xv[0][it][k] * coef0);
          gv[1][it][k] = r1 * (gv[1][it][k] - xv[1][it][k] * coef1);
        }
        if constexpr (ADD) {  // loaded after the reduction: two more row arrays in registers would spill
          float d0[VEC], d1[VEC];
          load_vec<T, VEC>(dh + row0 * dh_stride, col, cols, d0, 0.0f);
          if (has1) load_vec<T, VEC>(dh + row1 * dh_stride, col, cols, d1, 0.0f);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            gv[0][it][k] += d0[k];
            if (has1) gv[1][it][k] += d1[k];
          }
        }
        store_vec<T, VEC>(dx + row0 * int64_t(cols), col, cols, gv[0][it]);
        if (has1) store_vec<T, VEC>(dx + row1 * int64_t(cols), col, cols, gv[1][it]);
      }
    }
  }
  if (DW) {
    float* out = dw_partial + blockIdx.x * int64_t(cols);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        if (col + k < cols) out[col + k] = acc[it][k];
    }
  }
}

template <typename T, bool DX, bool DW, bool ADD = false>
__global__ void rms_norm_backward_looped(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                         const float* __restrict__ rstd, T* __restrict__ dx,
                                         float* __restrict__ dw_partial, int64_t rows, int cols, int64_t x_stride,
                                         int64_t dy_stride, float offset, const T* __restrict__ dh = nullptr,
                                         int64_t dh_stride = 0) {
  __shared__ float scratch[32];
  float* partial = dw_partial + blockIdx.x * int64_t(cols);
  if (DW)
    for (int c = threadIdx.x; c < cols; c += blockDim.x) partial[c] = 0.0f;  // owned by this thread: no sync
  const float inv_cols = 1.0f / float(cols);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    const T* dyr = dy + row * dy_stride;
    const float r = rstd[row];
    float coef = 0.0f;
    if (DX) {
      float dot = 0.0f;
      for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float wc = w != nullptr ? to_float(w[c]) + offset : 1.0f;
        dot += to_float(dyr[c]) * wc * to_float(xr[c]);
      }
      coef = r * r * block_reduce<false>(dot, scratch) * inv_cols;
    }
    T* dxr = dx + row * int64_t(cols);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      const float xc = to_float(xr[c]), d = to_float(dyr[c]);
      if (DW) partial[c] += d * xc * r;
      if (DX) {
        const float wc = w != nullptr ? to_float(w[c]) + offset : 1.0f;
        const float g = r * (d * wc - xc * coef);
        dxr[c] = from_float<T>(ADD ? g + to_float(dh[row * dh_stride + c]) : g);
      }
    }
  }
}

// dw[c] = sum over g of partial[g][c]. A block takes kDwReduceCols columns and sums the groups in
// kDwReduceSlices interleaved slices at once (one thread per column was 16 blocks for 4096 columns, each thread
// walking all ~500 partial rows one dependent load at a time: latency-bound on a handful of SMs), then adds the
// slices.
constexpr int kDwReduceCols = 32;
constexpr int kDwReduceSlices = 16;

template <typename T>
__global__ void __launch_bounds__(kDwReduceCols * kDwReduceSlices) rms_norm_dw_reduce(
    const float* __restrict__ partial, T* __restrict__ dw, int groups, int cols) {
  __shared__ float sums[kDwReduceSlices][kDwReduceCols + 1];
  const int c = blockIdx.x * kDwReduceCols + threadIdx.x;
  float s = 0.0f;
  if (c < cols)
    for (int g = threadIdx.y; g < groups; g += kDwReduceSlices) s += partial[int64_t(g) * cols + c];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kDwReduceSlices; ++i) total += sums[i][threadIdx.x];
    dw[c] = from_float<T>(total);
  }
}

// ---- vector row kernels: 16-byte loads, several vectors per thread -------------------------------------------
// For rows whose length is a multiple of 16 bytes and whose rows start 16-byte aligned (the launch code checks).
// The register kernels above size the block to the row (512 threads, one 16-byte vector each at 4096 bf16): an SM
// then holds 4 rows = 32 KB of loads in flight, and each row pays two barrier pairs. These give each thread ITEMS
// vectors (the launch code picks ITEMS and the block size per op, from side-by-side timings: ops.cu names the ledger
// rows), reduce with one barrier per reduction (separate scratch per reduction, every thread combining the per-warp
// values itself), and write with streaming stores (__stcs: nothing re-reads the output here). Against the register
// kernels: ledger: softmax and rms_norm, kernel, H200, bfloat16 8192x4096, run cuda-h200-2026-12-01-rowbench, variants
// "wide nc,cs items=…" against "current items=1 thr=512".
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&out)[16 / sizeof(T)]) {
  Vec16<T> pk;
  *reinterpret_cast<uint4*>(&pk) = raw;
#pragma unroll
  for (int k = 0; k < Vec16<T>::N; ++k) out[k] = to_float(pk.v[k]);
}
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&out)[16 / sizeof(T)]) {
  unpack16<T>(ldg16(p), out);
}
template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&in)[16 / sizeof(T)]) {
  Vec16<T> pk;
#pragma unroll
  for (int k = 0; k < Vec16<T>::N; ++k) pk.v[k] = from_float<T>(in[k]);
#ifdef TMF_ROW_STORE_WB  // a candidate (benchmarks/cuda_run.sh rowstores): default write-back stores, as Liger's
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&pk);
#else
  __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&pk));
#endif
}

// The RMSNorm weight's 16-byte vector at `col` plus Gemma's offset; 1 everywhere without a weight (and past the row's
// end, where the values go unused).
template <typename T>
__device__ __forceinline__ void load_weight16(const T* w, int col, int cols, float offset,
                                              float (&out)[16 / sizeof(T)]) {
  if (w != nullptr && col < cols) {
    load16<T>(w + col, out);
#pragma unroll
    for (int k = 0; k < Vec16<T>::N; ++k) out[k] += offset;
  } else {
#pragma unroll
    for (int k = 0; k < Vec16<T>::N; ++k) out[k] = 1.0f;
  }
}

// add_rms_norm's row: v (x's 16-byte vector) += the residual's, rounded to T as torch's add rounds it, and written
// to h.
template <typename T>
__device__ __forceinline__ void add_residual16(float (&v)[16 / sizeof(T)], const T* res, T* h) {
  float rv[Vec16<T>::N];
  load16<T>(res, rv);
#pragma unroll
  for (int k = 0; k < Vec16<T>::N; ++k) v[k] = to_float(from_float<T>(v[k] + rv[k]));
  store16<T>(h, v);
}

// One barrier: warp reduce, lane 0 writes, barrier, every thread combines the warps' values (shared-memory
// broadcast reads). `scratch` (32 floats) must not be written again before every thread has read it: use another
// scratch for the next reduction, or a barrier between. NaN: fmaxf drops it, so the max does not carry a NaN; the
// softmax sum does (exp(NaN - m) is NaN), which makes the row NaN as torch's.
template <int THREADS, bool MAX>
__device__ __forceinline__ float block_reduce1(float v, float* scratch) {
  constexpr int NW = THREADS / 32;
  v = MAX ? warp_max(v) : warp_sum(v);
  if constexpr (NW == 1) {
    return v;
  } else {
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = scratch[0];
#pragma unroll
    for (int i = 1; i < NW; ++i) r = MAX ? fmaxf(r, scratch[i]) : r + scratch[i];
    return r;
  }
}

template <typename T, int ITEMS, int THREADS>
__global__ void __launch_bounds__(THREADS) softmax_forward_vec(const T* __restrict__ x, T* __restrict__ y, int cols,
                                                            int64_t x_stride) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float red_max[32], red_sum[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  float v[ITEMS][VEC];
  float m = -INFINITY;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * THREADS + threadIdx.x) * VEC;
    if (col < cols) {
      load16<T>(xr + col, v[it]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[it][k] = -INFINITY;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) m = fmaxf(m, v[it][k]);
  }
  m = block_reduce1<THREADS, true>(m, red_max);
  float s = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it)
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[it][k] = __expf(v[it][k] - m);  // exp(-inf - m) = 0 for the padding
      s += v[it][k];
    }
  const float inv = 1.0f / block_reduce1<THREADS, false>(s, red_sum);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * THREADS + threadIdx.x) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[it][k] *= inv;
    if (col < cols) store16<T>(yr + col, v[it]);
  }
}

// Softmax backward with y and dy in registers, ITEMS loads of VEC elements per thread. Two load policies in one
// kernel: 16-byte rows (VEC * sizeof(T) == 16, the launch code checks alignment) take 16-byte loads and streaming
// stores, whole vectors only; other rows (VEC == 1) element loads with the row's end guarded. THREADS: the block
// size at compile time (one-barrier reduction), or 0 for blockDim.x (two-barrier reduction; the unaligned rows).
template <typename T, int VEC, int ITEMS, int THREADS = 0>
__global__ void __launch_bounds__(THREADS > 0 ? THREADS : 512) softmax_backward_registers(
    const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx, int cols, int64_t dy_stride) {
  constexpr bool V16 = VEC * sizeof(T) == 16;
  static_assert(V16 || VEC == 1, "16-byte vectors or single elements");
  __shared__ float red[32];
  const int nthreads = THREADS > 0 ? THREADS : blockDim.x;
  const T* yr = y + blockIdx.x * int64_t(cols);
  const T* dyr = dy + blockIdx.x * dy_stride;
  T* dxr = dx + blockIdx.x * int64_t(cols);
  float yv[ITEMS][VEC], gv[ITEMS][VEC];
  float dot = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * nthreads + threadIdx.x) * VEC;
    if constexpr (V16) {
      if (col < cols) {
        load16<T>(yr + col, yv[it]);
        load16<T>(dyr + col, gv[it]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) yv[it][k] = gv[it][k] = 0.0f;
      }
    } else {
      load_vec<T, VEC>(yr, col, cols, yv[it], 0.0f);
      load_vec<T, VEC>(dyr, col, cols, gv[it], 0.0f);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) dot += yv[it][k] * gv[it][k];
  }
  if constexpr (THREADS > 0) {
    dot = block_reduce1<THREADS, false>(dot, red);
  } else {
    dot = block_reduce<false>(dot, red);
  }
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * nthreads + threadIdx.x) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) gv[it][k] = yv[it][k] * (gv[it][k] - dot);
    if constexpr (V16) {
      if (col < cols) store16<T>(dxr + col, gv[it]);
    } else {
      store_vec<T, VEC>(dxr, col, cols, gv[it]);
    }
  }
}

// The weight is read after the reduction, from L2: x's loads come first, and the weight's registers are not held
// across the reduction.
// ADD (add_rms_norm): h = x + res rounded to T (as torch's add), written to `h` (contiguous rows) and normalised.
// Loading the weight with x instead (before the reduction, packed in registers) measured no consistent gain (ledger:
// rms_norm, kernel, H200, bfloat16 forward, run cuda-h200-2026-12-01-rowbench-992bc41, variants "… weight-first";
// and the slower round 2 of cuda-h200-2026-12-01-rowbench). Under Nsight Compute this kernel and Liger's RMSNorm
// forward run alike at 8192x4096 bf16, both load-bound (docs/cuda.md).
template <typename T, int ITEMS, int THREADS, bool ADD = false>
__global__ void __launch_bounds__(THREADS) rms_norm_forward_vec(const T* __restrict__ x, const T* __restrict__ w,
                                                             T* __restrict__ y, float* __restrict__ rstd, int cols,
                                                             int64_t x_stride, float eps, float offset,
                                                             const T* __restrict__ res = nullptr,
                                                             int64_t res_stride = 0, T* __restrict__ h = nullptr) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float red[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  float v[ITEMS][VEC];
  float ss = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * THREADS + threadIdx.x) * VEC;
    if (col < cols) {
      load16<T>(xr + col, v[it]);
      if constexpr (ADD)
        add_residual16<T>(v[it], res + blockIdx.x * res_stride + col, h + blockIdx.x * int64_t(cols) + col);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[it][k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) ss += v[it][k] * v[it][k];
  }
  const float r = rsqrtf(block_reduce1<THREADS, false>(ss, red) / float(cols) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * THREADS + threadIdx.x) * VEC;
    if (col < cols) {
      float wv[VEC];
      if (w != nullptr) {
        load16<T>(w + col, wv);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) wv[k] = 1.0f - offset;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[it][k] = v[it][k] * r * (wv[k] + offset);
      store16<T>(yr + col, v[it]);
    }
  }
}

// Narrow rows (<= 64 16-byte vectors, e.g. 256 bf16/fp32 or 512 bf16): a warp per ROWS rows, no barrier, each lane
// ITEMS vectors of each of its warp's ROWS rows (all loads issued before the first shuffle reduction), the weight
// loaded once per warp for its ROWS rows. One 32- or 64-thread block per row (the vector kernel's layout at 256 wide)
// kept 16-32 bytes per thread in flight and paid a block launch per row, about half Liger's speed (Liger packs 16
// rows per program; ledger: rms_norm, kernel, H200, bfloat16 65536x256 forward, run cuda-h200-2026-12-01-rows-rowbench,
// variants "block-per-row" against "warp_rows …"). Blocks of WARPS warps.
constexpr int kWarpRowsWarps = 4;

template <typename T, int ITEMS, int ROWS, bool ADD = false>
__global__ void __launch_bounds__(kWarpRowsWarps * 32) rms_norm_forward_warp_rows(
    const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, float* __restrict__ rstd, int64_t rows,
    int cols, int64_t x_stride, float eps, float offset, const T* __restrict__ res = nullptr, int64_t res_stride = 0,
    T* __restrict__ h = nullptr) {
  constexpr int VEC = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarpRowsWarps + (threadIdx.x >> 5)) * ROWS;
  if (row0 >= rows) return;  // warp-uniform; no block barrier below
  float v[ROWS][ITEMS][VEC];
  float ss[ROWS];
#pragma unroll
  for (int j = 0; j < ROWS; ++j) {
    ss[j] = 0.0f;
    const int64_t row = row0 + j;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * 32 + lane) * VEC;
      if (row < rows && col < cols) {
        load16<T>(x + row * x_stride + col, v[j][it]);
        if constexpr (ADD) add_residual16<T>(v[j][it], res + row * res_stride + col, h + row * int64_t(cols) + col);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[j][it][k] = 0.0f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) ss[j] += v[j][it][k] * v[j][it][k];
    }
  }
  float wv[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * 32 + lane) * VEC;
    load_weight16<T>(w, col, cols, offset, wv[it]);
  }
#pragma unroll
  for (int j = 0; j < ROWS; ++j) {
    const int64_t row = row0 + j;
    const float r = rsqrtf(warp_sum(ss[j]) / float(cols) + eps);
    if (row < rows) {
      if (lane == 0) rstd[row] = r;
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int col = (it * 32 + lane) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[j][it][k] *= r * wv[it][k];
        if (col < cols) store16<T>(y + row * int64_t(cols) + col, v[j][it]);
      }
    }
  }
}

// Softmax over narrow rows, the same layout as rms_norm_forward_warp_rows (one 32-thread block per row was slower
// than torch's softmax: ledger: softmax, op, H200, bfloat16 65536x256 forward, run cuda-h200-2026-12-01-morning).
template <typename T, int ITEMS, int ROWS>
__global__ void __launch_bounds__(kWarpRowsWarps * 32) softmax_forward_warp_rows(const T* __restrict__ x,
                                                                                 T* __restrict__ y, int64_t rows,
                                                                                 int cols, int64_t x_stride) {
  constexpr int VEC = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarpRowsWarps + (threadIdx.x >> 5)) * ROWS;
  if (row0 >= rows) return;
  float v[ROWS][ITEMS][VEC];
  float m[ROWS];
#pragma unroll
  for (int j = 0; j < ROWS; ++j) {
    m[j] = -INFINITY;
    const int64_t row = row0 + j;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * 32 + lane) * VEC;
      if (row < rows && col < cols) {
        load16<T>(x + row * x_stride + col, v[j][it]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[j][it][k] = -INFINITY;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) m[j] = fmaxf(m[j], v[j][it][k]);
    }
  }
#pragma unroll
  for (int j = 0; j < ROWS; ++j) {
    const int64_t row = row0 + j;
    const float mx = warp_max(m[j]);
    float s = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it)
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        v[j][it][k] = __expf(v[j][it][k] - mx);  // exp(-inf - m) = 0 for the padding; NaN poisons the sum
        s += v[j][it][k];
      }
    const float inv = 1.0f / warp_sum(s);
    if (row < rows) {
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int col = (it * 32 + lane) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[j][it][k] *= inv;
        if (col < cols) store16<T>(y + row * int64_t(cols) + col, v[j][it]);
      }
    }
  }
}

// One vector into a thread's online softmax statistics: m the running max, s the sum of exp(x - m).
template <int VEC>
__device__ __forceinline__ void online_max_sum_update(const float (&v)[VEC], float& m, float& s) {
  float vm = v[0];
#pragma unroll
  for (int k = 1; k < VEC; ++k) vm = fmaxf(vm, v[k]);
  if (vm > m) {
    s *= __expf(m - vm);  // m = -inf: s is 0 and stays 0
    m = vm;
  }
  if (m != -INFINITY) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += __expf(v[k] - m);  // a NaN lands here and poisons the row
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += v[k] != v[k] ? v[k] : 0.0f;  // NaN with no finite max yet
  }
}

// Wide softmax rows (past registers, up to ~200 KB a row): the row is copied once into shared memory with cp.async
// (each thread its own 16-byte vectors, in kSmemChunks commit groups so the online (max, sum) of the first chunk
// runs while the later ones land), then y is computed from shared memory: x is read once from memory, against
// twice in softmax_forward_looped_vec, as Liger's kernel keeps the row on chip (ledger: softmax, kernel, H200,
// 2048x32768 forward, run cuda-h200-2026-12-01-rows-rowbench, variants "smem thr=…" against the looped kernel).
// Each thread reads back only what it copied: no barrier guards the row. Dynamic shared memory: cols * sizeof(T).
constexpr int kSmemChunks = 4;

// consume(c) for each of the kSmemChunks cp.async commit groups, each as soon as it has landed.
template <typename F>
__device__ __forceinline__ void consume_chunks_as_they_land(const F& consume) {
  static_assert(kSmemChunks == 4, "the waits below are written out for 4 chunks");
  cp_async_wait<3>();
  consume(0);
  cp_async_wait<2>();
  consume(1);
  cp_async_wait<1>();
  consume(2);
  cp_async_wait<0>();
  consume(3);
}

template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS) softmax_forward_smem(const T* __restrict__ x, T* __restrict__ y, int cols,
                                                               int64_t x_stride) {
  constexpr int VEC = 16 / sizeof(T);
  extern __shared__ __align__(16) unsigned char row_raw[];
  T* srow = reinterpret_cast<T*>(row_raw);
  __shared__ float red_max[32], red_sum[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  const int nvec = cols / VEC;
  const int per_thread = (nvec + THREADS - 1) / THREADS;  // vectors of this row per thread (the last ones ragged)
  const int per_chunk = (per_thread + kSmemChunks - 1) / kSmemChunks;
#pragma unroll
  for (int c = 0; c < kSmemChunks; ++c) {
    for (int j = c * per_chunk; j < min(per_thread, (c + 1) * per_chunk); ++j) {
      const int i = j * THREADS + threadIdx.x;
      if (i < nvec) cp_async16(srow + i * VEC, xr + i * VEC);
    }
    cp_async_commit();
  }
  float m = -INFINITY, s = 0.0f;
  auto consume = [&](int c) {
    for (int j = c * per_chunk; j < min(per_thread, (c + 1) * per_chunk); ++j) {
      const int i = j * THREADS + threadIdx.x;
      if (i >= nvec) break;
      float v[VEC];
      unpack16<T>(*reinterpret_cast<const uint4*>(srow + i * VEC), v);
      online_max_sum_update<VEC>(v, m, s);
    }
  };
  consume_chunks_as_they_land(consume);
  const float row_max = block_reduce1<THREADS, true>(m, red_max);
  s = m == -INFINITY ? (s != s ? s : 0.0f) : s * __expf(m - row_max);
  const float inv = 1.0f / block_reduce1<THREADS, false>(s, red_sum);
  for (int j = 0; j < per_thread; ++j) {
    const int i = j * THREADS + threadIdx.x;
    if (i >= nvec) break;
    float v[VEC];
    unpack16<T>(*reinterpret_cast<const uint4*>(srow + i * VEC), v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = __expf(v[k] - row_max) * inv;
    store16<T>(yr + i * VEC, v);
  }
}

// Wide softmax backward: y staged in shared memory once (cp.async, as the forward), dy read once into the dot and
// again for dx; with BOTH (2 rows' bytes fit), dy is staged too, so nothing is read twice from memory.
template <typename T, int THREADS, bool BOTH>
__global__ void __launch_bounds__(THREADS) softmax_backward_smem(const T* __restrict__ y, const T* __restrict__ dy,
                                                                 T* __restrict__ dx, int cols, int64_t dy_stride) {
  constexpr int VEC = 16 / sizeof(T);
  extern __shared__ __align__(16) unsigned char row_raw[];
  T* sy = reinterpret_cast<T*>(row_raw);
  T* sg = sy + cols;
  __shared__ float red[32];
  const T* yr = y + blockIdx.x * int64_t(cols);
  const T* dyr = dy + blockIdx.x * dy_stride;
  T* dxr = dx + blockIdx.x * int64_t(cols);
  const int nvec = cols / VEC;
  const int per_thread = (nvec + THREADS - 1) / THREADS;
  const int per_chunk = (per_thread + kSmemChunks - 1) / kSmemChunks;
#pragma unroll
  for (int c = 0; c < kSmemChunks; ++c) {
    for (int j = c * per_chunk; j < min(per_thread, (c + 1) * per_chunk); ++j) {
      const int i = j * THREADS + threadIdx.x;
      if (i < nvec) {
        cp_async16(sy + i * VEC, yr + i * VEC);
        if constexpr (BOTH) cp_async16(sg + i * VEC, dyr + i * VEC);
      }
    }
    cp_async_commit();
  }
  // Vector i of y (staged) and of dy (staged with BOTH, else from memory).
  auto load_y_dy = [&](int i, float (&a)[VEC], float (&b)[VEC]) {
    unpack16<T>(*reinterpret_cast<const uint4*>(sy + i * VEC), a);
    if constexpr (BOTH) {
      unpack16<T>(*reinterpret_cast<const uint4*>(sg + i * VEC), b);
    } else {
      load16<T>(dyr + i * VEC, b);
    }
  };
  float dot = 0.0f;
  auto consume = [&](int c) {
    for (int j = c * per_chunk; j < min(per_thread, (c + 1) * per_chunk); ++j) {
      const int i = j * THREADS + threadIdx.x;
      if (i >= nvec) break;
      float a[VEC], b[VEC];
      load_y_dy(i, a, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += a[k] * b[k];
    }
  };
  consume_chunks_as_they_land(consume);
  dot = block_reduce1<THREADS, false>(dot, red);
  for (int j = 0; j < per_thread; ++j) {
    const int i = j * THREADS + threadIdx.x;
    if (i >= nvec) break;
    float a[VEC], b[VEC];
    load_y_dy(i, a, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] *= b[k] - dot;
    store16<T>(dxr + i * VEC, a);
  }
}

// Rows too long for registers (softmax): pass 1 keeps a per-thread online (max, sum of exp) over 16-byte vectors
// (one rescale per vector, not per element), pass 2 re-reads x and writes y. Reads x twice (the second read mostly
// from L2 when the row is short enough; 1024 threads), against the scalar looped kernel's two element-wise passes plus one.
template <typename T>
__global__ void __launch_bounds__(1024) softmax_forward_looped_vec(const T* __restrict__ x, T* __restrict__ y,
                                                                   int cols, int64_t x_stride) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float red_max[32], red_sum[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  float m = -INFINITY, s = 0.0f;
  for (int col = threadIdx.x * VEC; col < cols; col += 1024 * VEC) {
    float v[VEC];
    load16<T>(xr + col, v);
    online_max_sum_update<VEC>(v, m, s);
  }
  const float row_max = block_reduce1<1024, true>(m, red_max);
  s = m == -INFINITY ? (s != s ? s : 0.0f) : s * __expf(m - row_max);
  const float inv = 1.0f / block_reduce1<1024, false>(s, red_sum);
  for (int col = threadIdx.x * VEC; col < cols; col += 1024 * VEC) {
    float v[VEC];
    load16<T>(xr + col, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = __expf(v[k] - row_max) * inv;
    store16<T>(yr + col, v);
  }
}

template <typename T>
__global__ void __launch_bounds__(1024) softmax_backward_looped_vec(const T* __restrict__ y, const T* __restrict__ dy,
                                                                    T* __restrict__ dx, int cols, int64_t dy_stride) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float red[32];
  const T* yr = y + blockIdx.x * int64_t(cols);
  const T* dyr = dy + blockIdx.x * dy_stride;
  T* dxr = dx + blockIdx.x * int64_t(cols);
  float dot = 0.0f;
  for (int col = threadIdx.x * VEC; col < cols; col += 1024 * VEC) {
    float a[VEC], b[VEC];
    load16<T>(yr + col, a);
    load16<T>(dyr + col, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dot += a[k] * b[k];
  }
  dot = block_reduce1<1024, false>(dot, red);
  for (int col = threadIdx.x * VEC; col < cols; col += 1024 * VEC) {
    float a[VEC], b[VEC];
    load16<T>(yr + col, a);
    load16<T>(dyr + col, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] *= b[k] - dot;
    store16<T>(dxr + col, a);
  }
}

// ---- RMSNorm backward, pipelined: rows staged in shared memory by cp.async, STAGES rows deep ------------------
// Block b walks rows b, b + G, ... (G = gridDim.x, sized by the launch code to the blocks resident at once). Each
// thread copies its own 16-byte vectors of x and dy for the row STAGES - 1 ahead into shared memory (cp.async) and
// later reads back only those, so no barrier guards the staging slots, and (STAGES - 1) rows of x and dy per block
// stay in flight without holding registers. One barrier per row (the dot product; its scratch alternates by row
// parity, so a fast thread's next write cannot overwrite a value a slow one has yet to read). dw: the block's
// float32 partial row in registers, written once at the end (rms_norm_dw_reduce sums the G partial rows).
// Against rms_norm_backward_registers and Liger-Kernel's backward (dx + dw, both launches): ledger: rms_norm, kernel,
// H200, bfloat16 8192x4096 backward, run cuda-h200-2026-12-01-rowbench, variants "pipe items=1 thr=512 st=3 …"
// against "current items=1 thr=512 g=528", and Liger's "in place" row of the same run.
// Shared memory: STAGES * 2 * ITEMS * THREADS * 16 bytes (dynamic).
// ADD: dx += dh (add_rms_norm), dh's 16-byte vectors loaded into registers (raw, 4 registers each) before the
// reduction so their latency hides behind it; staging dh as a third array would take 1.5x the shared memory.
template <typename T, int ITEMS, int THREADS, int STAGES, bool DX, bool DW, bool ADD = false>
__global__ void __launch_bounds__(THREADS) rms_norm_backward_pipelined(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
    T* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows, int cols, int64_t x_stride, int64_t dy_stride,
    float offset, const T* __restrict__ dh = nullptr, int64_t dh_stride = 0) {
  constexpr int VEC = 16 / sizeof(T);
  extern __shared__ __align__(16) unsigned char stage_raw[];
  T* stage = reinterpret_cast<T*>(stage_raw);  // [STAGES][2][row_len]
  __shared__ float red[2][32];
  constexpr int row_len = ITEMS * THREADS * VEC;
  float wv[ITEMS][VEC], acc[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * THREADS + threadIdx.x) * VEC;
    load_weight16<T>(w, col, cols, offset, wv[it]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[it][k] = 0.0f;
  }
  const int64_t G = gridDim.x;
  auto issue = [&](int64_t row, int slot) {
    if (row < rows) {
      T* sx = stage + int64_t(slot) * 2 * row_len;
      T* sg = sx + row_len;
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int col = (it * THREADS + threadIdx.x) * VEC;
        if (col < cols) {
          cp_async16(sx + col, x + row * x_stride + col);
          cp_async16(sg + col, dy + row * dy_stride + col);
        }
      }
    }
    cp_async_commit();  // an empty group past the last row keeps the count of groups uniform
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(blockIdx.x + s * G, s);
  const float inv_cols = 1.0f / float(cols);
  int slot = 0, parity = 0;
  for (int64_t row = blockIdx.x; row < rows; row += G) {
    asm volatile("" ::: "memory");  // last row's shared-memory reads stay before the copies that refill the slot
    issue(row + (STAGES - 1) * G, slot == 0 ? STAGES - 1 : slot - 1);  // the slot this thread read last row
    cp_async_wait<STAGES - 1>();
    const T* sx = stage + int64_t(slot) * 2 * row_len;
    const T* sg = sx + row_len;
    const float r = rstd[row];
    uint4 dhv[ADD ? ITEMS : 1];
    if constexpr (ADD) {
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int col = (it * THREADS + threadIdx.x) * VEC;
        if (col < cols) dhv[it] = ldg16(dh + row * dh_stride + col);
      }
    }
    float xv[ITEMS][VEC], gv[ITEMS][VEC];
    float dot = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * THREADS + threadIdx.x) * VEC;
      if (col < cols) {
        unpack16<T>(*reinterpret_cast<const uint4*>(sx + col), xv[it]);
        unpack16<T>(*reinterpret_cast<const uint4*>(sg + col), gv[it]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xv[it][k] = gv[it][k] = 0.0f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (DW) acc[it][k] += gv[it][k] * xv[it][k] * r;
        gv[it][k] *= wv[it][k];
        dot += gv[it][k] * xv[it][k];
      }
    }
    if (DX) {
      const float coef = r * r * block_reduce1<THREADS, false>(dot, red[parity]) * inv_cols;
      parity ^= 1;
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int col = (it * THREADS + threadIdx.x) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) gv[it][k] = r * (gv[it][k] - xv[it][k] * coef);
        if (col < cols) {
          if constexpr (ADD) {
            float d[VEC];
            unpack16<T>(dhv[it], d);
#pragma unroll
            for (int k = 0; k < VEC; ++k) gv[it][k] += d[k];
          }
          store16<T>(dx + row * int64_t(cols) + col, gv[it]);
        }
      }
    }
    slot = slot == STAGES - 1 ? 0 : slot + 1;
  }
  cp_async_wait<0>();
  if (DW) {
    float* out = dw_partial + blockIdx.x * int64_t(cols);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * THREADS + threadIdx.x) * VEC;
      if (col < cols) {
#pragma unroll
        for (int k = 0; k < VEC; k += 4)
          *reinterpret_cast<float4*>(out + col + k) = make_float4(acc[it][k], acc[it][k + 1], acc[it][k + 2], acc[it][k + 3]);
      }
    }
  }
}

// ---- cross-entropy row pass (the CUDA twin of shaders/cross_entropy.metal) -------------------------------------
// One block per vocabulary row: an online max and sum of exp(z - max) and the sum of z (z = logits, or softcap ·
// tanh(logits / softcap)); the row's loss lse - (1 - ε)·z[target] - ε·mean(z) by thread 0 (0 for an ignored row);
// then, with a gradient, each thread re-reads its elements and writes row_scale·(softmax - ε/V - (1-ε)·onehot)
// (times 1 - tanh² under soft-capping) over them: `grad` may be `logits` itself (no __restrict__ on either).
__device__ __forceinline__ float capped_logit(float x, float softcap) {
  return softcap > 0.0f ? softcap * tanhf(x / softcap) : x;
}

template <typename T>
__global__ void cross_entropy_rows_looped(const T* logits, int64_t stride, const int* __restrict__ target,
                                          const float* __restrict__ row_scale, float* __restrict__ loss, T* grad,
                                          int vocab, int ignore_index, float eps, float softcap, bool want_grad) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* zr = logits + row * stride;
  const int t = target[row];
  const bool valid = t != ignore_index;
  float m = -INFINITY, s = 0.0f, z_sum = 0.0f, z_target = 0.0f;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
    const float z = capped_logit(to_float(zr[c]), softcap);
    z_sum += z;
    if (c == t) z_target = z;
    if (z > m) {
      s = s * expf(m - z) + expf(z - z);  // exp(z - z): 1, or NaN for +inf (as torch)
      m = z;
    } else if (z != -INFINITY) {
      s += expf(z - m);  // NaN lands here and poisons the row
    }
  }
  const float row_max = block_reduce<true>(m, scratch);
  // m = -inf: s is 0, or NaN from a NaN logit (fmaxf drops NaN, only the sum carries it), as softmax_forward_smem.
  s = m == -INFINITY ? (s != s ? s : 0.0f) : s * expf(m - row_max);
  const float lse = row_max + logf(block_reduce<false>(s, scratch));
  z_sum = block_reduce<false>(z_sum, scratch);
  z_target = block_reduce<false>(z_target, scratch);  // not re-read: with grad == logits it may be overwritten below
  if (threadIdx.x == 0) {
    float row_loss = 0.0f;
    if (valid) {
      row_loss = lse - (1.0f - eps) * z_target;
      if (eps > 0.0f) row_loss -= eps * z_sum / float(vocab);
    }
    loss[row] = row_loss;
  }
  if (!want_grad) return;
  T* gr = grad + row * int64_t(vocab);
  const float scale = row_scale[row], smooth = eps / float(vocab);
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
    float g = 0.0f;
    if (valid) {
      const float z = capped_logit(to_float(zr[c]), softcap);
      g = expf(z - lse) - smooth - (c == t ? 1.0f - eps : 0.0f);
      if (softcap > 0.0f) {
        const float th = z / softcap;
        g *= 1.0f - th * th;
      }
      g *= scale;
    }
    gr[c] = from_float<T>(g);
  }
}

}  // namespace tmf::cuda
