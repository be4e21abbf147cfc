// SwiGLU / GeGLU kernels for the CUDA backend (host code: csrc/cuda/glu.cu; timed side by side without PyTorch in
// benchmarks/cuda_glu_rope_bench.cu). The twin of shaders/glu.metal. Elementwise, float32 math:
//   forward  out = act(gate) · up
//   backward dgate = dout · up · act'(gate), dup = dout · act(gate)   (act recomputed from gate)
// Contiguous operands (the common case) take the flat kernels: one 16-byte pack per thread over one flat row. The
// generic kernels take rows with strides (e.g. the halves of a fused gate_up projection): a thread owns ITEMS whole
// chunks of VEC contiguous elements of one row, the chunks a block apart (so a warp's accesses stay contiguous), and
// issues all its loads before any math; VEC > 1 (16-byte packs) where every base and row stride is 16-byte aligned,
// else one element per chunk.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "row_kernels.cuh"  // to_float / from_float (torch builds with the half/bfloat16 conversions off)
#include "tmf/shader_args.h"

namespace tmf::cuda {

// The activations of shaders/glu.metal (same edge values: NaN/inf where float64 torch has them), written for few
// instructions per element: at 16-byte packs the accurate expf/tanhf and IEEE divisions made the kernels
// instruction-bound rather than memory-bound (docs/cuda.md). __expf is within ~|x|·2^-23 relative; the GeGLU
// tanh approximation is evaluated as g·σ(2y) (0.5·(1 + tanh y) = σ(2y), no cancellation for negative g).
__device__ __forceinline__ float glu_sigmoid(float z) { return __fdividef(1.0f, 1.0f + __expf(-z)); }

constexpr float kGeluTwiceSqrt2OverPi = 1.5957691216057308f;  // 2·sqrt(2/π): z = 2y

template <int ACT>
__device__ __forceinline__ float glu_act(float g) {
  if constexpr (ACT == int(kGluSilu)) {
    return g * glu_sigmoid(g);
  } else {
    return g * glu_sigmoid(kGeluTwiceSqrt2OverPi * g * (1.0f + 0.044715f * g * g));
  }
}

template <int ACT>
__device__ __forceinline__ float glu_act_derivative(float g) {
  if constexpr (ACT == int(kGluSilu)) {
    const float s = glu_sigmoid(g);
    return s * (1.0f + g * (1.0f - s));
  } else {
    const float s = glu_sigmoid(kGeluTwiceSqrt2OverPi * g * (1.0f + 0.044715f * g * g));
    const float ds = s * (1.0f - s);  // dσ/dz; 0 where σ saturates, and z' = 2y' overflows for huge g
    const float slope = ds == 0.0f && isfinite(g) ? 0.0f : g * ds * kGeluTwiceSqrt2OverPi * (1.0f + 0.134145f * g * g);
    return s + slope;
  }
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) GluPack {
  T v[VEC];
};

// A whole chunk: the generic kernels are launched with VEC > 1 only on rows whose length is a multiple of VEC
// (csrc/cuda/glu.cu: 16-byte row strides and outputs; one flat row goes to the flat kernels), so no chunk is partial.
// A partial-chunk path here cost more than twice the time (SASS: the 16-byte load's result was split into 16-bit
// registers right after the load, inside the branch, to merge with the element-by-element path — so each operand's
// load waited for the previous one's data before being issued; ledger: swiglu, kernel, H200, bfloat16 8192x11008
// forward, run cuda-h200-2026-12-01-glu-rope-variants, variant "256 threads x 1 pack" against "before (accurate
// math)", the same work straight-line).
template <typename T, int VEC>
__device__ __forceinline__ GluPack<T, VEC> glu_load(const T* p, int64_t c0) {
  return *reinterpret_cast<const GluPack<T, VEC>*>(p + c0);
}

template <typename T, int VEC>
__device__ __forceinline__ void glu_store(T* p, int64_t c0, const float* in) {
  GluPack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<GluPack<T, VEC>*>(p + c0) = pack;
}

// rows × cols elements with each input's row stride (elements); outputs contiguous (cols apart). A row is cut into
// chunks of VEC elements; a block covers THREADS · ITEMS consecutive chunks of one row (blocks_per_row per row).
struct GluShape {
  int64_t rows, cols, chunks_per_row, blocks_per_row, gate_stride, up_stride, dout_stride;
};

// The block's row (32-bit division, none for one flat row) and the first column of a thread's item i (at or past
// the row's end: the item is out of range).
__device__ __forceinline__ int64_t glu_block_row(const GluShape& s) {
  return s.rows == 1 ? 0 : int64_t(blockIdx.x / uint32_t(s.blocks_per_row));
}

template <int THREADS, int ITEMS, int VEC>
__device__ __forceinline__ int64_t glu_item_column(const GluShape& s, int64_t row, int item) {
  const int64_t block_in_row = int64_t(blockIdx.x) - row * s.blocks_per_row;
  return (block_in_row * (THREADS * ITEMS) + item * THREADS + threadIdx.x) * VEC;
}

template <typename T, int ACT, int VEC, int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS) glu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                                              T* __restrict__ out, GluShape s) {
  const int64_t row = glu_block_row(s);
  const T* g_row = gate + row * s.gate_stride;
  const T* u_row = up + row * s.up_stride;
  GluPack<T, VEC> g[ITEMS], u[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t c0 = glu_item_column<THREADS, ITEMS, VEC>(s, row, i);
    if (c0 < s.cols) {
      g[i] = glu_load<T, VEC>(g_row, c0);
      u[i] = glu_load<T, VEC>(u_row, c0);
    }
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t c0 = glu_item_column<THREADS, ITEMS, VEC>(s, row, i);
    if (c0 >= s.cols) continue;
    float o[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = glu_act<ACT>(to_float(g[i].v[k])) * to_float(u[i].v[k]);
    glu_store<T, VEC>(out + row * s.cols, c0, o);
  }
}

template <typename T, int ACT, int VEC, int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS) glu_backward_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                                               const T* __restrict__ dout, T* __restrict__ dgate,
                                                               T* __restrict__ dup, GluShape s) {
  const int64_t row = glu_block_row(s);
  const T* g_row = gate + row * s.gate_stride;
  const T* u_row = up + row * s.up_stride;
  const T* d_row = dout + row * s.dout_stride;
  GluPack<T, VEC> g[ITEMS], u[ITEMS], d[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t c0 = glu_item_column<THREADS, ITEMS, VEC>(s, row, i);
    if (c0 < s.cols) {
      g[i] = glu_load<T, VEC>(g_row, c0);
      u[i] = glu_load<T, VEC>(u_row, c0);
      d[i] = glu_load<T, VEC>(d_row, c0);
    }
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t c0 = glu_item_column<THREADS, ITEMS, VEC>(s, row, i);
    if (c0 >= s.cols) continue;
    float dg[VEC], du[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gk = to_float(g[i].v[k]), uk = to_float(u[i].v[k]), dk = to_float(d[i].v[k]);
      dg[k] = dk * uk * glu_act_derivative<ACT>(gk);
      du[k] = dk * glu_act<ACT>(gk);
    }
    glu_store<T, VEC>(dgate + row * s.cols, c0, dg);
    glu_store<T, VEC>(dup + row * s.cols, c0, du);
  }
}

