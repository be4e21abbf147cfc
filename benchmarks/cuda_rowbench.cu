// Side-by-side timings of row-kernel variants on the CUDA device (no PyTorch): each launch timed by CUDA events
// after clearing a 512 MB buffer (cold L2), median of REPS. Prints µs and % of the measured copy bandwidth for the
// minimal bytes. Build: nvcc -O3 -std=c++20 -arch=sm_90 -I csrc/cuda benchmarks/cuda_rowbench.cu -o rowbench
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "row_kernels.cuh"

using namespace tmf::cuda;
using bf16 = __nv_bfloat16;

#define CK(x)                                                                        \
  do {                                                                               \
    cudaError_t err_ = (x);                                                             \
    if (err_ != cudaSuccess) {                                                        \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(err_)); \
      exit(1);                                                                       \
    }                                                                                \
  } while (0)

static void* g_flush;
static size_t g_flush_bytes = size_t(512) << 20;
static int REPS = 30;
static double g_copy_gbps = 0;

static float time_us(const std::function<void()>& f) {
  std::vector<cudaEvent_t> ev(2 * REPS);
  for (auto& e : ev) CK(cudaEventCreate(&e));
  f();  // warm-up
  CK(cudaGetLastError());
  for (int i = 0; i < REPS; ++i) {
    CK(cudaMemsetAsync(g_flush, i & 0xff, g_flush_bytes));
    CK(cudaEventRecord(ev[2 * i]));
    f();
    CK(cudaEventRecord(ev[2 * i + 1]));
  }
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  std::vector<float> t(REPS);
  for (int i = 0; i < REPS; ++i) CK(cudaEventElapsedTime(&t[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) CK(cudaEventDestroy(e));
  std::sort(t.begin(), t.end());
  return t[REPS / 2] * 1000.0f;
}

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
static void fwd_layout(int cols, int es, int& items, int& threads) {
  const int vec = 16 / es, max_items = 32 / vec;
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
  T *x, *y, *dy, *dx, *w, *dw;
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
      float us = time_us([&] { softmax_backward_vec<T, I, TH><<<rows, TH>>>(b.y, b.dy, b.dx, cols, cols); });
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
        kern<<<groups, TH, smem>>>(b.dy, b.x, b.w, b.rstd, b.dx, b.partial, rows, cols, cols, cols, 0.0f);
        if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
          printf("rmsnorm bwd %s %dx%d %s st=%d smem=%zu: launch failed: %s\n", dname<T>(), rows, cols,
                 lay(tag, items, threads).c_str(), S, smem, cudaGetErrorString(e));
          return;
        }
        float us = time_us([&] {
          kern<<<groups, TH, smem>>>(b.dy, b.x, b.w, b.rstd, b.dx, b.partial, rows, cols, cols, cols, 0.0f);
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
  CK(cudaMalloc(&b.rstd, rows * sizeof(float)));
  CK(cudaMalloc(&b.partial, size_t(16) * sms * cols * sizeof(float)));
  float* tmp;
  CK(cudaMalloc(&tmp, n * sizeof(float)));
  fill_kernel<<<1024, 256>>>(tmp, n, 1u);
  cast_kernel<T><<<1024, 256>>>(tmp, b.x, n);
  fill_kernel<<<1024, 256>>>(tmp, n, 7u);
  cast_kernel<T><<<1024, 256>>>(tmp, b.dy, n);
  fill_kernel<<<64, 256>>>(tmp, cols, 3u);
  cast_kernel<T><<<64, 256>>>(tmp, b.w, cols);
  CK(cudaDeviceSynchronize());
  CK(cudaFree(tmp));
  const int es = sizeof(T), VEC = 16 / es;
  const int nvec = cols / VEC;
  int items, threads;
  fwd_layout(cols, es, items, threads);
  sm_fwd(b, rows, cols, items, threads, "PROD");
  if (full && items > 0) {
    if (items > 1) sm_fwd(b, rows, cols, items / 2, round_warp(nvec / (items / 2)), "alt");
    if (items * 2 * VEC <= 32 && nvec / (items * 2) >= 32) sm_fwd(b, rows, cols, items * 2, round_warp(nvec / (items * 2)), "alt");
  }
  if (items < 0 && cols <= 32768) {  // registers at 1024 threads?
  }
  if (items > 0) {
    rms_fwd(b, rows, cols, items, threads, "PROD");
    if (full && items > 1) rms_fwd(b, rows, cols, items / 2, round_warp(nvec / (items / 2)), "alt");
  }
  // softmax backward on y = softmax(x)
  bwd_layout(cols, es, 16, items, threads);
  sm_bwd(b, rows, cols, items, threads, "PROD");
  if (full && items > 0 && items * 2 * VEC <= 16) sm_bwd(b, rows, cols, items * 2, round_warp(nvec / (items * 2)), "alt");
  if (full && items > 1) sm_bwd(b, rows, cols, items / 2, round_warp(nvec / (items / 2)), "alt");
  // RMSNorm backward (rstd from the forward above)
  bwd_layout(cols, es, 8, items, threads);
  if (items > 0) {
    const bool prod = size_t(3) * 2 * cols * es <= (96u << 10);  // ops.cu: 3 stages within 96 KB
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
  CK(cudaFree(b.partial));
}

int main(int argc, char** argv) {
  if (argc > 1) REPS = atoi(argv[1]);
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaMalloc(&g_flush, g_flush_bytes));
  {
    void *a, *b;
    const size_t n = size_t(1) << 30;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    float us = time_us([&] { CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); });
    g_copy_gbps = 2.0 * n / (us * 1e3);
    printf("copy bandwidth: %.0f GB/s (1 GiB D2D, read+write), %d SMs\n", g_copy_gbps, sms);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  for (auto [r, c] : {std::pair{8192, 4096}, std::pair{4096, 8192}, std::pair{2048, 32768}, std::pair{256, 262144},
                      std::pair{65536, 256}, std::pair{32768, 1024}, std::pair{512, 512}}) {
    const bool full = c == 4096 || c == 8192;
    run_dtype<bf16>(r, c, sms, full);
    run_dtype<float>(r, c, sms, full);
  }
  return 0;
}
