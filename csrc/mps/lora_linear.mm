// LoRA linear on MPS tensors: the big GEMMs on PyTorch's native MPS matmul, the rank-r work in
// shaders/lora_linear.metal through the shared launch code (tmf/launch/lora_linear.h), on the same stream.
#include "mps_encoder.h"
#include "ops.h"
#include "tmf/launch/lora_linear.h"

namespace tmf {
namespace {

at::Tensor contiguous_or_undefined(const OptTensor& t) { return t ? t->contiguous() : at::Tensor(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                const OptTensor& dropout_mask) {
  const int64_t tokens = x.size(0), rank = lora_a.size(0);
  if (rank > int64_t(kLoraMaxRank)) {  // the kernels' tiles take rank <= kLoraMaxRank
    at::Tensor x_lora = dropout_mask ? x * *dropout_mask : x;
    at::Tensor h = at::matmul(x_lora, lora_a.t());
    at::Tensor y = at::linear(x, weight, bias);
    y.addmm_(h, lora_b.t(), 1.0, scale);
    return {y, h};
  }
  if (launch::lora_use_merged_weight(tokens, x.size(1), dropout_mask.has_value())) {
    at::Tensor merged = at::addmm(weight, lora_b, lora_a, 1.0, scale);  // W + s·B·A on the native matmul
    return {at::linear(x, merged, bias), at::matmul(x, lora_a.t())};
  }
  at::Tensor y = at::linear(x, weight, bias).contiguous();  // native GEMM on the MPS stream
  at::Tensor h = at::empty({tokens, rank}, x.options());
  if (tokens == 0) return {y, h};
  at::Tensor x2 = as_rows(x), a = lora_a.contiguous(), b = lora_b.contiguous();
  at::Tensor mask = contiguous_or_undefined(dropout_mask);
  mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
    launch::lora_forward_lowrank(enc, mps::dtype_of(x), mps::buffer_of(x2), row_stride(x2), mps::buffer_of(a),
                                 mps::buffer_of(b), mps::buffer_of(mask), mps::buffer_of(y), mps::buffer_of(h), tokens,
                                 x.size(1), weight.size(0), rank, float(scale));
  });
  return {y, h};
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> lora_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& h, double scale, const OptTensor& dropout_mask,
    std::array<bool, 5> needs) {
  const auto [needs_dx, needs_dw, needs_db, needs_da, needs_dlb] = needs;
  const int64_t tokens = x.size(0), rank = lora_a.size(0);
  at::Tensor dy2 = as_rows(dy);
  OptTensor dx, dw, dbias, da, dlb;
  at::Tensor x_lora = dropout_mask ? x * *dropout_mask : x;
  if (rank > int64_t(kLoraMaxRank)) {
    at::Tensor dh = at::matmul(dy2, lora_b) * scale;
    if (needs_dx) dx = at::addmm(dropout_mask ? at::matmul(dh, lora_a) * *dropout_mask : at::matmul(dh, lora_a), dy2, weight);
    if (needs_da) da = at::matmul(dh.t(), x_lora);
  } else if (launch::lora_use_merged_weight(tokens, x.size(1), dropout_mask.has_value())) {
    if (needs_dx) dx = at::matmul(dy2, at::addmm(weight, lora_b, lora_a, 1.0, scale));  // dy·W' = dy·W + dh·A
    if (needs_da) da = at::matmul((at::matmul(dy2, lora_b) * scale).t(), x);
  } else if (needs_dx || needs_da) {
    at::Tensor dx_t = needs_dx ? at::matmul(dy2, weight).contiguous() : at::Tensor();  // native GEMM
    at::Tensor dh = at::empty({tokens, rank}, x.options());
    if (tokens > 0) {
      at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous(), mask = contiguous_or_undefined(dropout_mask);
      mps::run_on_mps_stream([&](mps::MPSEncoder& enc) {
        launch::lora_backward_lowrank(enc, mps::dtype_of(x), mps::buffer_of(dy2), row_stride(dy2), mps::buffer_of(a),
                                      mps::buffer_of(b), mps::buffer_of(mask), mps::buffer_of(dh),
                                      mps::buffer_of(dx_t), tokens, x.size(1), weight.size(0), rank, float(scale));
      });
    }
    if (needs_dx) dx = dx_t;
    if (needs_da) da = at::matmul(dh.t(), x_lora);
  }
  if (needs_dlb) dlb = at::matmul(dy2.t(), h) * scale;
  if (needs_dw) dw = at::matmul(dy2.t(), x);
  if (needs_db) dbias = dy2.sum(0);
  return {dx, dw, dbias, da, dlb};
}

}  // namespace tmf
