// The CUDA LoRA op's K-concatenated route: the launches of the GEMM in cutlass_kconcat.cuh (see lora_kconcat.h).
// Without CUTLASS (TMF_WITH_CUTLASS undefined) the route is never enabled and the two launches refuse.
#include "lora_kconcat.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#ifdef TMF_WITH_CUTLASS
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cutlass_kconcat.cuh"
#include "row_launch.h"
#include "tmf/launch/lora_linear.h"
#endif

namespace tmf::cuda {

#ifdef TMF_WITH_CUTLASS

bool lora_kconcat_built() { return true; }

KConcatMode lora_kconcat_mode() {
  static const KConcatMode mode = [] {
    const char* v = std::getenv("TORCH_METAL_FUSED_LORA_KCONCAT");
    if (v == nullptr || std::strcmp(v, "") == 0) return KConcatMode::by_size;
    return std::strcmp(v, "0") == 0 ? KConcatMode::never : KConcatMode::always;
  }();
  return mode;
}

namespace {

namespace config = kconcat::pingpong_128x128_c2x1;
// The op's size rule (launch::lora_kconcat_fills_device) counts this configuration's output tiles.
static_assert(int(cute::size<0>(kconcat::Tile128x128{})) == int(launch::kLoraKConcatTileM) &&
                  int(cute::size<1>(kconcat::Tile128x128{})) == int(launch::kLoraKConcatTileN),
              "lora_kconcat_fills_device counts another tile than the GEMM's");

// Every operand on `first`'s device (the raw op does not check it; the TMA descriptors would address a foreign
// device's memory).
void check_operand(const at::Tensor& t, const char* name, const at::Tensor& first) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_cuda() && t.device() == first.device() && t.dim() == 2 &&
                  t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.size(1) % 8 == 0,
              "lora_linear (K-concatenated GEMM): ", name, " must be a contiguous, 16-byte aligned bfloat16 matrix "
              "with a multiple of 8 columns on ", first.device(), "; got ", t.sizes(), " ", t.scalar_type(), " on ",
              t.device());
}

// D [m, n] = [A | A2]·op([B | B2]) with k columns in the first pair and k2 (<= the tile's K) in the second, on the
// current stream.
template <class G>
at::Tensor run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2, int m, int n,
               int k, int k2, const at::Tensor* bias = nullptr) {
  using T = typename G::T;
  at::Tensor d = at::empty({m, n}, a.options());
  if (m == 0 || n == 0) return d;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = a.get_device();
  hw.sm_count = sm_count(a);
  typename G::KConcat::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k + G::kTileK, 1},
      {reinterpret_cast<const T*>(a.data_ptr()), cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, k, 1}),
       reinterpret_cast<const T*>(b.data_ptr()), cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k, 1}),
       reinterpret_cast<const T*>(a2.data_ptr()), cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, k2, 1}),
       reinterpret_cast<const T*>(b2.data_ptr()), cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k2, 1}),
       k2},
      {{1.f, 0.f}, nullptr, {}, reinterpret_cast<T*>(d.data_ptr()),
       cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, n, 1})},
      hw};
  // The scheduler's own raster order (along M where there are more tiles along N, else along N), swizzled by 4 only
  // when it runs along N. Through the op on an H200 (benchmarks/results/cuda-h200-2026-12-02-lora-op-swizzle*): at
  // 8192x4096->4096 (64 x 32 tiles, along N) swizzle 4 took forward+backward from 1.222x to 1.204x the base pair; at
  // 2048x4096->11008 (16 x 86 and 16 x 32, along M) it went from 1.133x to 1.199x.
  const bool along_n = (n + 127) / 128 <= (m + 127) / 128;
  args.scheduler.max_swizzle_size = along_n ? 4 : 1;
  if (bias != nullptr) args.epilogue.thread.bias_ptr = reinterpret_cast<const T*>(bias->data_ptr());
  typename G::KConcat gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
              "lora_linear (K-concatenated GEMM): CUTLASS cannot run ", m, "x", n, "x", k, " + ", k2);
  const size_t workspace_bytes = G::KConcat::get_workspace_size(args);
  at::Tensor workspace = at::empty({int64_t(workspace_bytes)}, a.options().dtype(at::kByte));
  auto stream = c10::cuda::getCurrentCUDAStream(hw.device_id).stream();
  cutlass::Status status = gemm.initialize(args, workspace_bytes ? workspace.data_ptr() : nullptr, stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "lora_linear (K-concatenated GEMM): ",
              cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "lora_linear (K-concatenated GEMM): ",
              cutlassGetStatusString(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

}  // namespace

at::Tensor lora_kconcat_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& h,
                                const at::Tensor& bs, const std::optional<at::Tensor>& bias) {
  check_operand(x, "x", x);
  check_operand(weight, "weight", x);
  check_operand(h, "h", x);
  check_operand(bs, "s·lora_b", x);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0), r = h.size(1);
  TORCH_CHECK(weight.size(1) == k && h.size(0) == m && bs.size(0) == n && bs.size(1) == r && r <= config::Fwd::kTileK,
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
  return run<config::Fwd>(x, weight, h, bs, int(m), int(n), int(k), int(r), bias ? &*bias : nullptr);
}

at::Tensor lora_kconcat_dx(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dh,
                           const at::Tensor& lora_a) {
  check_operand(dy, "dy", dy);
  check_operand(weight, "weight", dy);
  check_operand(dh, "dh", dy);
  check_operand(lora_a, "lora_a", dy);
  const int64_t m = dy.size(0), n_out = dy.size(1), k_in = weight.size(1), r = dh.size(1);
  TORCH_CHECK(weight.size(0) == n_out && dh.size(0) == m && lora_a.size(0) == r && lora_a.size(1) == k_in &&
                  r <= config::Bwd::kTileK,
              "lora_linear (K-concatenated GEMM): operands do not match: dy ", dy.sizes(), ", weight ",
              weight.sizes(), ", dh ", dh.sizes(), ", lora_a ", lora_a.sizes());
  // dx = dy·W: the GEMM's K is out_features, its N in_features (W read as [K, N] row-major).
  return run<config::Bwd>(dy, weight, dh, lora_a, int(m), int(k_in), int(n_out), int(r));
}

#else  // no CUTLASS: the route is never enabled

bool lora_kconcat_built() { return false; }

KConcatMode lora_kconcat_mode() { return KConcatMode::never; }

at::Tensor lora_kconcat_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "lora_linear: built without CUTLASS (the K-concatenated GEMM)");
}

at::Tensor lora_kconcat_dx(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "lora_linear: built without CUTLASS (the K-concatenated GEMM)");
}

#endif

}  // namespace tmf::cuda
