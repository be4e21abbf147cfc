// Side-by-side timings of the SwiGLU and RoPE kernel variants on the CUDA device (no PyTorch), bf16 at the LLM
// shapes of issue #16: each launch timed by CUDA events after clearing a 512 MB buffer (cold L2), median of 30.
// Prints µs and % of the copy bandwidth measured in the same run for the minimal bytes, and checks that every variant
// writes the same bits as the first one. Build and run (benchmarks/cuda_run.sh step glurope):
//   nvcc -O3 -std=c++20 -arch=sm_90 -I csrc/cuda -I csrc/include benchmarks/cuda_glu_rope_bench.cu -o /tmp/glurope
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda_bench_timing.cuh"
#include "glu_kernels.cuh"
#include "rope_kernels.cuh"

using namespace tmf::cuda;
using bf16 = __nv_bfloat16;

static double g_copy_gbps = 0;

static void report(const std::string& what, const std::string& variant, double bytes, float us) {
  printf("%-34s %-26s %8.1f us  %5.1f %% of copy\n", what.c_str(), variant.c_str(), us,
         100.0 * bytes / (us * 1e-6) / (g_copy_gbps * 1e9));
}

static void fill_random(bf16* p, size_t n, float scale) {
  std::vector<bf16> h(n);
  uint32_t state = 12345;
  for (size_t i = 0; i < n; ++i) {
    state = state * 1664525u + 1013904223u;
    h[i] = __float2bfloat16(scale * (float(state >> 8) / float(1 << 24) * 2.0f - 1.0f));
  }
  CK(cudaMemcpy(p, h.data(), n * sizeof(bf16), cudaMemcpyHostToDevice));
}

// The SwiGLU forward before this comparison (accurate expf and division, one 16-byte pack per thread), for reference.
__global__ void swiglu_forward_before(const bf16* __restrict__ gate, const bf16* __restrict__ up, bf16* __restrict__ out,
                                      int64_t n) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (c0 >= n) return;
  GluPack<bf16, 8> g = *reinterpret_cast<const GluPack<bf16, 8>*>(gate + c0), u = *reinterpret_cast<const GluPack<bf16, 8>*>(up + c0), o;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float x = to_float(g.v[i]);
    o.v[i] = from_float<bf16>(x * (1.0f / (1.0f + expf(-x))) * to_float(u.v[i]));
  }
  *reinterpret_cast<GluPack<bf16, 8>*>(out + c0) = o;
}

template <int THREADS, int ITEMS>
static void glu_variant(const char* name, int64_t tokens, int64_t inter, const bf16* g, const bf16* u, const bf16* d,
                        bf16* out, bf16* dg, bf16* du, const bf16* ref_out, const bf16* ref_dg) {
  constexpr int kVec = 8;
  const int64_t strides[3] = {inter, inter, inter};
  const GluShape s = glu_shape(tokens, inter, strides, 3, kVec, THREADS * ITEMS);
  const int64_t n = tokens * inter;
  const unsigned blocks = unsigned(s.rows * s.blocks_per_row);
  const std::string what = "swiglu " + std::to_string(tokens) + "x" + std::to_string(inter);
  const float fwd = time_us([&] { glu_forward_kernel<bf16, 0, kVec, THREADS, ITEMS><<<blocks, THREADS>>>(g, u, out, s); });
  const float bwd = time_us(
      [&] { glu_backward_kernel<bf16, 0, kVec, THREADS, ITEMS><<<blocks, THREADS>>>(g, u, d, dg, du, s); });
  report(what + " fwd", name, 3.0 * n * 2, fwd);
  report(what + " bwd", name, 5.0 * n * 2, bwd);
  if (!same_bits(ref_out, out, n * 2) || !same_bits(ref_dg, dg, n * 2)) {
    printf("MISMATCH: %s %s differs from the flat kernels\n", what.c_str(), name);
  }
}

