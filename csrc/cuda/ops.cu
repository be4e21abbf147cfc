// The CUDA backend's kernel entry points (csrc/ops.h): launch decisions for the row kernels in
// row_kernels.cuh, and the LoRA products on cuBLAS.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>

#include "ops.h"
#include "row_kernels.cuh"
#include "tmf/launch/lora_linear.h"

namespace tmf {
namespace {

using cuda::kMaxItems;

#define TMF_DISPATCH_FLOAT_TYPES(dtype, NAME, ...)                                    \
  [&] {                                                                               \
    switch (dtype) {                                                                  \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }               \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }               \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }    \
      default: TORCH_CHECK(false, NAME ": CUDA kernels take float32, float16 or bfloat16, got ", dtype); \
    }                                                                                 \
  }()

bool aligned16(const at::Tensor& t, int64_t row_stride_elems) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (row_stride_elems * t.element_size()) % 16 == 0;
}

// How a row is spread over a block: VEC elements per load, ITEMS loads per thread, `threads` (<= 512) threads.
// Register-resident rows are capped at MAX_ELEMS elements per thread (32 for the forward kernels, 16 for the
// backward ones, which hold two to four such arrays) so no kernel spills; longer rows use the looped kernels.
struct RowLayout {
  int vec, items, threads;
  bool looped;
};

constexpr int kMaxThreads = 512;

template <int MAX_ELEMS>
RowLayout row_layout(int64_t cols, int element_size, bool aligned) {
  const int vec = aligned && (cols * element_size) % 16 == 0 ? 16 / element_size : 1;
  const int64_t nvec = (cols + vec - 1) / vec;
  // The fewest items per thread that fit 512 threads. (Preferring 256-thread blocks with more items was
  // measured on an H100: no better at 8192x4096, 5-20 % slower at 4096x8192.)
  for (int items = 1; items <= kMaxItems && items * vec <= MAX_ELEMS; items *= 2) {
    const int64_t threads = (nvec + items - 1) / items;
    if (threads <= kMaxThreads) {
      return RowLayout{vec, items, int(std::max<int64_t>(32, (threads + 31) / 32 * 32)), false};
    }
  }
  return RowLayout{1, 1, 1024, true};
}

// Calls f.template operator()<VEC, ITEMS>() for the layout's compile-time parameters (only the
// combinations row_layout<MAX_ELEMS> can choose are instantiated).
template <int MAX_ELEMS, int VEC, class F>
void with_items(int items, F&& f) {
  if constexpr (VEC <= MAX_ELEMS) {
    if (items == 1) return f.template operator()<VEC, 1>();
  }
  if constexpr (2 * VEC <= MAX_ELEMS) {
    if (items == 2) return f.template operator()<VEC, 2>();
  }
  if constexpr (4 * VEC <= MAX_ELEMS) {
    if (items == 4) return f.template operator()<VEC, 4>();
  }
  if constexpr (8 * VEC <= MAX_ELEMS) {
    if (items == 8) return f.template operator()<VEC, 8>();
  }
  TORCH_CHECK(false, "torch_metal_fused: no row layout with ", items, " items of ", VEC);
}
template <int MAX_ELEMS, typename T, class F>
void with_layout(const RowLayout& l, F&& f) {
  if (l.vec == 1) with_items<MAX_ELEMS, 1>(l.items, f);
  else with_items<MAX_ELEMS, 16 / sizeof(T)>(l.items, f);
}

constexpr int kForwardElems = 32;
constexpr int kBackwardElems = 16;

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace

at::Tensor softmax_forward(const at::Tensor& x) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  at::Tensor x2 = as_rows(x);
  const int64_t rows = x2.size(0), cols = x2.size(1), stride = row_stride(x2);
  TORCH_CHECK(cols <= std::numeric_limits<int>::max(), "softmax: row length over 2^31");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const RowLayout l = row_layout<kForwardElems>(cols, x.element_size(), aligned16(x2, stride));
  TMF_DISPATCH_FLOAT_TYPES(x.scalar_type(), "softmax", [&] {
    using T = scalar_t;
    const T* xp = reinterpret_cast<const T*>(x2.data_ptr());
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    if (l.looped) {
      cuda::softmax_forward_looped<T><<<rows, l.threads, 0, stream>>>(xp, yp, int(cols), stride);
    } else {
      with_layout<kForwardElems, T>(l, [&]<int VEC, int ITEMS>() {
        cuda::softmax_forward_registers<T, VEC, ITEMS><<<rows, l.threads, 0, stream>>>(xp, yp, int(cols), stride);
      });
    }
  });
  check_launch();
  return y;
}

