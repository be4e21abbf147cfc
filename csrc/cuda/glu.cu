// SwiGLU / GeGLU on CUDA tensors (csrc/ops.h): the twin of shaders/glu.metal. Elementwise, float32 math:
//   forward  out = act(gate) · up
//   backward dgate = dout · up · act'(gate), dup = dout · act(gate)   (act recomputed from gate)
// Each thread owns VEC contiguous elements of one row: 16-byte loads and stores where every operand's base and row
// stride allow (the common case: contiguous operands, launched as one flat row), one element otherwise.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

#include "ops.h"
#include "row_kernels.cuh"  // to_float / from_float (torch builds with the half/bfloat16 conversions off)
#include "tmf/shader_args.h"

namespace tmf {
namespace {

constexpr int kGluThreads = 256;

// The activations exactly as the Metal kernels compute them (see shaders/glu.metal for the edge cases).
template <int ACT>
__device__ __forceinline__ float glu_act(float g) {
  if constexpr (ACT == int(kGluSilu)) {
    return g * (1.0f / (1.0f + expf(-g)));
  } else {
    return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
  }
}

template <int ACT>
__device__ __forceinline__ float glu_act_derivative(float g) {
  if constexpr (ACT == int(kGluSilu)) {
    const float s = 1.0f / (1.0f + expf(-g));
    return s * (1.0f + g * (1.0f - s));
  } else {
    const float t = tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g));
    const float sech2 = 1.0f - t * t;
    const float slope =
        sech2 == 0.0f && isfinite(g) ? 0.0f : 0.5f * g * sech2 * 0.7978845608028654f * (1.0f + 0.134145f * g * g);
    return 0.5f * (1.0f + t) + slope;
  }
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_elements(const T* p, int64_t c0, int64_t cols, float* out) {
  if (c0 + VEC <= cols) {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p + c0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = cuda::to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = c0 + i < cols ? cuda::to_float(p[c0 + i]) : 0.0f;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_elements(T* p, int64_t c0, int64_t cols, const float* in) {
  if (c0 + VEC <= cols) {
    Pack<T, VEC> pack;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pack.v[i] = cuda::from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, VEC>*>(p + c0) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      if (c0 + i < cols) p[c0 + i] = cuda::from_float<T>(in[i]);
  }
}

struct GluShape {
  int64_t rows, cols, chunks_per_row, gate_stride, up_stride, dout_stride;
};

template <typename T, int ACT, int VEC>
__global__ void glu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                   GluShape s) {
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= s.rows * s.chunks_per_row) return;
  const int64_t row = chunk / s.chunks_per_row, c0 = (chunk % s.chunks_per_row) * VEC;
  float g[VEC], u[VEC], o[VEC];
  load_elements<T, VEC>(gate + row * s.gate_stride, c0, s.cols, g);
  load_elements<T, VEC>(up + row * s.up_stride, c0, s.cols, u);
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = glu_act<ACT>(g[i]) * u[i];
  store_elements<T, VEC>(out + row * s.cols, c0, s.cols, o);
}

template <typename T, int ACT, int VEC>
__global__ void glu_backward_kernel(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dout,
                                    T* __restrict__ dgate, T* __restrict__ dup, GluShape s) {
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= s.rows * s.chunks_per_row) return;
  const int64_t row = chunk / s.chunks_per_row, c0 = (chunk % s.chunks_per_row) * VEC;
  float g[VEC], u[VEC], d[VEC], dg[VEC], du[VEC];
  load_elements<T, VEC>(gate + row * s.gate_stride, c0, s.cols, g);
  load_elements<T, VEC>(up + row * s.up_stride, c0, s.cols, u);
  load_elements<T, VEC>(dout + row * s.dout_stride, c0, s.cols, d);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    dg[i] = d[i] * u[i] * glu_act_derivative<ACT>(g[i]);
    du[i] = d[i] * glu_act<ACT>(g[i]);
  }
  store_elements<T, VEC>(dgate + row * s.cols, c0, s.cols, dg);
  store_elements<T, VEC>(dup + row * s.cols, c0, s.cols, du);
}

