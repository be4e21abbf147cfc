// Rotary position embedding of q and k on CUDA tensors (csrc/ops.h): the twin of shaders/rope.metal. One thread per
// (batch, position, slot) loads its cos/sin values once and walks every head of q, then of k, so cos and sin are read
// once per position and q and k once each; float32 math. Slots, pairs and the backward (transposed) rotation as in
// tmf::RopeParams (csrc/include/tmf/shader_args.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops.h"
#include "row_kernels.cuh"  // to_float / from_float (torch builds with the half/bfloat16 conversions off)

namespace tmf {
namespace {

constexpr int kRopeThreads = 256;

struct RopeShape {
  int64_t batch, seq, head_dim, rotary_dim, q_heads, k_heads;
  int64_t q_batch_stride, q_head_stride, q_seq_stride, k_batch_stride, k_head_stride, k_seq_stride;
  int64_t cos_batch_stride;
  bool interleaved, backward;
};

template <typename T>
__device__ __forceinline__ void rotate_heads(const T* x, int64_t head_stride, T* out, int64_t out_head_stride,
                                             int64_t heads, int64_t a, int64_t b, float cos_a, float cos_b,
                                             float sin_for_a, float sin_for_b) {
  for (int64_t h = 0; h < heads; ++h) {
    const T* xr = x + h * head_stride;
    T* o = out + h * out_head_stride;
    const float xa = cuda::to_float(xr[a]), xb = cuda::to_float(xr[b]);
    o[a] = cuda::from_float<T>(xa * cos_a - xb * sin_for_a);
    o[b] = cuda::from_float<T>(xb * cos_b + xa * sin_for_b);
  }
}

template <typename T>
__global__ void rope_apply_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ cos_table,
                                  const T* __restrict__ sin_table, T* __restrict__ q_out, T* __restrict__ k_out,
                                  RopeShape p) {
  const int64_t half_rotary = p.rotary_dim / 2, slots = half_rotary + (p.head_dim - p.rotary_dim);
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t position = index / slots;
  if (position >= p.batch * p.seq) return;
  const int64_t slot = index - position * slots, bi = position / p.seq, s = position - bi * p.seq;
  const T* qx = q + bi * p.q_batch_stride + s * p.q_seq_stride;
  const T* kx = k + bi * p.k_batch_stride + s * p.k_seq_stride;
  const int64_t out_head_stride = p.seq * p.head_dim;
  T* qo = q_out + (bi * p.q_heads * p.seq + s) * p.head_dim;
  T* ko = k_out + (bi * p.k_heads * p.seq + s) * p.head_dim;
  if (slot < half_rotary) {
    const int64_t a = p.interleaved ? 2 * slot : slot, b = p.interleaved ? 2 * slot + 1 : slot + half_rotary;
    const int64_t cs = bi * p.cos_batch_stride + s * p.rotary_dim;
    const float cos_a = cuda::to_float(cos_table[cs + a]), cos_b = cuda::to_float(cos_table[cs + b]);
    const float sin_a = cuda::to_float(sin_table[cs + a]), sin_b = cuda::to_float(sin_table[cs + b]);
    const float sin_for_a = p.backward ? -sin_b : sin_a, sin_for_b = p.backward ? -sin_a : sin_b;
    rotate_heads(qx, p.q_head_stride, qo, out_head_stride, p.q_heads, a, b, cos_a, cos_b, sin_for_a, sin_for_b);
    rotate_heads(kx, p.k_head_stride, ko, out_head_stride, p.k_heads, a, b, cos_a, cos_b, sin_for_a, sin_for_b);
  } else {
    const int64_t e = p.rotary_dim + (slot - half_rotary);
    for (int64_t h = 0; h < p.q_heads; ++h) qo[h * out_head_stride + e] = qx[h * p.q_head_stride + e];
    for (int64_t h = 0; h < p.k_heads; ++h) ko[h * out_head_stride + e] = kx[h * p.k_head_stride + e];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, bool interleaved, bool backward) {
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  if (q.numel() + k.numel() == 0) return {q_out, k_out};
  const at::Tensor q4 = rope_operand(q), k4 = rope_operand(k);
  const int64_t rotary_dim = cos.size(2);
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= q.size(3), "rope: rotary_dim must be even and <= head_dim");
  const RopeShape p{q.size(0),     q.size(2),      q.size(3),      rotary_dim,     q.size(1),
                    k.size(1),     q4.stride(0),   q4.stride(1),   q4.stride(2),   k4.stride(0),
                    k4.stride(1),  k4.stride(2),   cos.size(0) == 1 ? 0 : q.size(2) * rotary_dim,
                    interleaved,   backward};
  const int64_t total = p.batch * p.seq * (rotary_dim / 2 + p.head_dim - rotary_dim);
  const int64_t blocks = (total + kRopeThreads - 1) / kRopeThreads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto type_tag) {
    using T = decltype(type_tag);
    rope_apply_kernel<T><<<blocks, kRopeThreads, 0, stream>>>(
        reinterpret_cast<const T*>(q4.data_ptr()), reinterpret_cast<const T*>(k4.data_ptr()),
        reinterpret_cast<const T*>(cos.data_ptr()), reinterpret_cast<const T*>(sin.data_ptr()),
        reinterpret_cast<T*>(q_out.data_ptr()), reinterpret_cast<T*>(k_out.data_ptr()), p);
  };
  switch (q.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kHalf: launch(__half{}); break;
    case at::kBFloat16: launch(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "rope: CUDA kernels take float32, float16 or bfloat16, got ", q.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q_out, k_out};
}

}  // namespace tmf