at::Tensor softmax_backward(const at::Tensor& y, const at::Tensor& dy) {
  c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dx = at::empty(y.sizes(), y.options());
  if (y.numel() == 0) return dx;
  at::Tensor y2 = as_rows(y.contiguous()), dy2 = as_rows(dy);
  const int64_t rows = y2.size(0), cols = y2.size(1), stride = row_stride(dy2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const RowLayout l = row_layout<kBackwardElems>(cols, y.element_size(), aligned16(y2, cols) && aligned16(dy2, stride));
  TMF_DISPATCH_FLOAT_TYPES(y.scalar_type(), "softmax backward", [&] {
    using T = scalar_t;
    const T* yp = reinterpret_cast<const T*>(y2.data_ptr());
    const T* dyp = reinterpret_cast<const T*>(dy2.data_ptr());
    T* dxp = reinterpret_cast<T*>(dx.data_ptr());
    if (l.looped) {
      cuda::softmax_backward_looped<T><<<rows, l.threads, 0, stream>>>(yp, dyp, dxp, int(cols), stride);
    } else {
      with_layout<kBackwardElems, T>(l, [&]<int VEC, int ITEMS>() {
        cuda::softmax_backward_registers<T, VEC, ITEMS>
            <<<rows, l.threads, 0, stream>>>(yp, dyp, dxp, int(cols), stride);
      });
    }
  });
  check_launch();
  return dx;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const OptTensor& weight, double eps,
                                                    double offset) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y, rstd;
  std::tie(y, rstd) = rms_norm_outputs(x, eps);  // not a structured binding: lambdas below capture them (C++17)
  if (x.numel() == 0) return {y, rstd};
  at::Tensor x2 = as_rows(x);
  at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const int64_t rows = x2.size(0), cols = x2.size(1), stride = row_stride(x2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool aligned = aligned16(x2, stride) && (!w.defined() || aligned16(w, cols));
  const RowLayout l = row_layout<kForwardElems>(cols, x.element_size(), aligned);
  TMF_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm", [&] {
    using T = scalar_t;
    const T* xp = reinterpret_cast<const T*>(x2.data_ptr());
    const T* wp = w.defined() ? reinterpret_cast<const T*>(w.data_ptr()) : nullptr;
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    float* rp = rstd.data_ptr<float>();
    if (l.looped) {
      cuda::rms_norm_forward_looped<T>
          <<<rows, l.threads, 0, stream>>>(xp, wp, yp, rp, int(cols), stride, float(eps), float(offset));
    } else {
      with_layout<kForwardElems, T>(l, [&]<int VEC, int ITEMS>() {
        cuda::rms_norm_forward_registers<T, VEC, ITEMS>
            <<<rows, l.threads, 0, stream>>>(xp, wp, yp, rp, int(cols), stride, float(eps), float(offset));
      });
    }
  });
  check_launch();
  return {y, rstd};
}

std::tuple<OptTensor, OptTensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight,
                                                   const at::Tensor& rstd, bool needs_dx, bool needs_dw,
                                                   double offset) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  needs_dw = needs_dw && weight.has_value();
  at::Tensor dx = needs_dx ? at::empty(x.sizes(), x.options()) : at::Tensor();
  // dw is written whole by the reduce kernel; only empty inputs need it zeroed.
  at::Tensor dw = needs_dw ? (x.numel() > 0 ? at::empty({cols}, x.options()) : at::zeros({cols}, x.options()))
                           : at::Tensor();
  if (x.numel() > 0 && (needs_dx || needs_dw)) {
    at::Tensor x2 = as_rows(x), dy2 = as_rows(dy);
    const int64_t rows = x2.size(0), xs = row_stride(x2), dys = row_stride(dy2);
    at::Tensor w = weight ? weight->contiguous() : at::Tensor();
    at::Tensor r = rstd.contiguous();
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
    const int groups = int(std::min<int64_t>(rows, 4 * sms));  // dw partial rows: few next to x's rows
    at::Tensor partial = needs_dw ? at::empty({groups, cols}, x.options().dtype(at::kFloat)) : at::Tensor();
    auto stream = c10::cuda::getCurrentCUDAStream();
    const bool aligned = aligned16(x2, xs) && aligned16(dy2, dys) && (!w.defined() || aligned16(w, cols));
    const RowLayout l = row_layout<kBackwardElems>(cols, x.element_size(), aligned);
    TMF_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm backward", [&] {
      using T = scalar_t;
      const T* dyp = reinterpret_cast<const T*>(dy2.data_ptr());
      const T* xp = reinterpret_cast<const T*>(x2.data_ptr());
      const T* wp = w.defined() ? reinterpret_cast<const T*>(w.data_ptr()) : nullptr;
      T* dxp = needs_dx ? reinterpret_cast<T*>(dx.data_ptr()) : nullptr;
      float* pp = needs_dw ? partial.data_ptr<float>() : nullptr;
      auto launch = [&]<bool DX, bool DW>() {
        if (l.looped) {
          cuda::rms_norm_backward_looped<T, DX, DW><<<groups, l.threads, 0, stream>>>(
              dyp, xp, wp, r.data_ptr<float>(), dxp, pp, rows, int(cols), xs, dys, float(offset));
        } else {
          with_layout<kBackwardElems, T>(l, [&]<int VEC, int ITEMS>() {
            cuda::rms_norm_backward_registers<T, VEC, ITEMS, DX, DW><<<groups, l.threads, 0, stream>>>(
                dyp, xp, wp, r.data_ptr<float>(), dxp, pp, rows, int(cols), xs, dys, float(offset));
          });
        }
      };
      if (needs_dx && needs_dw) launch.template operator()<true, true>();
      else if (needs_dx) launch.template operator()<true, false>();
      else launch.template operator()<false, true>();
      check_launch();
      if (needs_dw) {
        cuda::rms_norm_dw_reduce<T>
            <<<(cols + cuda::kDwReduceCols - 1) / cuda::kDwReduceCols, dim3(cuda::kDwReduceCols, cuda::kDwReduceSlices),
               0, stream>>>(pp, reinterpret_cast<T*>(dw.data_ptr()), groups, int(cols));
        check_launch();
      }
    });
  }
  return {needs_dx ? OptTensor(dx) : std::nullopt, needs_dw ? OptTensor(dw) : std::nullopt};
}