// Rows with their strides; operands forming one contiguous block become a single flat row.
GluShape glu_shape(const at::Tensor& lead2, std::initializer_list<int64_t> strides, int vec) {
  GluShape s{lead2.size(0), lead2.size(1), 0, 0, 0, 0};
  bool flat = true;
  for (int64_t st : strides) flat = flat && (s.rows == 1 || st == s.cols);
  if (flat) s.cols *= s.rows, s.rows = 1;
  auto it = strides.begin();
  s.gate_stride = flat ? s.cols : it[0];
  s.up_stride = flat ? s.cols : it[1];
  s.dout_stride = flat || strides.size() < 3 ? s.cols : it[2];
  s.chunks_per_row = (s.cols + vec - 1) / vec;
  return s;
}

// 16-byte packs when every pointer is 16-byte aligned and every row (outputs: cols apart) starts on 16 bytes.
bool vectorizable(std::initializer_list<const at::Tensor*> tensors, const GluShape& s, int64_t element_size) {
  for (const at::Tensor* t : tensors)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  if (s.rows == 1) return true;
  for (int64_t st : {s.gate_stride, s.up_stride, s.dout_stride, s.cols})
    if ((st * element_size) % 16 != 0) return false;
  return true;
}

template <typename F>
void dispatch_glu(at::ScalarType dtype, int64_t activation, bool vec, const F& launch) {
  auto with_type = [&](auto type_tag) {
    using T = decltype(type_tag);
    constexpr int kVec = 16 / sizeof(T);
    if (activation == kGluSilu) {
      vec ? launch.template operator()<T, int(kGluSilu), kVec>() : launch.template operator()<T, int(kGluSilu), 1>();
    } else {
      vec ? launch.template operator()<T, int(kGluGeluTanh), kVec>()
          : launch.template operator()<T, int(kGluGeluTanh), 1>();
    }
  };
  switch (dtype) {
    case at::kFloat: return with_type(float{});
    case at::kHalf: return with_type(__half{});
    case at::kBFloat16: return with_type(__nv_bfloat16{});
    default: TORCH_CHECK(false, "glu: CUDA kernels take float32, float16 or bfloat16, got ", dtype);
  }
}

int64_t blocks_for(const GluShape& s) { return (s.rows * s.chunks_per_row + kGluThreads - 1) / kGluThreads; }

}  // namespace

at::Tensor glu_forward(const at::Tensor& gate, const at::Tensor& up, int64_t activation) {
  TORCH_CHECK(activation == kGluSilu || activation == kGluGeluTanh, "glu: unknown activation code ", activation);
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return out;
  at::Tensor g2 = as_rows(gate), u2 = as_rows(up);
  const int64_t es = gate.element_size();
  GluShape s = glu_shape(g2, {row_stride(g2), row_stride(u2)}, int(16 / es));
  const bool vec = vectorizable({&g2, &u2, &out}, s, es);
  if (!vec) s = glu_shape(g2, {row_stride(g2), row_stride(u2)}, 1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_glu(gate.scalar_type(), activation, vec, [&]<typename T, int ACT, int VEC>() {
    glu_forward_kernel<T, ACT, VEC><<<blocks_for(s), kGluThreads, 0, stream>>>(
        reinterpret_cast<const T*>(g2.data_ptr()), reinterpret_cast<const T*>(u2.data_ptr()),
        reinterpret_cast<T*>(out.data_ptr()), s);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_backward(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                                int64_t activation) {
  TORCH_CHECK(activation == kGluSilu || activation == kGluGeluTanh, "glu: unknown activation code ", activation);
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor dgate = at::empty(gate.sizes(), gate.options()), dup = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return {dgate, dup};
  at::Tensor g2 = as_rows(gate), u2 = as_rows(up), d2 = as_rows(dout);
  const int64_t es = gate.element_size();
  GluShape s = glu_shape(g2, {row_stride(g2), row_stride(u2), row_stride(d2)}, int(16 / es));
  const bool vec = vectorizable({&g2, &u2, &d2, &dgate, &dup}, s, es);
  if (!vec) s = glu_shape(g2, {row_stride(g2), row_stride(u2), row_stride(d2)}, 1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_glu(gate.scalar_type(), activation, vec, [&]<typename T, int ACT, int VEC>() {
    glu_backward_kernel<T, ACT, VEC><<<blocks_for(s), kGluThreads, 0, stream>>>(
        reinterpret_cast<const T*>(g2.data_ptr()), reinterpret_cast<const T*>(u2.data_ptr()),
        reinterpret_cast<const T*>(d2.data_ptr()), reinterpret_cast<T*>(dgate.data_ptr()),
        reinterpret_cast<T*>(dup.data_ptr()), s);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dgate, dup};
}

}  // namespace tmf
