// The CUDA backend's kernel entry points (csrc/ops.h): launch decisions for the row kernels in
// row_kernels.cuh (LoRA: lora_linear.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

#include "ops.h"
#include "row_kernels.cuh"
#include "row_launch.h"

namespace tmf {

bool aligned16(const at::Tensor& t, int64_t row_stride_elems) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (row_stride_elems * t.element_size()) % 16 == 0;
}

int sm_count(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.device().index()));
  return sms;
}

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
  // The fewest items per thread that fit 512 threads. (Preferring 256-thread blocks with more items measured no
  // faster at 8192x4096 and slower at 4096x8192 in the first CUDA session, whose numbers predate the ledger.)
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

// ---- vector kernels (row_kernels.cuh, "vector row kernels"): rows 16-byte aligned, a multiple of 16 bytes long --
// Layouts from side-by-side timings of the candidates (benchmarks/cuda_rowbench.cu, cold L2, 8192x4096 and
// 4096x8192; ledger: softmax and rms_norm, kernel, H200, runs cuda-h200-2026-12-01-rowbench and -rows-rowbench, the
// variants named "<kernel> items=<vectors per thread> thr=<threads>"):
// - forward (softmax, RMSNorm): 32 elements per thread (bf16 4 vectors, fp32 8), blocks of >= 128 threads: a row's
//   loads are all issued before the reduction, so more bytes per thread means more bytes in flight per SM; one
//   vector per thread in 512-thread blocks (the old layout) and 1024-thread blocks were slower.
// - softmax backward: 8 elements per thread (two arrays of them: y and dy), up to 1024 threads (512 x 1 vector at
//   4096 wide and 1024 x 1 at 8192 beat the 2-vector layouts).
// - RMSNorm backward (pipelined kernel): 8 elements per thread, up to 1024 threads (rows to 8192), 3 stages
//   where they fit.
struct VecLayout {
  int items = 0, threads = 0;
  bool ok = false;
};

constexpr int kForwardVecElems = 32;
constexpr int kForwardMinThreads = 128;
constexpr int kForwardMaxThreads = 512;
constexpr int kRmsForwardFloatElems = 16;  // rms_norm_forward_launch
constexpr int kBackwardVecElems = 8;
constexpr int kBackwardMaxThreads = 1024;

bool vec_ok(int64_t cols, int element_size, bool aligned) { return aligned && (cols * element_size) % 16 == 0; }

// Block sizes are compile-time in these kernels (the index arithmetic and the reductions fold; a runtime-sized
// round was slower, together with two other changes: ledger run cuda-h200-2026-12-01-rowbench, variants "runtime
// block sizes …", and docs/cuda.md): a power of two from 32 to 1024 covering the row.
// Capped at 2^30: the callers reject anything over 1024 threads, and doubling past 2^30 would overflow into a loop
// that never ends.
int pow2_threads(int64_t n) {
  int t = 32;
  while (t < n && t < (1 << 30)) t *= 2;
  return t;
}

// The row kernels take a row per block (grid x, at most 2^31 - 1 blocks) and index within a row in int.
void check_row_sizes(const char* op, int64_t rows, int64_t cols) {
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), op, ": ", rows, " rows; the CUDA kernels take at most 2^31 - 1");
  TORCH_CHECK(cols <= std::numeric_limits<int>::max(), op, ": rows of ", cols,
              " elements; the CUDA kernels take at most 2^31 - 1");
}

// Forward: the most vectors per thread (up to max_elems elements) that leave >= kForwardMinThreads threads.
VecLayout forward_vec_layout(int64_t cols, int element_size, int max_elems = kForwardVecElems) {
  const int vec = 16 / element_size, max_items = max_elems / vec;
  const int64_t nvec = cols / vec;
  int items = 1;
  while (items < max_items && nvec / (2 * items) >= kForwardMinThreads) items *= 2;
  const int threads = pow2_threads((nvec + items - 1) / items);
  if (threads > kForwardMaxThreads) return {};
  return {items, threads, true};
}

// Backward: kBackwardVecElems elements per thread, doubled while the row needs more than kBackwardMaxThreads.
VecLayout backward_vec_layout(int64_t cols, int element_size, int max_elems) {
  const int vec = 16 / element_size;
  const int64_t nvec = cols / vec;
  for (int items = std::max(1, kBackwardVecElems / vec); items * vec <= max_elems; items *= 2) {
    const int threads = pow2_threads((nvec + items - 1) / items);
    if (threads <= kBackwardMaxThreads) return {items, threads, true};
  }
  return {};
}

