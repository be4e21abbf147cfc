// Side-by-side timings of row-kernel variants on the CUDA device (no PyTorch): each launch timed by CUDA events
// after clearing a 512 MB buffer (cold L2), median of bench_reps (cuda_bench_timing.cuh). Prints µs and % of the measured copy bandwidth for the
// minimal bytes. Build: nvcc -O3 -std=c++20 -arch=sm_90 -I csrc/cuda benchmarks/cuda_rowbench.cu -o rowbench;
// run: rowbench [reps] [targets]   (targets: only #14's target shapes, 8192x4096 and 4096x8192)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "cuda_bench_timing.cuh"
#include "row_kernels.cuh"

using namespace tmf::cuda;
using bf16 = __nv_bfloat16;

static double g_copy_gbps = 0;

static void report(const char* op, const char* dt, int rows, int cols, const std::string& var, double bytes, float us) {
  const double floor_us = bytes / (g_copy_gbps * 1e3);
  printf("%-14s %-5s %6dx%-6d %-34s %8.1f us  %5.1f %% of floor (%.1f)\n", op, dt, rows, cols, var.c_str(), us,
         100.0 * floor_us / us, floor_us);
  fflush(stdout);
}

__global__ void fill_kernel(float* p, size_t n, unsigned seed) {
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  for (; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = (unsigned(i) ^ seed) * 2654435761u;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = (float(h & 0xffffff) / float(0x1000000) - 0.5f) * 6.0f;
  }
}
template <typename T>
__global__ void cast_kernel(const float* s, T* d, size_t n) {
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  for (; i < n; i += size_t(gridDim.x) * blockDim.x) d[i] = from_float<T>(s[i]);
}

template <typename T>
static const char* dname() {
  return sizeof(T) == 4 ? "fp32" : "bf16";
}

// The production layout rules (csrc/cuda/ops.cu), copied.
static int round_warp(long n) {  // the power of two from 32 covering n (as ops.cu's pow2_threads)
  int t = 32;
  while (t < n) t *= 2;
  return t;
}
static void fwd_layout(int cols, int es, int& items, int& threads, int max_elems = 32) {
  const int vec = 16 / es, max_items = max_elems / vec;
  const long nvec = cols / vec;
  items = 1;
  while (items < max_items && nvec / (2 * items) >= 128) items *= 2;
  threads = round_warp((nvec + items - 1) / items);
  if (threads > 512) items = -1;
}
static void bwd_layout(int cols, int es, int max_elems, int& items, int& threads) {
  const int vec = 16 / es;
  const long nvec = cols / vec;
  for (items = std::max(1, 8 / vec); items * vec <= max_elems; items *= 2) {
    threads = round_warp((nvec + items - 1) / items);
    if (threads <= 1024) return;
  }
  items = -1;
}

template <typename T>
struct Bufs {
  T *x, *y, *dy, *dx, *w, *dw, *r, *h, *dh;
  float *rstd, *partial;
};

template <class F>
static void with_items(int items, int threads, F&& f) {
  auto it = [&]<int TH>() {
    switch (items) {
      case 1: f.template operator()<1, TH>(); break;
      case 2: f.template operator()<2, TH>(); break;
      case 4: f.template operator()<4, TH>(); break;
      case 8: f.template operator()<8, TH>(); break;
      default: break;
    }
  };
  switch (threads) {
    case 64: it.template operator()<64>(); break;
    case 128: it.template operator()<128>(); break;
    case 256: it.template operator()<256>(); break;
    case 512: it.template operator()<512>(); break;
    case 1024: it.template operator()<1024>(); break;
    default: break;
  }
}

static std::string lay(const char* tag, int items, int threads) {
  return std::string(tag) + " items=" + std::to_string(items) + " thr=" + std::to_string(threads);
}