// Flat kernels: contiguous operands as one row of n elements (the common case: separate gate and up projections),
// one 16-byte pack per thread, the row's last partial pack element by element on its own path (returning early, so
// the packed path's registers never merge with it; see glu_load). They run at copy bandwidth (ledger: swiglu,
// kernel, H200, bfloat16 8192x11008, run cuda-h200-2026-12-01-glu-rope-variants-379d040, variant ''
// ("flat (shipped)")).
template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(256) glu_forward_flat(const T* __restrict__ gate, const T* __restrict__ up,
                                                        T* __restrict__ out, int64_t n) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= n) return;
  if (c0 + VEC > n) {
    for (int64_t c = c0; c < n; ++c) out[c] = from_float<T>(glu_act<ACT>(to_float(gate[c])) * to_float(up[c]));
    return;
  }
  const GluPack<T, VEC> g = *reinterpret_cast<const GluPack<T, VEC>*>(gate + c0);
  const GluPack<T, VEC> u = *reinterpret_cast<const GluPack<T, VEC>*>(up + c0);
  GluPack<T, VEC> o;
#pragma unroll
  for (int k = 0; k < VEC; ++k) o.v[k] = from_float<T>(glu_act<ACT>(to_float(g.v[k])) * to_float(u.v[k]));
  *reinterpret_cast<GluPack<T, VEC>*>(out + c0) = o;
}

template <typename T, int ACT>
__device__ __forceinline__ void glu_backward_element(T g, T u, T d, T& dg, T& du) {
  const float gf = to_float(g), uf = to_float(u), df = to_float(d);
  dg = from_float<T>(df * uf * glu_act_derivative<ACT>(gf));
  du = from_float<T>(df * glu_act<ACT>(gf));
}

template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(256) glu_backward_flat(const T* __restrict__ gate, const T* __restrict__ up,
                                                         const T* __restrict__ dout, T* __restrict__ dgate,
                                                         T* __restrict__ dup, int64_t n) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= n) return;
  if (c0 + VEC > n) {
    for (int64_t c = c0; c < n; ++c) glu_backward_element<T, ACT>(gate[c], up[c], dout[c], dgate[c], dup[c]);
    return;
  }
  const GluPack<T, VEC> g = *reinterpret_cast<const GluPack<T, VEC>*>(gate + c0);
  const GluPack<T, VEC> u = *reinterpret_cast<const GluPack<T, VEC>*>(up + c0);
  const GluPack<T, VEC> d = *reinterpret_cast<const GluPack<T, VEC>*>(dout + c0);
  GluPack<T, VEC> dg, du;
#pragma unroll
  for (int k = 0; k < VEC; ++k) glu_backward_element<T, ACT>(g.v[k], u.v[k], d.v[k], dg.v[k], du.v[k]);
  *reinterpret_cast<GluPack<T, VEC>*>(dgate + c0) = dg;
  *reinterpret_cast<GluPack<T, VEC>*>(dup + c0) = du;
}

// The shape for rows of `cols` elements with the inputs' row strides; operands forming one contiguous block
// (every stride == cols) become a single flat row.
inline GluShape glu_shape(int64_t rows, int64_t cols, const int64_t* strides, int n_strides, int vec,
                          int chunks_per_block) {
  GluShape s{rows, cols, 0, 0, 0, 0, 0};
  bool flat = true;
  for (int i = 0; i < n_strides; ++i) flat = flat && (s.rows == 1 || strides[i] == s.cols);
  if (flat) s.cols *= s.rows, s.rows = 1;
  s.gate_stride = flat ? s.cols : strides[0];
  s.up_stride = flat ? s.cols : strides[1];
  s.dout_stride = flat || n_strides < 3 ? s.cols : strides[2];
  s.chunks_per_row = (s.cols + vec - 1) / vec;
  s.blocks_per_row = (s.chunks_per_row + chunks_per_block - 1) / chunks_per_block;
  return s;
}

}  // namespace tmf::cuda