static void bench_glu(int64_t tokens, int64_t inter) {
  const int64_t n = tokens * inter;
  // The generic kernels take whole 16-byte chunks only (glu_load), and the flat timing below has no tail launch.
  if (inter % 8 != 0) {
    fprintf(stderr, "bench_glu: inter must be a multiple of 8, got %lld\n", static_cast<long long>(inter));
    exit(1);
  }
  bf16 *g, *u, *d, *out, *dg, *du, *ref_out, *ref_dg;
  for (bf16** p : {&g, &u, &d, &out, &dg, &du, &ref_out, &ref_dg}) CK(cudaMalloc(p, n * 2));
  fill_random(g, n, 4.0f);
  fill_random(u, n, 1.0f);
  fill_random(d, n, 1.0f);
  const std::string what = "swiglu " + std::to_string(tokens) + "x" + std::to_string(inter);
  const unsigned flat_blocks = unsigned((n / 8 + 255) / 256);
  report(what + " fwd", "before (accurate math)", 3.0 * n * 2,
         time_us([&] { swiglu_forward_before<<<flat_blocks, 256>>>(g, u, out, n); }));
  report(what + " fwd", "flat (shipped)", 3.0 * n * 2,
         time_us([&] { glu_forward_flat<bf16, 0, 8><<<flat_blocks, 256>>>(g, u, out, n); }));
  report(what + " bwd", "flat (shipped)", 5.0 * n * 2,
         time_us([&] { glu_backward_flat<bf16, 0, 8><<<flat_blocks, 256>>>(g, u, d, dg, du, n); }));
  CK(cudaMemcpy(ref_out, out, n * 2, cudaMemcpyDeviceToDevice));
  CK(cudaMemcpy(ref_dg, dg, n * 2, cudaMemcpyDeviceToDevice));
  glu_variant<256, 2>("generic 256 threads x 2", tokens, inter, g, u, d, out, dg, du, ref_out, ref_dg);
  glu_variant<256, 4>("generic 256 threads x 4", tokens, inter, g, u, d, out, dg, du, ref_out, ref_dg);
  glu_variant<128, 4>("generic 128 threads x 4", tokens, inter, g, u, d, out, dg, du, ref_out, ref_dg);
  for (bf16* p : {g, u, d, out, dg, du, ref_out, ref_dg}) CK(cudaFree(p));
}

static void bench_rope(int64_t batch, int64_t seq) {
  const int64_t qh = 32, kh = 8, hd = 128;
  const int64_t nq = batch * seq * qh * hd, nk = batch * seq * kh * hd;
  bf16 *q, *k, *cs, *sn, *qo, *ko, *ref_q, *ref_k;
  CK(cudaMalloc(&q, nq * 2));
  CK(cudaMalloc(&k, nk * 2));
  CK(cudaMalloc(&qo, nq * 2));
  CK(cudaMalloc(&ko, nk * 2));
  CK(cudaMalloc(&ref_q, nq * 2));
  CK(cudaMalloc(&ref_k, nk * 2));
  CK(cudaMalloc(&cs, seq * hd * 2));
  CK(cudaMalloc(&sn, seq * hd * 2));
  fill_random(q, nq, 1.0f);
  fill_random(k, nk, 1.0f);
  fill_random(cs, seq * hd, 1.0f);
  fill_random(sn, seq * hd, 1.0f);
  // q, k as Hugging Face passes them: the projection's (batch, seq, heads, head_dim) memory seen as (batch, heads,
  // seq, head_dim); cos/sin one batch of (seq, head_dim).
  const RopeShape p{batch, seq, hd, hd, qh, kh, seq * qh * hd, hd, qh * hd, seq * kh * hd, hd, kh * hd, 0, false, false};
  const double bytes = 2.0 * (nq + nk) * 2;
  const std::string what = "rope " + std::to_string(batch) + "x" + std::to_string(seq) + "x32/8x128 fwd";
  auto check = [&](const char* name, bool first) {
    if (first) {
      CK(cudaMemcpy(ref_q, qo, nq * 2, cudaMemcpyDeviceToDevice));
      CK(cudaMemcpy(ref_k, ko, nk * 2, cudaMemcpyDeviceToDevice));
    } else if (!same_bits(ref_q, qo, nq * 2) || !same_bits(ref_k, ko, nk * 2)) {
      printf("MISMATCH: %s %s differs from the first variant\n", what.c_str(), name);
    }
  };
  const int64_t slots = batch * seq * (hd / 2);
  float us = time_us([&] {
    rope_apply_kernel<bf16><<<unsigned((slots + 255) / 256), 256>>>(q, k, cs, sn, qo, ko, p);
  });
  report(what, "general (thread per slot)", bytes, us);
  check("general", true);
  const int64_t threads = batch * (qh + kh) * seq * (hd / 2 / 8);
  us = time_us([&] {
    rope_rotate_half_heads_kernel<bf16, 8><<<unsigned((threads + 255) / 256), 256>>>(q, k, cs, sn, qo, ko, p);
  });
  report(what, "head-parallel (16-byte packs)", bytes, us);
  check("head-parallel", false);
  for (bf16* ptr : {q, k, cs, sn, qo, ko, ref_q, ref_k}) CK(cudaFree(ptr));
}

int main() {
  g_copy_gbps = copy_bandwidth_gbps();
  printf("copy bandwidth (1 GiB device-to-device, read + write): %.0f GB/s\n", g_copy_gbps);
  bench_glu(8192, 11008);
  bench_glu(16384, 14336);
  bench_rope(4, 4096);
  bench_rope(8, 2048);
  return 0;
}