template <typename T>
static void sm_fwd(Bufs<T>& b, int rows, int cols, int items, int threads, const char* tag) {
  constexpr int VEC = 16 / sizeof(T);
  if (items < 0) {
    float us = time_us([&] { softmax_forward_looped_vec<T><<<rows, 1024>>>(b.x, b.y, cols, cols); });
    report("softmax fwd", dname<T>(), rows, cols, std::string(tag) + " looped_vec", 2.0 * rows * cols * sizeof(T), us);
    return;
  }
  with_items(items, threads, [&]<int I, int TH>() {
    if constexpr (I * VEC <= 32 && TH <= 512) {
      float us = time_us([&] { softmax_forward_vec<T, I, TH><<<rows, TH>>>(b.x, b.y, cols, cols); });
      report("softmax fwd", dname<T>(), rows, cols, lay(tag, items, threads), 2.0 * rows * cols * sizeof(T), us);
    }
  });
}
template <typename T>
static void sm_bwd(Bufs<T>& b, int rows, int cols, int items, int threads, const char* tag) {
  constexpr int VEC = 16 / sizeof(T);
  if (items < 0) {
    float us = time_us([&] { softmax_backward_looped_vec<T><<<rows, 1024>>>(b.y, b.dy, b.dx, cols, cols); });
    report("softmax bwd", dname<T>(), rows, cols, std::string(tag) + " looped_vec", 3.0 * rows * cols * sizeof(T), us);
    return;
  }
  with_items(items, threads, [&]<int I, int TH>() {
    if constexpr (I * VEC <= 16) {
      float us = time_us([&] { softmax_backward_registers<T, VEC, I, TH><<<rows, TH>>>(b.y, b.dy, b.dx, cols, cols); });
      report("softmax bwd", dname<T>(), rows, cols, lay(tag, items, threads), 3.0 * rows * cols * sizeof(T), us);
    }
  });
}
template <typename T>
static void rms_fwd(Bufs<T>& b, int rows, int cols, int items, int threads, const char* tag) {
  constexpr int VEC = 16 / sizeof(T);
  with_items(items, threads, [&]<int I, int TH>() {
    if constexpr (I * VEC <= 32 && TH <= 512) {
      float us = time_us([&] { rms_norm_forward_vec<T, I, TH><<<rows, TH>>>(b.x, b.w, b.y, b.rstd, cols, cols, 1e-6f, 0.f); });
      report("rmsnorm fwd", dname<T>(), rows, cols, lay(tag, items, threads), 2.0 * rows * cols * sizeof(T), us);
    }
  });
}
template <typename T>
static void rms_bwd(Bufs<T>& b, int rows, int cols, int items, int threads, int stages, int sms, const char* tag) {
  constexpr int VEC = 16 / sizeof(T);
  with_items(items, threads, [&]<int I, int TH>() {
    if constexpr (I * VEC <= 16 && TH >= 128) {
      auto go = [&]<int S>() {
        auto kern = rms_norm_backward_pipelined<T, I, TH, S, true, true>;
        const size_t smem = size_t(S) * 2 * I * TH * 16;
        if (smem > 227 * 1024) return;
        CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        int occ = 0;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, TH, smem));
        if (occ == 0) return;
        const int groups = std::min(rows, occ * sms);
        kern<<<groups, TH, smem>>>(b.dy, b.x, b.w, b.rstd, b.dx, b.partial, rows, cols, cols, cols, 0.0f, nullptr, 0);
        if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
          printf("rmsnorm bwd %s %dx%d %s st=%d smem=%zu: launch failed: %s\n", dname<T>(), rows, cols,
                 lay(tag, items, threads).c_str(), S, smem, cudaGetErrorString(e));
          return;
        }
        float us = time_us([&] {
          kern<<<groups, TH, smem>>>(b.dy, b.x, b.w, b.rstd, b.dx, b.partial, rows, cols, cols, cols, 0.0f, nullptr, 0);
          rms_norm_dw_reduce<T><<<(cols + kDwReduceCols - 1) / kDwReduceCols, dim3(kDwReduceCols, kDwReduceSlices)>>>(
              b.partial, b.dw, groups, cols);
        });
        report("rmsnorm bwd", dname<T>(), rows, cols,
               lay(tag, items, threads) + " st=" + std::to_string(S) + " g=" + std::to_string(groups), 3.0 * rows * cols * sizeof(T), us);
      };
      if (stages == 2) go.template operator()<2>();
      if (stages == 3) go.template operator()<3>();
    }
  });
}

