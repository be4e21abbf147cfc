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

// The rotate_half convention with every rotation pair's halves in 16-byte packs: each thread takes VEC consecutive
// pairs (a .. a+VEC-1 and their partners b = a + rotary_dim/2 ..), so it loads and stores two 16-byte packs per head
// instead of 2·VEC scalars; the heads loop is unrolled so several heads' loads are in flight. Taken when rotary_dim
// == head_dim, (rotary_dim / 2) % VEC == 0 and every pointer and stride is 16-byte aligned (HF's q/k/cos/sin are).
template <typename T, int VEC>
struct alignas(16) RopePack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void rotate_heads_packed(const T* x, int64_t head_stride, T* out, int64_t out_head_stride,
                                                    int64_t heads, int64_t a, int64_t b, const float* cos_a,
                                                    const float* cos_b, const float* sin_for_a,
                                                    const float* sin_for_b) {
#pragma unroll 4
  for (int64_t h = 0; h < heads; ++h) {
    const RopePack<T, VEC> xa = *reinterpret_cast<const RopePack<T, VEC>*>(x + h * head_stride + a);
    const RopePack<T, VEC> xb = *reinterpret_cast<const RopePack<T, VEC>*>(x + h * head_stride + b);
    RopePack<T, VEC> oa, ob;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float fa = cuda::to_float(xa.v[i]), fb = cuda::to_float(xb.v[i]);
      oa.v[i] = cuda::from_float<T>(fa * cos_a[i] - fb * sin_for_a[i]);
      ob.v[i] = cuda::from_float<T>(fb * cos_b[i] + fa * sin_for_b[i]);
    }
    *reinterpret_cast<RopePack<T, VEC>*>(out + h * out_head_stride + a) = oa;
    *reinterpret_cast<RopePack<T, VEC>*>(out + h * out_head_stride + b) = ob;
  }
}

template <typename T, int VEC>
__global__ void rope_rotate_half_packed_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ cos_table, const T* __restrict__ sin_table,
                                               T* __restrict__ q_out, T* __restrict__ k_out, RopeShape p) {
  const int64_t half_rotary = p.rotary_dim / 2, packs = half_rotary / VEC;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t position = index / packs;
  if (position >= p.batch * p.seq) return;
  const int64_t pack = index - position * packs, bi = position / p.seq, s = position - bi * p.seq;
  const int64_t a = pack * VEC, b = a + half_rotary;
  const int64_t cs = bi * p.cos_batch_stride + s * p.rotary_dim;
  const RopePack<T, VEC> ca = *reinterpret_cast<const RopePack<T, VEC>*>(cos_table + cs + a);
  const RopePack<T, VEC> cb = *reinterpret_cast<const RopePack<T, VEC>*>(cos_table + cs + b);
  const RopePack<T, VEC> sa = *reinterpret_cast<const RopePack<T, VEC>*>(sin_table + cs + a);
  const RopePack<T, VEC> sb = *reinterpret_cast<const RopePack<T, VEC>*>(sin_table + cs + b);
  float cos_a[VEC], cos_b[VEC], sin_for_a[VEC], sin_for_b[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    cos_a[i] = cuda::to_float(ca.v[i]);
    cos_b[i] = cuda::to_float(cb.v[i]);
    const float sin_a = cuda::to_float(sa.v[i]), sin_b = cuda::to_float(sb.v[i]);
    sin_for_a[i] = p.backward ? -sin_b : sin_a;
    sin_for_b[i] = p.backward ? -sin_a : sin_b;
  }
  const int64_t out_head_stride = p.seq * p.head_dim;
  rotate_heads_packed<T, VEC>(q + bi * p.q_batch_stride + s * p.q_seq_stride, p.q_head_stride,
                              q_out + (bi * p.q_heads * p.seq + s) * p.head_dim, out_head_stride, p.q_heads, a, b,
                              cos_a, cos_b, sin_for_a, sin_for_b);
  rotate_heads_packed<T, VEC>(k + bi * p.k_batch_stride + s * p.k_seq_stride, p.k_head_stride,
                              k_out + (bi * p.k_heads * p.seq + s) * p.head_dim, out_head_stride, p.k_heads, a, b,
                              cos_a, cos_b, sin_for_a, sin_for_b);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

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
  const int64_t es = q.element_size(), vec = 16 / es;
  bool packed = !interleaved && rotary_dim == p.head_dim && (rotary_dim / 2) % vec == 0;
  for (const void* ptr : {q4.data_ptr(), k4.data_ptr(), cos.data_ptr(), sin.data_ptr(), q_out.data_ptr(),
                          k_out.data_ptr()})
    packed = packed && aligned16(ptr);
  for (int64_t st : {p.q_batch_stride, p.q_head_stride, p.q_seq_stride, p.k_batch_stride, p.k_head_stride,
                     p.k_seq_stride, p.cos_batch_stride, p.head_dim})
    packed = packed && (st * es) % 16 == 0;
  auto launch = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (packed) {
      constexpr int kVec = 16 / sizeof(T);
      const int64_t packed_total = p.batch * p.seq * (rotary_dim / 2 / kVec);
      rope_rotate_half_packed_kernel<T, kVec><<<(packed_total + kRopeThreads - 1) / kRopeThreads, kRopeThreads, 0,
                                                stream>>>(
          reinterpret_cast<const T*>(q4.data_ptr()), reinterpret_cast<const T*>(k4.data_ptr()),
          reinterpret_cast<const T*>(cos.data_ptr()), reinterpret_cast<const T*>(sin.data_ptr()),
          reinterpret_cast<T*>(q_out.data_ptr()), reinterpret_cast<T*>(k_out.data_ptr()), p);
      return;
    }
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
