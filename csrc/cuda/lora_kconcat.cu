// The CUDA LoRA op's K-concatenated route: operand checks and the choice between the GEMM's two configurations
// (lora_kconcat_cooperative.cu, lora_kconcat_pingpong.cu; see lora_kconcat.h).
// Without CUTLASS (TMF_WITH_CUTLASS undefined) the route is never enabled and the two launches refuse.
#include "lora_kconcat.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>

namespace tmf::cuda {

const char* lora_kconcat_gemm_name(launch::LoraKConcatGemm gemm) {
  return gemm == launch::LoraKConcatGemm::pingpong_128x128 ? "pingpong" : "cooperative";
}

namespace {

// A configuration by its name (lora_kconcat_gemm_name); "" or "auto": none.
std::optional<launch::LoraKConcatGemm> parse_gemm(const std::string& v, const char* what) {
  for (auto g : kLoraKConcatGemms) {
    if (v == lora_kconcat_gemm_name(g)) return g;
  }
  TORCH_CHECK(v.empty() || v == "auto", what, " must be 'cooperative', 'pingpong' or empty; got '", v, "'");
  return std::nullopt;
}

// TORCH_METAL_FUSED_LORA_KCONCAT_GEMM=cooperative or =pingpong runs every K-concatenated GEMM on that configuration
// (for benchmarking the two through the op in one session: `bash benchmarks/cuda_run.sh lora-gemms`); unset or empty,
// the launch rule chooses by shape. It does not change where the route is taken (launch::lora_kconcat_fills_device
// counts the tiles of the configuration the rule would choose), so both configurations run the same calls. Read at
// the first K-concatenated GEMM (or _C.lora_kconcat_gemm_for); an invalid value raises there, at every call.
std::optional<launch::LoraKConcatGemm> forced_gemm() {
  static const std::optional<launch::LoraKConcatGemm> forced = [] {
    const char* v = std::getenv("TORCH_METAL_FUSED_LORA_KCONCAT_GEMM");
    return parse_gemm(v ? v : "", "TORCH_METAL_FUSED_LORA_KCONCAT_GEMM");
  }();
  return forced;
}

// GEMMs launched per configuration, indexed by its enumerator (both TUs compute identical numbers, so only this shows
// which one ran).
std::atomic<uint64_t> g_gemm_launches[std::size(kLoraKConcatGemms)];

}  // namespace

uint64_t lora_kconcat_gemm_launches(launch::LoraKConcatGemm gemm) {
  return g_gemm_launches[size_t(gemm)].load(std::memory_order_relaxed);
}

launch::LoraKConcatGemm lora_kconcat_gemm_in_effect(int64_t rows, int64_t cols) {
  return forced_gemm().value_or(launch::lora_kconcat_gemm_for(uint64_t(rows), uint64_t(cols)));
}

std::optional<launch::LoraKConcatGemm> lora_kconcat_gemm_named(const std::string& name) {
  return parse_gemm(name, "gemm");
}

#ifdef TMF_WITH_CUTLASS

bool lora_kconcat_built() { return true; }

KConcatMode lora_kconcat_mode() {
  static const KConcatMode mode = [] {
    const char* v = std::getenv("TORCH_METAL_FUSED_LORA_KCONCAT");
    if (v == nullptr || std::strcmp(v, "") == 0) return KConcatMode::by_size;
    TORCH_CHECK(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0, "TORCH_METAL_FUSED_LORA_KCONCAT='", v,
                "' does nothing: it takes 0 or 1 (unset or empty: by shape)");
    return std::strcmp(v, "0") == 0 ? KConcatMode::never : KConcatMode::always;
  }();
  return mode;
}

namespace {

// Every operand on `first`'s device (the raw op does not check it; the TMA descriptors would address a foreign
// device's memory).
void check_operand(const at::Tensor& t, const char* name, const at::Tensor& first) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_cuda() && t.device() == first.device() && t.dim() == 2 &&
                  t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.size(1) % 8 == 0,
              "lora_linear (K-concatenated GEMM): ", name, " must be a contiguous, 16-byte aligned bfloat16 matrix "
              "with a multiple of 8 columns on ", first.device(), "; got ", t.sizes(), " ", t.scalar_type(), " on ",
              t.device());
}