// Narrow rows: a warp per ROWS rows (rms_norm_forward_warp_rows / softmax_forward_warp_rows), ITEMS vectors per lane.
template <typename T>
static void narrow_fwd(Bufs<T>& b, int rows, int cols) {
  constexpr int VEC = 16 / sizeof(T);
  const int nvec = cols / VEC;
  if (nvec > 64) return;
  auto go = [&]<int I>() {
    auto one = [&]<int R>() {
      const int blocks = (rows + R * kWarpRowsWarps - 1) / (R * kWarpRowsWarps);
      float us = time_us([&] {
        rms_norm_forward_warp_rows<T, I, R><<<blocks, kWarpRowsWarps * 32>>>(b.x, b.w, b.y, b.rstd, rows, cols, cols,
                                                                              1e-6f, 0.f);
      });
      report("rmsnorm fwd", dname<T>(), rows, cols, "warp_rows items=" + std::to_string(I) + " rows/warp=" + std::to_string(R),
             2.0 * rows * cols * sizeof(T), us);
      us = time_us([&] { softmax_forward_warp_rows<T, I, R><<<blocks, kWarpRowsWarps * 32>>>(b.x, b.y, rows, cols, cols); });
      report("softmax fwd", dname<T>(), rows, cols, "warp_rows items=" + std::to_string(I) + " rows/warp=" + std::to_string(R),
             2.0 * rows * cols * sizeof(T), us);
    };
    one.template operator()<1>();
    one.template operator()<2>();
    one.template operator()<4>();
    if constexpr (I == 1) one.template operator()<8>();
  };
  if (nvec <= 32) go.template operator()<1>();
  else go.template operator()<2>();
}

// Wide softmax rows in shared memory (softmax_forward_smem / softmax_backward_smem), 512 and 1024 threads.
template <typename T>
static void wide_smem(Bufs<T>& b, int rows, int cols) {
  const size_t row_bytes = size_t(cols) * sizeof(T);
  if (row_bytes > (200u << 10) || cols <= 16384) return;
  auto fwd = [&]<int TH>() {
    auto k = softmax_forward_smem<T, TH>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(row_bytes)));
    float us = time_us([&] { k<<<rows, TH, row_bytes>>>(b.x, b.y, cols, cols); });
    report("softmax fwd", dname<T>(), rows, cols, "smem thr=" + std::to_string(TH), 2.0 * rows * cols * sizeof(T), us);
  };
  fwd.template operator()<512>();
  fwd.template operator()<1024>();
  auto bwd = [&]<int TH, bool BOTH>() {
    auto k = softmax_backward_smem<T, TH, BOTH>;
    const size_t smem = BOTH ? 2 * row_bytes : row_bytes;
    if (smem > (200u << 10)) return;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    float us = time_us([&] { k<<<rows, TH, smem>>>(b.y, b.dy, b.dx, cols, cols); });
    report("softmax bwd", dname<T>(), rows, cols, std::string("smem ") + (BOTH ? "y+dy" : "y") + " thr=" + std::to_string(TH),
           3.0 * rows * cols * sizeof(T), us);
  };
  bwd.template operator()<512, false>();
  bwd.template operator()<1024, false>();
  bwd.template operator()<512, true>();
  bwd.template operator()<1024, true>();
}

// add_rms_norm, fused (the RMSNorm kernels with ADD) against the same kernels without the add plus a plain add.
template <typename T>
__global__ void add_kernel(const T* a, const T* b, T* c, size_t n) {
  constexpr int VEC = 16 / sizeof(T);
  size_t i = (blockIdx.x * size_t(blockDim.x) + threadIdx.x) * VEC;
  for (; i < n; i += size_t(gridDim.x) * blockDim.x * VEC) {
    float u[VEC], v[VEC];
    load16<T>(a + i, u);
    load16<T>(b + i, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) u[k] += v[k];
    store16<T>(c + i, u);
  }
}

