// Shared by the standalone CUDA benchmarks (cuda_rowbench.cu, cuda_glu_rope_bench.cu, cuda_lora_kernels_bench.cu; no
// PyTorch): error checks, launch timing by CUDA events after clearing a 512 MB buffer (cold L2), median of bench_reps,
// the device's copy bandwidth (1 GiB device-to-device, read + write) that the benchmarks' "% of copy" columns divide
// by, and a bit-for-bit comparison of two device buffers.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define CK(x)                                                                               \
  do {                                                                                      \
    cudaError_t err_ = (x);                                                                 \
    if (err_ != cudaSuccess) {                                                              \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(err_)); \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)

inline int bench_reps = 30;

inline float time_us(const std::function<void()>& f) {
  constexpr size_t kFlushBytes = size_t(512) << 20;
  static void* flush = nullptr;
  if (flush == nullptr) CK(cudaMalloc(&flush, kFlushBytes));
  std::vector<cudaEvent_t> ev(2 * bench_reps);
  for (auto& e : ev) CK(cudaEventCreate(&e));
  f();  // warm-up
  CK(cudaGetLastError());
  for (int i = 0; i < bench_reps; ++i) {
    CK(cudaMemsetAsync(flush, i & 0xff, kFlushBytes));
    CK(cudaEventRecord(ev[2 * i]));
    f();
    CK(cudaEventRecord(ev[2 * i + 1]));
  }
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  std::vector<float> t(bench_reps);
  for (int i = 0; i < bench_reps; ++i) CK(cudaEventElapsedTime(&t[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) CK(cudaEventDestroy(e));
  std::sort(t.begin(), t.end());
  return t[bench_reps / 2] * 1000.0f;
}

inline double copy_bandwidth_gbps() {
  const size_t bytes = size_t(1) << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 1, bytes));
  const float us = time_us([&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * bytes / (us * 1e-6) / 1e9;
}

// Whether two device buffers hold the same bytes (variants of a kernel that must compute identical results).
inline bool same_bits(const void* a, const void* b, size_t bytes) {
  std::vector<char> ha(bytes), hb(bytes);
  CK(cudaMemcpy(ha.data(), a, bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hb.data(), b, bytes, cudaMemcpyDeviceToHost));
  return memcmp(ha.data(), hb.data(), bytes) == 0;
}