// D [m, n] = [A | A2]·op([B | B2]) (op(B) = Bᵀ forward, B for dx) on `choice`, or else the configuration in effect
// for its shape.
at::Tensor gemm(std::optional<launch::LoraKConcatGemm> choice, bool forward, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& a2, const at::Tensor& b2, int m, int n, int k, int k2,
                const at::Tensor* bias = nullptr) {
  // Not value_or: the configuration in effect reads the override, which must not raise where a call names one.
  const launch::LoraKConcatGemm config = choice ? *choice : lora_kconcat_gemm_in_effect(m, n);
  at::Tensor d = config == launch::LoraKConcatGemm::pingpong_128x128
                     ? kconcat_gemm_pingpong_128x128(forward, a, b, a2, b2, m, n, k, k2, bias)
                     : kconcat_gemm_cooperative_128x256(forward, a, b, a2, b2, m, n, k, k2, bias);
  g_gemm_launches[size_t(config)].fetch_add(1, std::memory_order_relaxed);  // launched (each step raises on failure)
  return d;
}

}  // namespace

at::Tensor lora_kconcat_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& h,
                                const at::Tensor& bs, const std::optional<at::Tensor>& bias,
                                std::optional<launch::LoraKConcatGemm> gemm_choice) {
  check_operand(x, "x", x);
  check_operand(weight, "weight", x);
  check_operand(h, "h", x);
  check_operand(bs, "s·lora_b", x);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0), r = h.size(1);
  TORCH_CHECK(weight.size(1) == k && h.size(0) == m && bs.size(0) == n && bs.size(1) == r &&
                  r <= int64_t(launch::kLoraKConcatTileK),
              "lora_linear (K-concatenated GEMM): operands do not match: x ", x.sizes(), ", weight ", weight.sizes(),
              ", h ", h.sizes(), ", s·lora_b ", bs.sizes());
  if (bias) {
    // The epilogue reads it in 16-byte vectors of 8 columns.
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->device() == x.device() && bias->dim() == 1 &&
                    bias->size(0) == n && bias->is_contiguous() &&
                    reinterpret_cast<uintptr_t>(bias->data_ptr()) % 16 == 0,
                "lora_linear (K-concatenated GEMM): bias must be a contiguous, 16-byte aligned bfloat16 vector of ", n,
                " on ", x.device(), "; got ", bias->sizes(), " ", bias->scalar_type(), " on ", bias->device());
  }
  TORCH_CHECK(lora_kconcat_sizes_fit(m, k, n), "lora_linear (K-concatenated GEMM): sizes over 2^31 - 1: x ", x.sizes(),
              ", weight ", weight.sizes());
  return gemm(gemm_choice, true, x, weight, h, bs, int(m), int(n), int(k), int(r), bias ? &*bias : nullptr);
}

at::Tensor lora_kconcat_dx(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dh,
                           const at::Tensor& lora_a, std::optional<launch::LoraKConcatGemm> gemm_choice) {
  check_operand(dy, "dy", dy);
  check_operand(weight, "weight", dy);
  check_operand(dh, "dh", dy);
  check_operand(lora_a, "lora_a", dy);
  const int64_t m = dy.size(0), n_out = dy.size(1), k_in = weight.size(1), r = dh.size(1);
  TORCH_CHECK(weight.size(0) == n_out && dh.size(0) == m && lora_a.size(0) == r && lora_a.size(1) == k_in &&
                  r <= int64_t(launch::kLoraKConcatTileK),
              "lora_linear (K-concatenated GEMM): operands do not match: dy ", dy.sizes(), ", weight ",
              weight.sizes(), ", dh ", dh.sizes(), ", lora_a ", lora_a.sizes());
  // dx = dy·W: the GEMM's K is out_features, its N in_features (W read as [K, N] row-major).
  TORCH_CHECK(lora_kconcat_sizes_fit(m, n_out, k_in), "lora_linear (K-concatenated GEMM): sizes over 2^31 - 1: dy ",
              dy.sizes(), ", weight ", weight.sizes());
  return gemm(gemm_choice, false, dy, weight, dh, lora_a, int(m), int(k_in), int(n_out), int(r));
}

#else  // no CUTLASS: the route is never enabled

bool lora_kconcat_built() { return false; }

KConcatMode lora_kconcat_mode() { return KConcatMode::never; }

at::Tensor lora_kconcat_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, std::optional<launch::LoraKConcatGemm>) {
  TORCH_CHECK(false, "lora_linear: built without CUTLASS (the K-concatenated GEMM)");
}

at::Tensor lora_kconcat_dx(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           std::optional<launch::LoraKConcatGemm>) {
  TORCH_CHECK(false, "lora_linear: built without CUTLASS (the K-concatenated GEMM)");
}

#endif

}  // namespace tmf::cuda