template <typename T>
static void add_rms(Bufs<T>& b, int rows, int cols, int sms) {
  constexpr int VEC = 16 / sizeof(T);
  int items, threads;
  fwd_layout(cols, sizeof(T), items, threads);
  const double n = double(rows) * cols * sizeof(T);
  with_items(items, threads, [&]<int I, int TH>() {
    if constexpr (I * VEC <= 32 && TH <= 512) {
      float us = time_us([&] {
        rms_norm_forward_vec<T, I, TH, true><<<rows, TH>>>(b.x, b.w, b.y, b.rstd, cols, cols, 1e-6f, 0.f, b.r, cols, b.h);
      });
      report("add_rms fwd", dname<T>(), rows, cols, lay("fused", items, threads), 4.0 * n, us);
      us = time_us([&] {
        add_kernel<T><<<sms * 8, 256>>>(b.x, b.r, b.h, size_t(rows) * cols);
        rms_norm_forward_vec<T, I, TH><<<rows, TH>>>(b.h, b.w, b.y, b.rstd, cols, cols, 1e-6f, 0.f);
      });
      report("add_rms fwd", dname<T>(), rows, cols, lay("add + rmsnorm", items, threads), 4.0 * n, us);
    }
  });
  bwd_layout(cols, sizeof(T), 8, items, threads);
  with_items(items, threads, [&]<int I, int TH>() {
    if constexpr (I * VEC <= 16 && TH >= 128) {
      constexpr int S = 3;
      auto kern = rms_norm_backward_pipelined<T, I, TH, S, true, true, true>;
      const size_t smem = size_t(S) * 2 * I * TH * 16;
      if (smem > (192u << 10)) return;
      CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      int occ = 0;
      CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, TH, smem));
      const int groups = std::min(rows, occ * sms);
      float us = time_us([&] {
        kern<<<groups, TH, smem>>>(b.dy, b.h, b.w, b.rstd, b.dx, b.partial, rows, cols, cols, cols, 0.0f, b.dh, cols);
        rms_norm_dw_reduce<T><<<(cols + kDwReduceCols - 1) / kDwReduceCols, dim3(kDwReduceCols, kDwReduceSlices)>>>(
            b.partial, b.dw, groups, cols);
      });
      report("add_rms bwd", dname<T>(), rows, cols, lay("fused", items, threads) + " g=" + std::to_string(groups), 4.0 * n, us);
    }
  });
}