// ---- cross-entropy row pass --------------------------------------------------------------------------------
std::tuple<at::Tensor, OptTensor> cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing, double softcap,
                                                     const OptTensor& row_scale, bool in_place) {
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor loss;
  OptTensor grad;
  std::tie(loss, grad) = cross_entropy_outputs(logits, row_scale, in_place);  // the lambda below captures them
  if (rows == 0) return {loss, grad};
  TORCH_CHECK(vocab > 0 && vocab <= std::numeric_limits<int>::max(), "cross-entropy: vocabulary size out of range");
  TORCH_CHECK(ignore_index >= std::numeric_limits<int>::min() && ignore_index <= std::numeric_limits<int>::max(),
              "cross-entropy: ignore_index must fit in 32 bits");
  at::Tensor l2 = as_rows(logits), t = target.to(at::kInt).contiguous();
  at::Tensor scale = row_scale ? row_scale->to(at::kFloat).contiguous() : at::Tensor();
  const int threads = int(std::min<int64_t>(1024, (vocab + 31) / 32 * 32));
  auto stream = c10::cuda::getCurrentCUDAStream();
  TMF_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "cross_entropy", [&] {
    using T = scalar_t;
    cuda::cross_entropy_rows_looped<T><<<rows, threads, 0, stream>>>(
        reinterpret_cast<const T*>(l2.data_ptr()), row_stride(l2), t.data_ptr<int>(),
        row_scale ? scale.data_ptr<float>() : nullptr, loss.data_ptr<float>(),
        grad ? reinterpret_cast<T*>(grad->data_ptr()) : nullptr, int(vocab), int(ignore_index),
        float(label_smoothing), float(softcap), row_scale.has_value());
  });
  check_launch();
  return {loss, grad};
}

// ---- LoRA: the products on cuBLAS; merged-weight route chosen by tmf::launch::lora_use_merged_weight --------
namespace {

bool use_merged_weight(int64_t tokens, int64_t in_features, const OptTensor& dropout_mask) {
  return launch::lora_use_merged_weight(tokens, in_features, dropout_mask.has_value());
}

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  return at::addmm(weight, lora_b, lora_a, 1.0, scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                const OptTensor& dropout_mask) {
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_lora = dropout_mask ? x * *dropout_mask : x;
  at::Tensor h = at::mm(x_lora, lora_a.t());
  if (use_merged_weight(x.size(0), x.size(1), dropout_mask)) {
    return {at::linear(x, merged_weight(weight, lora_a, lora_b, scale), bias), h};
  }
  at::Tensor y = at::linear(x, weight, bias);
  y.addmm_(h, lora_b.t(), 1.0, scale);
  return {y, h};
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> lora_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& h, double scale, const OptTensor& dropout_mask,
    std::array<bool, 5> needs) {
  c10::cuda::CUDAGuard guard(x.device());
  const auto [needs_dx, needs_dw, needs_db, needs_da, needs_dlb] = needs;
  at::Tensor dy2 = as_rows(dy);
  OptTensor dx, dw, dbias, da, dlb;
  if (needs_dx || needs_da) {
    at::Tensor dh = at::mm(dy2, lora_b).mul_(scale);
    if (needs_dx) {
      if (use_merged_weight(x.size(0), x.size(1), dropout_mask)) {
        dx = at::mm(dy2, merged_weight(weight, lora_a, lora_b, scale));
      } else {
        at::Tensor lora_dx = at::mm(dh, lora_a);
        if (dropout_mask) lora_dx.mul_(*dropout_mask);
        dx = at::addmm(lora_dx, dy2, weight);
      }
    }
    if (needs_da) da = at::mm(dh.t(), dropout_mask ? x * *dropout_mask : x);
  }
  if (needs_dlb) dlb = at::mm(dy2.t(), h).mul_(scale);
  if (needs_dw) dw = at::mm(dy2.t(), x);
  if (needs_db) dbias = dy2.sum(0);
  return {dx, dw, dbias, da, dlb};
}

}  // namespace tmf
