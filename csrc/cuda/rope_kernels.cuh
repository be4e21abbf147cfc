// Rotary position embedding kernels for the CUDA backend (host code: csrc/cuda/rope.cu; timed side by side without
// PyTorch in benchmarks/cuda_glu_rope_bench.cu). The twin of shaders/rope.metal; float32 math. Slots, pairs and the
// backward (transposed) rotation as in tmf::RopeParams (csrc/include/tmf/shader_args.h). q and k are (batch, heads,
// seq, head_dim) with any strides (head_dim contiguous); outputs contiguous in that order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "row_kernels.cuh"  // to_float / from_float (torch builds with the half/bfloat16 conversions off)

namespace tmf::cuda {

struct RopeShape {
  int64_t batch, seq, head_dim, rotary_dim, q_heads, k_heads;
  int64_t q_batch_stride, q_head_stride, q_seq_stride, k_batch_stride, k_head_stride, k_seq_stride;
  int64_t cos_batch_stride;
  bool interleaved, backward;
};

// General kernel (any rotary_dim, interleaved pairs, unaligned operands): one thread per (batch, position, slot)
// loads its cos/sin values once and walks every head of q, then of k.
template <typename T>
__device__ __forceinline__ void rotate_heads(const T* x, int64_t head_stride, T* out, int64_t out_head_stride,
                                             int64_t heads, int64_t a, int64_t b, float cos_a, float cos_b,
                                             float sin_for_a, float sin_for_b) {
  for (int64_t h = 0; h < heads; ++h) {
    const T* xr = x + h * head_stride;
    T* o = out + h * out_head_stride;
    const float xa = to_float(xr[a]), xb = to_float(xr[b]);
    o[a] = from_float<T>(xa * cos_a - xb * sin_for_a);
    o[b] = from_float<T>(xb * cos_b + xa * sin_for_b);
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
    const float cos_a = to_float(cos_table[cs + a]), cos_b = to_float(cos_table[cs + b]);
    const float sin_a = to_float(sin_table[cs + a]), sin_b = to_float(sin_table[cs + b]);
    const float sin_for_a = p.backward ? -sin_b : sin_a, sin_for_b = p.backward ? -sin_a : sin_b;
    rotate_heads(qx, p.q_head_stride, qo, out_head_stride, p.q_heads, a, b, cos_a, cos_b, sin_for_a, sin_for_b);
    rotate_heads(kx, p.k_head_stride, ko, out_head_stride, p.k_heads, a, b, cos_a, cos_b, sin_for_a, sin_for_b);
  } else {
    const int64_t e = p.rotary_dim + (slot - half_rotary);
    for (int64_t h = 0; h < p.q_heads; ++h) qo[h * out_head_stride + e] = qx[h * p.q_head_stride + e];
    for (int64_t h = 0; h < p.k_heads; ++h) ko[h * out_head_stride + e] = kx[h * p.k_head_stride + e];
  }
}

// VEC elements of a head as one 16-byte load or store.
template <typename T, int VEC>
struct alignas(16) RopePack {
  T v[VEC];
};

// Head-parallel rotate_half kernel: one thread per (batch, head of q or k, position, pack) — VEC consecutive rotation
// pairs (a .. a+VEC-1 and their partners a + rotary_dim/2 ..) of one head, in 16-byte packs. Positions are the fastest
// index after the pack, so a warp writes 4 positions of a head as one contiguous 1 KB run (bf16, head_dim 128) and
// reads 4 runs of 256 B of the projection's (batch, seq, heads, head_dim) layout. cos/sin are re-read per head, from
// L1/L2 (the table is (seq, rotary_dim): ~1 MB at 4096 × 128 bf16). Against a thread per position walking every head
// with cos/sin in registers (the general kernel's design) and against 2, 4 or 8 heads per thread, every head in
// flight at once wins: more independent loads per SM (ledger: rope, kernel, H200, bfloat16 4x4096x32x8x128, run
// cuda-h200-2026-12-01-glu-rope-variants, variants "head-parallel, <n> heads", "per position (before)", "general
// (thread per slot)"). Taken when rotary_dim == head_dim,
// (rotary_dim / 2) % VEC == 0 and every pointer and stride is 16-byte aligned (HF's q/k/cos/sin are).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) rope_rotate_half_heads_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                     const T* __restrict__ cos_table,
                                                                     const T* __restrict__ sin_table,
                                                                     T* __restrict__ q_out, T* __restrict__ k_out,
                                                                     RopeShape p) {
  const int64_t half_rotary = p.rotary_dim / 2, packs = half_rotary / VEC, heads = p.q_heads + p.k_heads;
  int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= p.batch * heads * p.seq * packs) return;
  const int64_t pack = index % packs;
  index /= packs;
  const int64_t s = index % p.seq;
  index /= p.seq;
  const int64_t head = index % heads, bi = index / heads;
  const bool is_q = head < p.q_heads;
  const int64_t h = is_q ? head : head - p.q_heads;
  const T* x = is_q ? q + bi * p.q_batch_stride + s * p.q_seq_stride + h * p.q_head_stride
                    : k + bi * p.k_batch_stride + s * p.k_seq_stride + h * p.k_head_stride;
  T* out = is_q ? q_out + ((bi * p.q_heads + h) * p.seq + s) * p.head_dim
                : k_out + ((bi * p.k_heads + h) * p.seq + s) * p.head_dim;
  const int64_t a = pack * VEC, b = a + half_rotary;
  const RopePack<T, VEC> xa = *reinterpret_cast<const RopePack<T, VEC>*>(x + a);
  const RopePack<T, VEC> xb = *reinterpret_cast<const RopePack<T, VEC>*>(x + b);
  const int64_t cs = bi * p.cos_batch_stride + s * p.rotary_dim;
  const RopePack<T, VEC> ca = *reinterpret_cast<const RopePack<T, VEC>*>(cos_table + cs + a);
  const RopePack<T, VEC> cb = *reinterpret_cast<const RopePack<T, VEC>*>(cos_table + cs + b);
  const RopePack<T, VEC> sa = *reinterpret_cast<const RopePack<T, VEC>*>(sin_table + cs + a);
  const RopePack<T, VEC> sb = *reinterpret_cast<const RopePack<T, VEC>*>(sin_table + cs + b);
  RopePack<T, VEC> oa, ob;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float cos_a = to_float(ca.v[i]), cos_b = to_float(cb.v[i]);
    const float sin_a = to_float(sa.v[i]), sin_b = to_float(sb.v[i]);
    const float sin_for_a = p.backward ? -sin_b : sin_a, sin_for_b = p.backward ? -sin_a : sin_b;
    const float fa = to_float(xa.v[i]), fb = to_float(xb.v[i]);
    oa.v[i] = from_float<T>(fa * cos_a - fb * sin_for_a);
    ob.v[i] = from_float<T>(fb * cos_b + fa * sin_for_b);
  }
  *reinterpret_cast<RopePack<T, VEC>*>(out + a) = oa;
  *reinterpret_cast<RopePack<T, VEC>*>(out + b) = ob;
}

}  // namespace tmf::cuda
