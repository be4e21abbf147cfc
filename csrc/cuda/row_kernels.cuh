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

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(512) softmax_backward_registers(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                                           int cols, int64_t dy_stride) {
  __shared__ float scratch[32];
  const T* yr = y + blockIdx.x * int64_t(cols);
  const T* dyr = dy + blockIdx.x * dy_stride;
  T* dxr = dx + blockIdx.x * int64_t(cols);
  float yv[ITEMS][VEC], gv[ITEMS][VEC];
  float dot = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
    load_vec<T, VEC>(yr, col, cols, yv[it], 0.0f);
    load_vec<T, VEC>(dyr, col, cols, gv[it], 0.0f);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dot += yv[it][k] * gv[it][k];
  }
  dot = block_reduce<false>(dot, scratch);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) gv[it][k] = yv[it][k] * (gv[it][k] - dot);
    store_vec<T, VEC>(dxr, (it * blockDim.x + threadIdx.x) * VEC, cols, gv[it]);
  }
}

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
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(512) rms_norm_forward_registers(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                           float* __restrict__ rstd, int cols, int64_t x_stride, float eps,
                                           float offset) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  float v[ITEMS][VEC];
  float ss = 0.0f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    load_vec<T, VEC>(xr, (it * blockDim.x + threadIdx.x) * VEC, cols, v[it], 0.0f);
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

template <typename T>
__global__ void rms_norm_forward_looped(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                        float* __restrict__ rstd, int cols, int64_t x_stride, float eps, float offset) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * x_stride;
  T* yr = y + blockIdx.x * int64_t(cols);
  float ss = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_float(xr[c]);
    ss += v * v;
  }
  const float r = rsqrtf(block_reduce<false>(ss, scratch) / float(cols) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float wc = w != nullptr ? to_float(w[c]) + offset : 1.0f;
    yr[c] = from_float<T>(to_float(xr[c]) * r * wc);
  }
}

// dx for rows blockIdx.x, blockIdx.x + gridDim.x, ..., two rows per iteration (both rows' loads in flight
// before the reduction, one barrier pair for both); with DW, each thread keeps dy * x * rstd for its columns in
// registers and the block writes one float32 partial row (summed by rms_norm_dw_reduce).
template <typename T, int VEC, int ITEMS, bool DX, bool DW>
__global__ void __launch_bounds__(512) rms_norm_backward_registers(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
    T* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows, int cols, int64_t x_stride, int64_t dy_stride,
    float offset) {
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

template <typename T, bool DX, bool DW>
__global__ void rms_norm_backward_looped(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                         const float* __restrict__ rstd, T* __restrict__ dx,
                                         float* __restrict__ dw_partial, int64_t rows, int cols, int64_t x_stride,
                                         int64_t dy_stride, float offset) {
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
        dxr[c] = from_float<T>(r * (d * wc - xc * coef));
      }
    }
  }
}

// dw[c] = sum over g of partial[g][c]. A block takes kDwReduceCols columns and sums the groups in
// kDwReduceSlices interleaved slices at once (one thread per column was 16 blocks for 4096 columns, each thread
// walking all ~500 partial rows one dependent load at a time: 17 us on an H100), then adds the slices.
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
  s = m == -INFINITY ? 0.0f : s * expf(m - row_max);
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