// Calls f.template operator()<ITEMS, THREADS>() for the layout (the template filters the combinations it builds).
template <class F>
void with_vec_layout(const VecLayout& l, F&& f) {
  auto items = [&]<int TH>() {
    switch (l.items) {
      case 1: return f.template operator()<1, TH>();
      case 2: return f.template operator()<2, TH>();
      case 4: return f.template operator()<4, TH>();
      case 8: return f.template operator()<8, TH>();
      default: TORCH_CHECK(false, "torch_metal_fused: no vector layout with ", l.items, " vectors per thread");
    }
  };
  switch (l.threads) {
    case 32: return items.template operator()<32>();
    case 64: return items.template operator()<64>();
    case 128: return items.template operator()<128>();
    case 256: return items.template operator()<256>();
    case 512: return items.template operator()<512>();
    case 1024: return items.template operator()<1024>();
    default: TORCH_CHECK(false, "torch_metal_fused: no vector layout with ", l.threads, " threads");
  }
}

// Blocks of `kernel` resident per SM with `smem` dynamic shared memory (raising the kernel's dynamic limit first),
// cached per device, kernel, block size and smem. The limit is a per-kernel maximum: raised, never lowered (a kernel
// launched with several sizes, as the shared-memory softmax is, keeps the largest asked for). Both belong to the
// current device's context: a kernel whose limit was raised on cuda:0 still has the default 48 KB on cuda:1
// (tests/test_cuda_multi_gpu.py).
int resident_blocks(const void* kernel, int threads, size_t smem) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  static std::map<std::pair<int, const void*>, size_t> limit;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(device, kernel, threads, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  size_t& raised = limit[{device, kernel}];
  if (smem > raised) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    raised = smem;
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  cache.emplace(key, blocks);
  return blocks;
}

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

// Narrow forward rows (vector rows of at most 64 16-byte vectors: 1024 bytes): the warp-rows kernels
// (row_kernels.cuh), ITEMS vectors per lane, ROWS rows per warp: up to `max_vecs` vectors of loads per lane in
// flight, fewer rows per warp where that would leave under two blocks per SM. RMSNorm gains from more rows per warp
// (more loads in flight, the weight loaded once per warp) up to kWarpRowVecs vectors per lane; softmax was fastest at
// one row per warp (ledger: rms_norm and softmax, kernel, H200, bfloat16 and float32
// 65536x256, run cuda-h200-2026-12-01-rows-rowbench, variants "warp_rows rows/warp=1 / 2 / 4 / 8").
constexpr int kWarpRowVecs = 4;

struct WarpRows {
  int items = 0, rows_per_warp = 0;
  bool ok = false;
};

WarpRows warp_rows_layout(int64_t rows, int64_t cols, int element_size, int sms, int max_vecs) {
  const int64_t nvec = cols / (16 / element_size);
  if (nvec > 64) return {};
  const int items = nvec <= 32 ? 1 : 2;
  int per_warp = std::max(1, max_vecs / items);
  while (per_warp > 1 && rows / (int64_t(per_warp) * cuda::kWarpRowsWarps) < 2 * int64_t(sms)) per_warp /= 2;
  return {items, per_warp, true};
}

template <class F>
void with_warp_rows(const WarpRows& l, F&& f) {
  auto rows = [&]<int I>() {
    switch (l.rows_per_warp) {
      case 1: return f.template operator()<I, 1>();
      case 2: return f.template operator()<I, 2>();
      case 4: if constexpr (I * 4 <= kWarpRowVecs) return f.template operator()<I, 4>();
      default: TORCH_CHECK(false, "torch_metal_fused: no warp-rows layout with ", l.rows_per_warp, " rows");
    }
  };
  if (l.items == 1) return rows.template operator()<1>();
  if (l.items == 2) return rows.template operator()<2>();
  TORCH_CHECK(false, "torch_metal_fused: no warp-rows layout with ", l.items, " vectors per lane");
}

int64_t warp_rows_blocks(int64_t rows, int rows_per_warp) {
  const int64_t per_block = int64_t(rows_per_warp) * cuda::kWarpRowsWarps;
  return (rows + per_block - 1) / per_block;
}

// Wide softmax rows kept in shared memory (softmax_forward_smem / softmax_backward_smem): rows up to
// kSmemRowBytes (a row's bytes; the backward stages dy too where both rows fit), 1024 threads where a block has the
// SM's shared memory to itself, 512 where two or more rows fit per SM.
constexpr size_t kSmemRowBytes = 200u << 10;

