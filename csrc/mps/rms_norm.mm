// RMSNorm on MPS tensors: shaders/rms_norm.metal through the shared launch code (tmf/launch/rms_norm.h).
#include <cmath>
#include <limits>

#include "mps_encoder.h"
#include "ops.h"
#include "tmf/launch/rms_norm.h"

namespace tmf {

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const OptTensor& weight, double eps,
                                                    double offset) {
  at::Tensor y, rstd;
  std::tie(y, rstd) = rms_norm_outputs(x, eps);  // not a structured binding: lambdas below capture them (C++17)
  if (x.numel() == 0) return {y, rstd};
  at::Tensor x2 = as_rows(x);
  at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::rms_norm_forward(enc, mps::dtype_of(x), mps::buffer_of(x2), row_stride(x2), mps::buffer_of(w),
                             mps::buffer_of(y), mps::buffer_of(rstd), x2.size(0), x2.size(1), float(eps),
                             float(offset));
  });
  return {y, rstd};
}

std::tuple<OptTensor, OptTensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight,
                                                   const at::Tensor& rstd, bool needs_dx, bool needs_dw,
                                                   double offset) {
  const int64_t cols = x.size(-1);
  needs_dw = needs_dw && weight.has_value();
  at::Tensor dx = needs_dx ? at::empty(x.sizes(), x.options()) : at::Tensor();
  // at::empty: the reduce kernel writes every column (a zero fill would run on a blit encoder and end PyTorch's
  // kernel coalescing); an empty x is the one case without a kernel, and its dw is zero.
  at::Tensor dw = needs_dw ? (x.numel() > 0 ? at::empty({cols}, x.options()) : at::zeros({cols}, x.options()))
                           : at::Tensor();
  if (x.numel() > 0 && (needs_dx || needs_dw)) {
    at::Tensor x2 = as_rows(x), dy2 = as_rows(dy);
    const int64_t rows = x2.size(0);
    at::Tensor partial = needs_dw ? at::empty({launch::rms_norm_backward_groups(rows, mps::gpu_core_count()), cols},
                                              x.options().dtype(at::kFloat))
                                  : at::Tensor();
    at::Tensor w = weight ? weight->contiguous() : at::Tensor();
    at::Tensor r = rstd.contiguous();
    mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
      launch::rms_norm_backward(enc, mps::dtype_of(x), mps::buffer_of(dy2), row_stride(dy2), mps::buffer_of(x2),
                                row_stride(x2), mps::buffer_of(w), mps::buffer_of(r), mps::buffer_of(dx),
                                mps::buffer_of(partial), mps::buffer_of(dw), rows, cols, float(offset));
    });
  }
  return {needs_dx ? OptTensor(dx) : std::nullopt, needs_dw ? OptTensor(dw) : std::nullopt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_add_forward(const at::Tensor& x, const at::Tensor& residual,
                                                                    const at::Tensor& weight, double eps,
                                                                    double offset) {
  if (x.numel() == 0 || x.size(-1) == 0) {  // no kernel work: the composition
    at::Tensor h = (x + residual).contiguous();
    auto [y, rstd] = rms_norm_forward(h, weight, eps, offset);
    return {y, h, rstd};
  }
  at::Tensor y, rstd;
  std::tie(y, rstd) = rms_norm_outputs(x, eps);
  at::Tensor h = at::empty(x.sizes(), x.options());
  at::Tensor x2 = as_rows(x), r2 = as_rows(residual), w = weight.contiguous();
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::rms_norm_forward(enc, mps::dtype_of(x), mps::buffer_of(x2), row_stride(x2), mps::buffer_of(w),
                             mps::buffer_of(y), mps::buffer_of(rstd), x2.size(0), x2.size(1), float(eps),
                             float(offset), mps::buffer_of(r2), row_stride(r2), mps::buffer_of(h));
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, OptTensor> rms_norm_add_backward(const at::Tensor& dy, const at::Tensor& dh, const at::Tensor& h,
                                                        const at::Tensor& weight, const at::Tensor& rstd,
                                                        bool needs_dw, double offset) {
  const int64_t cols = h.size(-1);
  if (h.numel() == 0) {
    auto [dx, dw] = rms_norm_backward(dy, h, weight, rstd, true, needs_dw, offset);
    return {dx->add(dh), dw};
  }
  at::Tensor dx = at::empty(h.sizes(), h.options());
  at::Tensor dw = needs_dw ? at::empty({cols}, h.options()) : at::Tensor();
  at::Tensor h2 = as_rows(h.contiguous()), dy2 = as_rows(dy), dh2 = as_rows(dh);
  const int64_t rows = h2.size(0);
  at::Tensor partial = needs_dw ? at::empty({launch::rms_norm_backward_groups(rows, mps::gpu_core_count()), cols},
                                            h.options().dtype(at::kFloat))
                                : at::Tensor();
  at::Tensor w = weight.contiguous(), r = rstd.contiguous();
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::rms_norm_backward(enc, mps::dtype_of(h), mps::buffer_of(dy2), row_stride(dy2), mps::buffer_of(h2), cols,
                              mps::buffer_of(w), mps::buffer_of(r), mps::buffer_of(dx), mps::buffer_of(partial),
                              mps::buffer_of(dw), rows, cols, float(offset), mps::buffer_of(dh2), row_stride(dh2));
  });
  return {dx, needs_dw ? OptTensor(dw) : std::nullopt};
}

}  // namespace tmf