template <typename T>
static void run_dtype(int rows, int cols, int sms, bool full) {
  const size_t n = size_t(rows) * cols;
  Bufs<T> b;
  CK(cudaMalloc(&b.x, n * sizeof(T)));
  CK(cudaMalloc(&b.y, n * sizeof(T)));
  CK(cudaMalloc(&b.dy, n * sizeof(T)));
  CK(cudaMalloc(&b.dx, n * sizeof(T)));
  CK(cudaMalloc(&b.w, cols * sizeof(T)));
  CK(cudaMalloc(&b.dw, cols * sizeof(T)));
  CK(cudaMalloc(&b.r, n * sizeof(T)));
  CK(cudaMalloc(&b.h, n * sizeof(T)));
  CK(cudaMalloc(&b.dh, n * sizeof(T)));
  CK(cudaMalloc(&b.rstd, rows * sizeof(float)));
  CK(cudaMalloc(&b.partial, size_t(16) * sms * cols * sizeof(float)));
  float* tmp;
  CK(cudaMalloc(&tmp, n * sizeof(float)));
  fill_kernel<<<1024, 256>>>(tmp, n, 1u);
  cast_kernel<T><<<1024, 256>>>(tmp, b.x, n);
  fill_kernel<<<1024, 256>>>(tmp, n, 7u);
  cast_kernel<T><<<1024, 256>>>(tmp, b.dy, n);
  fill_kernel<<<1024, 256>>>(tmp, n, 11u);
  cast_kernel<T><<<1024, 256>>>(tmp, b.r, n);
  fill_kernel<<<1024, 256>>>(tmp, n, 13u);
  cast_kernel<T><<<1024, 256>>>(tmp, b.dh, n);
  fill_kernel<<<64, 256>>>(tmp, cols, 3u);
  cast_kernel<T><<<64, 256>>>(tmp, b.w, cols);
  CK(cudaDeviceSynchronize());
  CK(cudaFree(tmp));
  const int es = sizeof(T), VEC = 16 / es;
  const int nvec = cols / VEC;
  int items, threads;
  narrow_fwd(b, rows, cols);
  wide_smem(b, rows, cols);
  if (full) add_rms(b, rows, cols, sms);
  fwd_layout(cols, es, items, threads);
  sm_fwd(b, rows, cols, items, threads, cols * es <= 1024 || cols > 16384 ? "block-per-row" : "PROD");
  if (full && items > 0) {
    if (items > 1) sm_fwd(b, rows, cols, items / 2, round_warp(nvec / (items / 2)), "alt");
    if (items * 2 * VEC <= 32 && nvec / (items * 2) >= 32) sm_fwd(b, rows, cols, items * 2, round_warp(nvec / (items * 2)), "alt");
  }
  if (items < 0 && cols <= 32768) {  // registers at 1024 threads?
  }
  if (items > 0) {  // ops.cu: float32 takes 16 elements per thread where the block stays within 512 threads
    int rms_items = items, rms_threads = threads;
    if (es == 4) {
      fwd_layout(cols, es, rms_items, rms_threads, 16);
      if (rms_items < 0) rms_items = items, rms_threads = threads;
    }
    rms_fwd(b, rows, cols, rms_items, rms_threads, cols * es <= 1024 ? "block-per-row" : "PROD");
    if (full && rms_items > 1) rms_fwd(b, rows, cols, rms_items / 2, round_warp(nvec / (rms_items / 2)), "alt");
    if (full && rms_items < items) rms_fwd(b, rows, cols, items, threads, "alt (32 per thread, before)");
  }
  // softmax backward on y = softmax(x)
  bwd_layout(cols, es, 16, items, threads);
  sm_bwd(b, rows, cols, items, threads, "PROD");
  if (full && items > 0 && items * 2 * VEC <= 16) sm_bwd(b, rows, cols, items * 2, round_warp(nvec / (items * 2)), "alt");
  if (full && items > 1) sm_bwd(b, rows, cols, items / 2, round_warp(nvec / (items / 2)), "alt");
  // RMSNorm backward (rstd from the forward above)
  bwd_layout(cols, es, 8, items, threads);
  if (items > 0) {
    const bool prod = size_t(3) * 2 * cols * es <= (192u << 10);  // ops.cu: 3 stages within 192 KB
    rms_bwd(b, rows, cols, items, threads, 3, sms, prod ? "PROD" : "not-prod");
    if (full) rms_bwd(b, rows, cols, items, threads, 2, sms, "alt");
  }
  CK(cudaFree(b.x));
  CK(cudaFree(b.y));
  CK(cudaFree(b.dy));
  CK(cudaFree(b.dx));
  CK(cudaFree(b.w));
  CK(cudaFree(b.dw));
  CK(cudaFree(b.rstd));
  CK(cudaFree(b.r));
  CK(cudaFree(b.h));
  CK(cudaFree(b.dh));
  CK(cudaFree(b.partial));
}

// `rowbench check`: each kernel added for add_rms_norm, narrow and wide rows launched once on small ragged shapes, an
// error check after each (run under compute-sanitizer memcheck/racecheck without the PyTorch build).
#define LAUNCHED(name)                                                                   \
  do {                                                                                   \
    cudaError_t e_ = cudaDeviceSynchronize();                                            \
    if (e_ == cudaSuccess) e_ = cudaGetLastError();                                      \
    printf("%-60s %s\n", name, e_ == cudaSuccess ? "ok" : cudaGetErrorString(e_));       \
    fflush(stdout);                                                                      \
  } while (0)