int smem_threads(size_t smem) { return smem > (113u << 10) ? 1024 : 512; }

}  // namespace

at::Tensor softmax_forward(const at::Tensor& x) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  at::Tensor x2 = as_rows(x);
  const int64_t rows = x2.size(0), cols = x2.size(1), stride = row_stride(x2);
  check_row_sizes("softmax", rows, cols);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = vec_ok(cols, x.element_size(), aligned16(x2, stride));
  const VecLayout vl = vec ? forward_vec_layout(cols, x.element_size()) : VecLayout{};
  const WarpRows wr = vec ? warp_rows_layout(rows, cols, x.element_size(), sm_count(x), 1) : WarpRows{};
  const size_t row_bytes = size_t(cols) * x.element_size();
  const RowLayout l = row_layout<kForwardElems>(cols, x.element_size(), aligned16(x2, stride));
  TMF_DISPATCH_FLOAT_TYPES(x.scalar_type(), "softmax", [&] {
    using T = scalar_t;
    const T* xp = reinterpret_cast<const T*>(x2.data_ptr());
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    if (wr.ok) {
      with_warp_rows(wr, [&]<int ITEMS, int ROWS>() {
        if constexpr (ROWS == 1)
          cuda::softmax_forward_warp_rows<T, ITEMS, 1>
              <<<warp_rows_blocks(rows, 1), cuda::kWarpRowsWarps * 32, 0, stream>>>(xp, yp, rows, int(cols), stride);
        else
          TORCH_CHECK(false, "softmax: one row per warp");
      });
    } else if (vl.ok) {
      with_vec_layout(vl, [&]<int ITEMS, int TH>() {
        if constexpr (ITEMS * 16 / sizeof(T) <= kForwardVecElems && TH <= kForwardMaxThreads &&
                      (ITEMS == 1 ? TH <= 256 : TH >= 128))
          cuda::softmax_forward_vec<T, ITEMS, TH><<<rows, TH, 0, stream>>>(xp, yp, int(cols), stride);
        else
          TORCH_CHECK(false, "softmax: no forward kernel for this layout");
      });
    } else if (vec && row_bytes <= kSmemRowBytes) {
      auto launch = [&]<int TH>() {
        auto kernel = cuda::softmax_forward_smem<T, TH>;
        TORCH_CHECK(resident_blocks(reinterpret_cast<const void*>(kernel), TH, row_bytes) > 0,
                    "softmax: no resident block for the shared-memory kernel");
        kernel<<<rows, TH, row_bytes, stream>>>(xp, yp, int(cols), stride);
      };
      if (smem_threads(row_bytes) == 1024) launch.template operator()<1024>();
      else launch.template operator()<512>();
    } else if (vec) {
      cuda::softmax_forward_looped_vec<T><<<rows, 1024, 0, stream>>>(xp, yp, int(cols), stride);
    } else if (l.looped) {
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
  check_row_sizes("softmax backward", rows, cols);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool aligned = aligned16(y2, cols) && aligned16(dy2, stride);
  const bool vec = vec_ok(cols, y.element_size(), aligned);
  const VecLayout vl = vec ? backward_vec_layout(cols, y.element_size(), 16) : VecLayout{};
  const RowLayout l = row_layout<kBackwardElems>(cols, y.element_size(), aligned);
  TMF_DISPATCH_FLOAT_TYPES(y.scalar_type(), "softmax backward", [&] {
    using T = scalar_t;
    const T* yp = reinterpret_cast<const T*>(y2.data_ptr());
    const T* dyp = reinterpret_cast<const T*>(dy2.data_ptr());
    T* dxp = reinterpret_cast<T*>(dx.data_ptr());
    if (vl.ok) {
      with_vec_layout(vl, [&]<int ITEMS, int TH>() {
        constexpr int base = std::max<int>(1, kBackwardVecElems * sizeof(T) / 16);
        if constexpr (ITEMS == base || (ITEMS == 2 * base && ITEMS * 16 / sizeof(T) <= 16 && TH == 1024))
          cuda::softmax_backward_registers<T, 16 / sizeof(T), ITEMS, TH><<<rows, TH, 0, stream>>>(yp, dyp, dxp, int(cols), stride);
        else
          TORCH_CHECK(false, "softmax: no backward kernel for this layout");
      });
    } else if (vec && 2 * size_t(cols) * sizeof(T) <= kSmemRowBytes) {
      // y and dy staged (BOTH). Staging y alone and re-reading dy was slower than the looped kernel (ledger:
      // softmax, kernel, H200, float32 2048x32768 backward, run cuda-h200-2026-12-01-rows-rowbench, variants
      // "smem y thr=…" against the looped kernel as shipped), so wider rows take that.
      const size_t smem = 2 * size_t(cols) * sizeof(T);
      auto launch = [&]<int TH>() {
        auto kernel = cuda::softmax_backward_smem<T, TH, true>;
        TORCH_CHECK(resident_blocks(reinterpret_cast<const void*>(kernel), TH, smem) > 0,
                    "softmax backward: no resident block for the shared-memory kernel");
        kernel<<<rows, TH, smem, stream>>>(yp, dyp, dxp, int(cols), stride);
      };
      if (smem_threads(smem) == 1024) launch.template operator()<1024>();
      else launch.template operator()<512>();
    } else if (vec) {
      cuda::softmax_backward_looped_vec<T><<<rows, 1024, 0, stream>>>(yp, dyp, dxp, int(cols), stride);
    } else if (l.looped) {
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

// RMSNorm forward; with `residual` (add_rms_norm) the row normalised is h = x + residual, written to `h` (x's shape,
// contiguous) by the same kernel: each kernel's ADD parameter (row_kernels.cuh).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_launch(const at::Tensor& x, const OptTensor& weight, double eps,
                                                           double offset, const at::Tensor* residual, at::Tensor* h) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y, rstd;
  std::tie(y, rstd) = rms_norm_outputs(x, eps);  // not a structured binding: lambdas below capture them (C++17)
  if (x.numel() == 0) return {y, rstd};
  at::Tensor x2 = as_rows(x);
  at::Tensor r2 = residual ? as_rows(*residual) : at::Tensor();
  at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const int64_t rows = x2.size(0), cols = x2.size(1), stride = row_stride(x2);
  const int64_t rstride = residual ? row_stride(r2) : 0;
  check_row_sizes("rms_norm", rows, cols);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool aligned = aligned16(x2, stride) && (!w.defined() || aligned16(w, cols)) &&
                       (!residual || (aligned16(r2, rstride) && aligned16(*h, cols)));
  const bool vec = vec_ok(cols, x.element_size(), aligned);
  // float32 RMSNorm (no residual) takes 16 elements per thread where that block still fits kForwardMaxThreads (twice
  // the threads per row, Liger's layout): faster than 32 at 8192x4096 and 4096x8192 in 7 of 8 timings over two runs
  // (ledger: rms_norm, kernel, H200, float32 forward, runs cuda-h200-2026-12-01-rowstores-7b4be74 and -rowweights,
  // variant "alt items=4 thr=…" against the shipped 8 vectors); the softmax forward and bf16 measured level or slower
  // that way.
  VecLayout vl{};
  if (vec && x.scalar_type() == at::kFloat && !residual) vl = forward_vec_layout(cols, 4, kRmsForwardFloatElems);
  if (vec && !vl.ok) vl = forward_vec_layout(cols, x.element_size());
  const WarpRows wr = vec ? warp_rows_layout(rows, cols, x.element_size(), sm_count(x), kWarpRowVecs) : WarpRows{};
  const RowLayout l = row_layout<kForwardElems>(cols, x.element_size(), aligned);
  TMF_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm", [&] {
    using T = scalar_t;
    const T* xp = reinterpret_cast<const T*>(x2.data_ptr());
    const T* wp = w.defined() ? reinterpret_cast<const T*>(w.data_ptr()) : nullptr;
    const T* rp_in = residual ? reinterpret_cast<const T*>(r2.data_ptr()) : nullptr;
    T* hp = residual ? reinterpret_cast<T*>(h->data_ptr()) : nullptr;
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    float* rp = rstd.data_ptr<float>();
    auto go = [&]<bool ADD>() {
      if (wr.ok) {
        with_warp_rows(wr, [&]<int ITEMS, int ROWS>() {
          cuda::rms_norm_forward_warp_rows<T, ITEMS, ROWS, ADD>
              <<<warp_rows_blocks(rows, ROWS), cuda::kWarpRowsWarps * 32, 0, stream>>>(
                  xp, wp, yp, rp, rows, int(cols), stride, float(eps), float(offset), rp_in, rstride, hp);
        });
      } else if (vl.ok) {
        with_vec_layout(vl, [&]<int ITEMS, int TH>() {
          if constexpr (ITEMS * 16 / sizeof(T) <= kForwardVecElems && TH <= kForwardMaxThreads &&
                        (ITEMS == 1 ? TH <= 256 : TH >= 128))
            cuda::rms_norm_forward_vec<T, ITEMS, TH, ADD><<<rows, TH, 0, stream>>>(
                xp, wp, yp, rp, int(cols), stride, float(eps), float(offset), rp_in, rstride, hp);
          else
            TORCH_CHECK(false, "rms_norm: no forward kernel for this layout");
        });
      } else if (l.looped) {
        cuda::rms_norm_forward_looped<T, ADD><<<rows, l.threads, 0, stream>>>(
            xp, wp, yp, rp, int(cols), stride, float(eps), float(offset), rp_in, rstride, hp);
      } else {
        with_layout<kForwardElems, T>(l, [&]<int VEC, int ITEMS>() {
          cuda::rms_norm_forward_registers<T, VEC, ITEMS, ADD><<<rows, l.threads, 0, stream>>>(
              xp, wp, yp, rp, int(cols), stride, float(eps), float(offset), rp_in, rstride, hp);
        });
      }
    };
    if (residual) go.template operator()<true>();
    else go.template operator()<false>();
  });
  check_launch();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const OptTensor& weight, double eps,
                                                    double offset) {
  return rms_norm_forward_launch(x, weight, eps, offset, nullptr, nullptr);
}

// RMSNorm backward; with `dh` (add_rms_norm: x is h, dh its incoming gradient) dx = RMSNorm's dx + dh, added by
// the dx kernel before dx is rounded (each kernel's ADD parameter).
std::tuple<OptTensor, OptTensor> rms_norm_backward_launch(const at::Tensor& dy, const at::Tensor& x,
                                                          const OptTensor& weight, const at::Tensor& rstd,
                                                          bool needs_dx, bool needs_dw, double offset,
                                                          const at::Tensor* dh) {
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(!dh || needs_dx, "rms_norm backward: the residual gradient is added to dx");
  const int64_t cols = x.size(-1);
  needs_dw = needs_dw && weight.has_value();
  at::Tensor dx = needs_dx ? at::empty(x.sizes(), x.options()) : at::Tensor();
  // dw is written whole by the reduce kernel; only empty inputs need it zeroed.
  at::Tensor dw = needs_dw ? (x.numel() > 0 ? at::empty({cols}, x.options()) : at::zeros({cols}, x.options()))
                           : at::Tensor();
  if (x.numel() > 0 && (needs_dx || needs_dw)) {
    at::Tensor x2 = as_rows(x), dy2 = as_rows(dy);
    at::Tensor dh2 = dh ? as_rows(*dh) : at::Tensor();
    const int64_t rows = x2.size(0), xs = row_stride(x2), dys = row_stride(dy2), dhs = dh ? row_stride(dh2) : 0;
    check_row_sizes("rms_norm backward", rows, cols);
    at::Tensor w = weight ? weight->contiguous() : at::Tensor();
    at::Tensor r = rstd.contiguous();
    const int sms = sm_count(x);
    auto stream = c10::cuda::getCurrentCUDAStream();
    const bool aligned = aligned16(x2, xs) && aligned16(dy2, dys) && (!w.defined() || aligned16(w, cols)) &&
                         (!dh || aligned16(dh2, dhs));
    const RowLayout l = row_layout<kBackwardElems>(cols, x.element_size(), aligned);
    // Pipelined kernel: vector rows of 128 to 1024 threads x 8 elements (so 1024 to 8192 wide; with 16 elements and
    // 1024 threads it spills under the 64-register cap), 3 stages of x and dy rows (3 against 2 stages measured
    // equal or faster); one block per resident slot, so the partial dw
    // rows number (resident blocks per SM) x SMs, at most rows: 264 at 8192x4096 bf16 (4.3 MB written and re-read,
    // 2 % of the minimum traffic). Other rows: the register/looped kernels above.
    VecLayout pl = vec_ok(cols, x.element_size(), aligned) ? backward_vec_layout(cols, x.element_size(), 8) : VecLayout{};
    // 3 stages of 2 rows: at most 192 KB of shared memory (fp32 8192 wide: one block per SM, still faster than the
    // register kernel; ledger: rms_norm, kernel, H200, float32 4096x8192 backward, run cuda-h200-2026-12-01-rowbench,
    // variant "not-prod items=2 thr=1024 st=3 g=132" against "current items=4 thr=512 g=264").
    if (pl.threads < 128 || size_t(3) * 2 * cols * x.element_size() > (192u << 10)) pl = VecLayout{};
    // dw partial rows, one per block: the pipelined kernel's grid, else few next to x's rows.
    const int groups = int(std::min<int64_t>(rows, 4 * int64_t(sms)));
    at::Tensor partial;
    TMF_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm backward", [&] {
      using T = scalar_t;
      const T* dyp = reinterpret_cast<const T*>(dy2.data_ptr());
      const T* xp = reinterpret_cast<const T*>(x2.data_ptr());
      const T* wp = w.defined() ? reinterpret_cast<const T*>(w.data_ptr()) : nullptr;
      T* dxp = needs_dx ? reinterpret_cast<T*>(dx.data_ptr()) : nullptr;
      const T* dhp = dh ? reinterpret_cast<const T*>(dh2.data_ptr()) : nullptr;
      float* pp = nullptr;
      int groups_used = groups;
      auto alloc_partial = [&](int g) {
        groups_used = g;
        if (needs_dw) {
          partial = at::empty({g, cols}, x.options().dtype(at::kFloat));
          pp = partial.data_ptr<float>();
        }
      };
      auto launch = [&]<bool DX, bool DW, bool ADD>() {
        if (pl.ok) {
          with_vec_layout(pl, [&]<int ITEMS, int TH>() {
            constexpr int base = std::max<int>(1, kBackwardVecElems * sizeof(T) / 16);
            if constexpr (ITEMS == base && TH >= 128) {
              constexpr int STAGES = 3;
              auto kernel = cuda::rms_norm_backward_pipelined<T, ITEMS, TH, STAGES, DX, DW, ADD>;
              const size_t smem = size_t(STAGES) * 2 * ITEMS * TH * 16;
              const int per_sm = resident_blocks(reinterpret_cast<const void*>(kernel), TH, smem);
              TORCH_CHECK(per_sm > 0, "rms_norm backward: no resident block for the pipelined kernel");
              alloc_partial(int(std::min<int64_t>(rows, int64_t(per_sm) * sms)));
              kernel<<<groups_used, TH, smem, stream>>>(dyp, xp, wp, r.data_ptr<float>(), dxp, pp, rows, int(cols), xs,
                                                        dys, float(offset), dhp, dhs);
            } else {
              TORCH_CHECK(false, "rms_norm backward: no pipelined kernel for this layout");
            }
          });
        } else if (l.looped) {
          alloc_partial(groups);
          cuda::rms_norm_backward_looped<T, DX, DW, ADD><<<groups, l.threads, 0, stream>>>(
              dyp, xp, wp, r.data_ptr<float>(), dxp, pp, rows, int(cols), xs, dys, float(offset), dhp, dhs);
        } else {
          alloc_partial(groups);
          with_layout<kBackwardElems, T>(l, [&]<int VEC, int ITEMS>() {
            cuda::rms_norm_backward_registers<T, VEC, ITEMS, DX, DW, ADD><<<groups, l.threads, 0, stream>>>(
                dyp, xp, wp, r.data_ptr<float>(), dxp, pp, rows, int(cols), xs, dys, float(offset), dhp, dhs);
          });
        }
      };
      if (dh && needs_dw) launch.template operator()<true, true, true>();
      else if (dh) launch.template operator()<true, false, true>();
      else if (needs_dx && needs_dw) launch.template operator()<true, true, false>();
      else if (needs_dx) launch.template operator()<true, false, false>();
      else launch.template operator()<false, true, false>();
      check_launch();
      if (needs_dw) {
        cuda::rms_norm_dw_reduce<T>
            <<<(cols + cuda::kDwReduceCols - 1) / cuda::kDwReduceCols, dim3(cuda::kDwReduceCols, cuda::kDwReduceSlices),
               0, stream>>>(pp, reinterpret_cast<T*>(dw.data_ptr()), groups_used, int(cols));
        check_launch();
      }
    });
  }
  return {needs_dx ? OptTensor(dx) : std::nullopt, needs_dw ? OptTensor(dw) : std::nullopt};
}

std::tuple<OptTensor, OptTensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight,
                                                   const at::Tensor& rstd, bool needs_dx, bool needs_dw,
                                                   double offset) {
  return rms_norm_backward_launch(dy, x, weight, rstd, needs_dx, needs_dw, offset, nullptr);
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
  check_row_sizes("cross-entropy", rows, vocab);
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

}  // namespace tmf
