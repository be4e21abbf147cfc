// Device buffers and cuBLAS status checks for the standalone LoRA benchmarks (cuda_lora_kernels_bench.cu,
// cuda_lora_kconcat_bench.cu): uninitialised buffers and bfloat16 ones filled with a seeded uniform draw in
// [-scale, scale) (the same values on every run and machine, so two benchmarks' checks see the same operands).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <vector>

#include "cuda_bench_timing.cuh"

#define CB(x)                                                                             \
  do {                                                                                    \
    cublasStatus_t st_ = (x);                                                             \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                                   \
      fprintf(stderr, "%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, #x, int(st_)); \
      exit(1);                                                                            \
    }                                                                                     \
  } while (0)

template <class E = __nv_bfloat16>
E* alloc(size_t n) {
  E* d;
  CK(cudaMalloc(&d, n * sizeof(E)));
  return d;
}

inline __nv_bfloat16* alloc_random(size_t n, float scale, uint32_t seed) {
  std::vector<__nv_bfloat16> h(n);
  uint32_t state = seed * 2654435761u + 12345u;
  for (size_t i = 0; i < n; ++i) {
    state = state * 1664525u + 1013904223u;
    h[i] = __float2bfloat16(scale * (float(state >> 8) / float(1 << 24) * 2.0f - 1.0f));
  }
  __nv_bfloat16* d = alloc(n);
  CK(cudaMemcpy(d, h.data(), n * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  return d;
}
