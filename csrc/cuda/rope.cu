// Rotary position embedding of q and k on CUDA tensors (csrc/ops.h): host code choosing among the kernels in
// csrc/cuda/rope_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "rope_kernels.cuh"

namespace tmf {
namespace {

using cuda::RopeShape;

constexpr int kRopeThreads = 256;

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
    const T* q_in = reinterpret_cast<const T*>(q4.data_ptr());
    const T* k_in = reinterpret_cast<const T*>(k4.data_ptr());
    const T* cos_in = reinterpret_cast<const T*>(cos.data_ptr());
    const T* sin_in = reinterpret_cast<const T*>(sin.data_ptr());
    T* q_o = reinterpret_cast<T*>(q_out.data_ptr());
    T* k_o = reinterpret_cast<T*>(k_out.data_ptr());
    if (packed) {
      constexpr int kVec = 16 / sizeof(T);
      const int64_t threads = p.batch * (p.q_heads + p.k_heads) * p.seq * (rotary_dim / 2 / kVec);
      cuda::rope_rotate_half_heads_kernel<T, kVec>
          <<<(threads + kRopeThreads - 1) / kRopeThreads, kRopeThreads, 0, stream>>>(q_in, k_in, cos_in, sin_in, q_o,
                                                                                     k_o, p);
    } else {
      cuda::rope_apply_kernel<T><<<blocks, kRopeThreads, 0, stream>>>(q_in, k_in, cos_in, sin_in, q_o, k_o, p);
    }
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
