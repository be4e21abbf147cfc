// SwiGLU / GeGLU on CUDA tensors (csrc/ops.h): host code for the kernels in csrc/cuda/glu_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>

#include "glu_kernels.cuh"
#include "ops.h"

namespace tmf {
namespace {

using cuda::GluShape;

// Generic kernels (rows with strides): block size and 16-byte chunks per thread, the fastest measured side by side
// (benchmarks/cuda_glu_rope_bench.cu); contiguous operands take the flat kernels. With whole-chunk loads (all of a
// thread's loads issued back to back) more chunks per thread means more bytes in flight: 256 threads x 4 beat 128 x 4
// and 256 x 2, the rule before, forward and backward (ledger: swiglu, kernel, H200, bfloat16 8192x11008 and
// 16384x14336, run cuda-h200-2026-12-01-glu-rope-variants-379d040, variants "generic <threads> threads x <chunks>").
constexpr int kGluThreads = 256;
constexpr int kGluForwardItems = 4;
constexpr int kGluBackwardItems = 4;
constexpr int kGluFlatThreads = 256;

int64_t flat_blocks(int64_t n, int vec) {
  const int64_t per_block = int64_t(kGluFlatThreads) * vec;
  return (n + per_block - 1) / per_block;
}

GluShape glu_shape(const at::Tensor& lead2, std::initializer_list<int64_t> strides, int vec, int items) {
  return cuda::glu_shape(lead2.size(0), lead2.size(1), strides.begin(), int(strides.size()), vec,
                         kGluThreads * items);
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

}  // namespace

at::Tensor glu_forward(const at::Tensor& gate, const at::Tensor& up, int64_t activation) {
  TORCH_CHECK(activation == kGluSilu || activation == kGluGeluTanh, "glu: unknown activation code ", activation);
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return out;
  at::Tensor g2 = as_rows(gate), u2 = as_rows(up);
  const int64_t es = gate.element_size();
  GluShape s = glu_shape(g2, {row_stride(g2), row_stride(u2)}, int(16 / es), kGluForwardItems);
  const bool vec = vectorizable({&g2, &u2, &out}, s, es);
  if (!vec) s = glu_shape(g2, {row_stride(g2), row_stride(u2)}, 1, kGluForwardItems);
  TORCH_INTERNAL_ASSERT(!vec || s.rows == 1 || s.cols % (16 / es) == 0, "glu: generic kernels take whole chunks");
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_glu(gate.scalar_type(), activation, vec, [&]<typename T, int ACT, int VEC>() {
    if (vec && s.rows == 1) {
      cuda::glu_forward_flat<T, ACT, VEC><<<flat_blocks(s.cols, VEC), kGluFlatThreads, 0, stream>>>(
          reinterpret_cast<const T*>(g2.data_ptr()), reinterpret_cast<const T*>(u2.data_ptr()),
          reinterpret_cast<T*>(out.data_ptr()), s.cols);
      return;
    }
    cuda::glu_forward_kernel<T, ACT, VEC, kGluThreads, kGluForwardItems><<<s.rows * s.blocks_per_row, kGluThreads, 0,
                                                                            stream>>>(
        reinterpret_cast<const T*>(g2.data_ptr()), reinterpret_cast<const T*>(u2.data_ptr()),
        reinterpret_cast<T*>(out.data_ptr()), s);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// In place, each element of gate and up is read by the thread that then writes its gradient there, after reading it
// (the vector kernels load their whole chunk first; the scalar tail takes its operands by value).
std::tuple<at::Tensor, at::Tensor> glu_backward(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                                int64_t activation, bool in_place) {
  TORCH_CHECK(activation == kGluSilu || activation == kGluGeluTanh, "glu: unknown activation code ", activation);
  TORCH_CHECK(!in_place || (gate.is_contiguous() && up.is_contiguous()), "glu backward in place: gate and up must be "
              "contiguous");
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor dgate = in_place ? gate : at::empty(gate.sizes(), gate.options());
  at::Tensor dup = in_place ? up : at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return {dgate, dup};
  at::Tensor g2 = as_rows(gate), u2 = as_rows(up), d2 = as_rows(dout);
  const int64_t es = gate.element_size();
  GluShape s = glu_shape(g2, {row_stride(g2), row_stride(u2), row_stride(d2)}, int(16 / es), kGluBackwardItems);
  const bool vec = vectorizable({&g2, &u2, &d2, &dgate, &dup}, s, es);
  if (!vec) s = glu_shape(g2, {row_stride(g2), row_stride(u2), row_stride(d2)}, 1, kGluBackwardItems);
  TORCH_INTERNAL_ASSERT(!vec || s.rows == 1 || s.cols % (16 / es) == 0, "glu: generic kernels take whole chunks");
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_glu(gate.scalar_type(), activation, vec, [&]<typename T, int ACT, int VEC>() {
    if (vec && s.rows == 1) {
      cuda::glu_backward_flat<T, ACT, VEC><<<flat_blocks(s.cols, VEC), kGluFlatThreads, 0, stream>>>(
          reinterpret_cast<const T*>(g2.data_ptr()), reinterpret_cast<const T*>(u2.data_ptr()),
          reinterpret_cast<const T*>(d2.data_ptr()), reinterpret_cast<T*>(dgate.data_ptr()),
          reinterpret_cast<T*>(dup.data_ptr()), s.cols);
      return;
    }
    cuda::glu_backward_kernel<T, ACT, VEC, kGluThreads, kGluBackwardItems><<<s.rows * s.blocks_per_row, kGluThreads,
                                                                              0, stream>>>(
        reinterpret_cast<const T*>(g2.data_ptr()), reinterpret_cast<const T*>(u2.data_ptr()),
        reinterpret_cast<const T*>(d2.data_ptr()), reinterpret_cast<T*>(dgate.data_ptr()),
        reinterpret_cast<T*>(dup.data_ptr()), s);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dgate, dup};
}

}  // namespace tmf