template <typename T>
static void check_dtype() {
  constexpr int VEC = 16 / sizeof(T);
  const size_t n = size_t(4423) * 512 + 64;  // the largest shape below, plus slack for nothing: bounds are exact
  const size_t big = size_t(3) * 40000;
  T *x, *r, *h, *y, *dy, *dh, *dx, *w;
  float *rstd, *partial;
  const size_t m = std::max(n, big);
  for (T** p : {&x, &r, &h, &y, &dy, &dh, &dx}) CK(cudaMalloc(p, m * sizeof(T)));
  CK(cudaMalloc(&w, 40000 * sizeof(T)));
  CK(cudaMalloc(&rstd, 4423 * sizeof(float)));
  CK(cudaMalloc(&partial, size_t(132) * 16 * 8192 * sizeof(float)));
  float* tmp;
  CK(cudaMalloc(&tmp, m * sizeof(float)));
  for (T* p : {x, r, dy, dh, w}) {
    fill_kernel<<<256, 256>>>(tmp, m, unsigned(uintptr_t(p)));
    cast_kernel<T><<<256, 256>>>(tmp, p, p == w ? 40000 : m);
  }
  CK(cudaDeviceSynchronize());
  const char* dt = dname<T>();
  char name[128];
  // warp-rows forward (RMSNorm with and without the add, softmax): 4423 rows, a ragged last block
  snprintf(name, sizeof name, "%s warp_rows 4423x256 (add, rows/warp 4 or 2)", dt);
  if constexpr (VEC == 8) rms_norm_forward_warp_rows<T, 1, 4, true><<<(4423 + 15) / 16, 128>>>(x, w, y, rstd, 4423, 256, 256, 1e-6f, 1.f, r, 256, h);
  else rms_norm_forward_warp_rows<T, 2, 2, true><<<(4423 + 7) / 8, 128>>>(x, w, y, rstd, 4423, 256, 256, 1e-6f, 1.f, r, 256, h);
  LAUNCHED(name);
  snprintf(name, sizeof name, "%s softmax warp_rows 4423x64", dt);
  softmax_forward_warp_rows<T, 1, 4><<<(4423 + 15) / 16, 128>>>(x, y, 4423, 64, 64);
  LAUNCHED(name);
  // shared-memory softmax: ragged per-thread counts, 512 and 1024 threads, up to 160000 bytes a row
  auto smem_fwd = [&]<int TH>(int rows, int cols) {
    auto k = softmax_forward_smem<T, TH>;
    const size_t bytes = size_t(cols) * sizeof(T);
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    k<<<rows, TH, bytes>>>(x, y, cols, cols);
    snprintf(name, sizeof name, "%s softmax smem fwd %dx%d thr=%d (%zu B)", dt, rows, cols, TH, bytes);
    LAUNCHED(name);
  };
  smem_fwd.template operator()<512>(3, 20000);
  smem_fwd.template operator()<1024>(3, 40000);
  smem_fwd.template operator()<1024>(2, 32768);
  auto smem_bwd = [&]<int TH>(int rows, int cols) {
    auto k = softmax_backward_smem<T, TH, true>;
    const size_t bytes = 2 * size_t(cols) * sizeof(T);
    if (bytes > (200u << 10)) return;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    k<<<rows, TH, bytes>>>(y, dy, dx, cols, cols);
    snprintf(name, sizeof name, "%s softmax smem bwd y+dy %dx%d thr=%d (%zu B)", dt, rows, cols, TH, bytes);
    LAUNCHED(name);
  };
  smem_bwd.template operator()<512>(3, 12000);
  smem_bwd.template operator()<1024>(3, 20000);
  // add_rms_norm: vector forward, pipelined backward (3 stages, more rows than blocks), register and looped kernels
  rms_norm_forward_vec<T, 1, 128, true><<<7, 128>>>(x, w, y, rstd, 1000, 1000, 1e-6f, 0.f, r, 1000, h);
  snprintf(name, sizeof name, "%s add fwd vec 7x1000", dt);
  LAUNCHED(name);
  {
    constexpr int I = VEC == 8 ? 1 : 2;
    auto k = rms_norm_backward_pipelined<T, I, 128, 3, true, true, true>;
    const size_t smem = size_t(3) * 2 * I * 128 * 16;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    k<<<40, 128, smem>>>(dy, h, w, rstd, dx, partial, 301, 1000, 1000, 1000, 0.f, dh, 1000);
    rms_norm_dw_reduce<T><<<(1000 + kDwReduceCols - 1) / kDwReduceCols, dim3(kDwReduceCols, kDwReduceSlices)>>>(partial, w, 40, 1000);
    snprintf(name, sizeof name, "%s add bwd pipelined 301x1000 (40 blocks)", dt);
    LAUNCHED(name);
  }
  rms_norm_forward_registers<T, 1, 2, true><<<9, 512>>>(x, w, y, rstd, 1001, 1001, 1e-6f, 1.f, r, 1001, h);
  rms_norm_backward_registers<T, 1, 2, true, true, true><<<4, 512>>>(dy, h, w, rstd, dx, partial, 9, 1001, 1001, 1001, 1.f, dh, 1001);
  snprintf(name, sizeof name, "%s add fwd+bwd registers 9x1001", dt);
  LAUNCHED(name);
  rms_norm_forward_looped<T, true><<<3, 1024>>>(x, w, y, rstd, 8193, 8193, 1e-6f, 0.f, r, 8193, h);
  rms_norm_backward_looped<T, true, false, true><<<2, 1024>>>(dy, h, w, rstd, dx, nullptr, 3, 8193, 8193, 8193, 0.f, dh, 8193);
  snprintf(name, sizeof name, "%s add fwd+bwd looped 3x8193", dt);
  LAUNCHED(name);
  softmax_backward_registers<T, 1, 2><<<5, 512>>>(y, dy, dx, 1001, 1001);
  softmax_backward_registers<T, VEC, 1, 128><<<5, 128>>>(y, dy, dx, 1000, 1000);
  snprintf(name, sizeof name, "%s softmax bwd registers (both load policies)", dt);
  LAUNCHED(name);
  for (T* p : {x, r, h, y, dy, dh, dx, w}) CK(cudaFree(p));
  CK(cudaFree(rstd));
  CK(cudaFree(partial));
  CK(cudaFree(tmp));
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "ncu-fwd") {  // one launch of each, for Nsight Compute (cuda_run.sh ncu)
    const int rows = 8192, cols = 4096;
    bf16 *x, *w, *y;
    float* rstd;
    CK(cudaMalloc(&x, size_t(rows) * cols * sizeof(bf16)));
    CK(cudaMalloc(&y, size_t(rows) * cols * sizeof(bf16)));
    CK(cudaMalloc(&w, cols * sizeof(bf16)));
    CK(cudaMalloc(&rstd, rows * sizeof(float)));
    CK(cudaMemset(x, 0x3c, size_t(rows) * cols * sizeof(bf16)));
    CK(cudaMemset(w, 0x3f, cols * sizeof(bf16)));
    softmax_forward_vec<bf16, 4, 128><<<rows, 128>>>(x, y, cols, cols);
    rms_norm_forward_vec<bf16, 4, 128><<<rows, 128>>>(x, w, y, rstd, cols, cols, 1e-6f, 0.f);
    CK(cudaDeviceSynchronize());
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "check") {
    int optin = 0;
    CK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
    printf("max dynamic shared memory per block (opt-in): %d B\n", optin);
    check_dtype<bf16>();
    check_dtype<float>();
    return 0;
  }
  if (argc > 1) bench_reps = atoi(argv[1]);
  const bool target_shapes_only = argc > 2 && std::string(argv[2]) == "targets";  // 8192x4096 and 4096x8192
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  g_copy_gbps = copy_bandwidth_gbps();
  printf("copy bandwidth: %.0f GB/s (1 GiB D2D, read+write), %d SMs\n", g_copy_gbps, sms);
  for (auto [r, c] : {std::pair{8192, 4096}, std::pair{4096, 8192}, std::pair{2048, 32768}, std::pair{256, 262144},
                      std::pair{65536, 256}, std::pair{32768, 1024}, std::pair{512, 512}}) {
    const bool full = c == 4096 || c == 8192;
    if (target_shapes_only && !full) continue;
    run_dtype<bf16>(r, c, sms, full);
    run_dtype<float>(r, c, sms, full);
  }
  return 0;
}
