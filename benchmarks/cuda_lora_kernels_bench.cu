// LoRA's skinny products, our tensor-core kernels (csrc/cuda/lora_kernels.cuh) against cuBLAS, and the forward and
// backward compositions built from them against the base GEMMs, bf16, without PyTorch. Each kernel result is first
// checked against cuBLAS's (float32 accumulation both; the worst difference in units of the larger magnitude).
//   nvcc -O3 -std=c++20 -arch=sm_90 -I csrc/cuda benchmarks/cuda_lora_kernels_bench.cu -lcublas -o /tmp/lorak
//   /tmp/lorak [reps] [pipelined | ncu]   (pipelined: only the two-stream routes, below; ncu: one shape, for ncu)
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "cuda_bench_buffers.cuh"
#include "cuda_bench_timing.cuh"
#include "lora_kernels.cuh"
#include "cp_async.cuh"

using namespace tmf::cuda;
using bf16 = __nv_bfloat16;

// ---- a reduce kernel for h = x·Aᵀ and dh = s·dy·B (measured here slower than cuBLAS: the op does not use it) ----
// out[M, R] = scale · X[M, K] · Lᵀ, L [R, K] row-major. Lane (g, t) loads 8 consecutive K-elements of rows g and
// g+8 of X and of row g of L; the m16n8k16 fragments take elements {0,1},{2,3} as their k-slots {2t,2t+1},
// {2t+8,2t+9} of one mma and {4,5},{6,7} of a second.
template <typename T>
__device__ __forceinline__ T round_to(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return __float2half_rn(v);
  }
}

// A block has ROW_TILES × K_SPLITS warps: warp (rt, ks) owns rows 16·rt .. 16·rt+15 of the block's rows and the
// 64-column chunks ks, ks + K_SPLITS, ... of K. Warps at the same chunk read the same L vectors, so L comes from L1;
// each warp loads its next chunk of X before the mma of the current one (two chunks, 2 KiB of X per warp in flight).
// The K_SPLITS partial sums meet in shared memory, fixed order: the result does not depend on timing.
constexpr int kReduceChunk = 64;

template <int R, int ROW_TILES, int K_SPLITS>
constexpr int lora_reduce_smem_bytes() {
  return K_SPLITS > 1 ? K_SPLITS * ROW_TILES * (R / 8) * 4 * 32 * int(sizeof(float)) : 0;
}

template <typename T, int R, int ROW_TILES, int K_SPLITS>
__global__ void __launch_bounds__(ROW_TILES* K_SPLITS * 32)
    lora_reduce_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ l, T* __restrict__ out, int64_t m,
                       int64_t k, float scale) {
  constexpr int NT = R / 8;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int rt = warp % ROW_TILES, ks = warp / ROW_TILES;
  const int64_t row_lo = (int64_t(blockIdx.x) * ROW_TILES + rt) * 16 + g, row_hi = row_lo + 8;
  const bool lo_ok = row_lo < m, hi_ok = row_hi < m;
  const T* x_lo = x + (lo_ok ? row_lo : 0) * ldx;
  const T* x_hi = x + (hi_ok ? row_hi : 0) * ldx;

  float acc[NT][4] = {};
  uint4 cur[4], nxt[4];
  auto load_x = [&](uint4 (&v)[4], int64_t c0) {
    const int64_t c1 = c0 + 32;
    v[0] = load16_or_zero(x_lo + c0, lo_ok && c0 < k);
    v[1] = load16_or_zero(x_hi + c0, hi_ok && c0 < k);
    v[2] = load16_or_zero(x_lo + c1, lo_ok && c1 < k);
    v[3] = load16_or_zero(x_hi + c1, hi_ok && c1 < k);
  };
  const int64_t chunks = (k + kReduceChunk - 1) / kReduceChunk;
  int64_t chunk = ks;
  if (chunk < chunks) load_x(cur, chunk * kReduceChunk + 8 * t);
  for (; chunk < chunks; chunk += K_SPLITS) {
    const int64_t c0 = chunk * kReduceChunk + 8 * t;
    if (chunk + K_SPLITS < chunks) load_x(nxt, c0 + K_SPLITS * kReduceChunk);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const T* lrow = l + int64_t(8 * j + g) * k;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t c = c0 + 32 * half;
        const uint4 b = load16_or_zero(lrow + c, c < k);
        const uint4& lo = cur[2 * half];
        const uint4& hi = cur[2 * half + 1];
        mma_16816<T>(acc[j], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
        mma_16816<T>(acc[j], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) cur[i] = nxt[i];
  }

  // acc[j][q]: row g + 8·(q / 2), column 8j + 2t + q % 2 of the warp's 16-row tile.
  auto store = [&](int j, int q, float v) {
    const int64_t row = (q < 2) ? row_lo : row_hi;
    if (row < m) out[row * R + 8 * j + 2 * t + (q % 2)] = round_to<T>(scale * v);
  };
  if constexpr (K_SPLITS == 1) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) store(j, q, acc[j][q]);
  } else {
    extern __shared__ float partial[];  // [K_SPLITS][ROW_TILES][NT·4][32], lane fastest: no bank conflicts
    constexpr int kPerWarp = NT * 4 * 32;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) partial[(ks * ROW_TILES + rt) * kPerWarp + (j * 4 + q) * 32 + lane] = acc[j][q];
    __syncthreads();
    if (ks == 0) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float v = 0.f;
#pragma unroll
          for (int s = 0; s < K_SPLITS; ++s) v += partial[(s * ROW_TILES + rt) * kPerWarp + (j * 4 + q) * 32 + lane];
          store(j, q, v);
        }
    }
  }
}

// Reduce: two 16-row tiles × four K splits per 256-thread block while that gives two blocks per SM; fewer rows
// (fewer blocks) take one tile × eight splits. variant > 0 forces one (the benchmark's side-by-side runs).
template <typename T, int R, int ROW_TILES, int K_SPLITS>
void launch_lora_reduce_config(const T* x, int64_t ldx, const T* l, T* out, int64_t m, int64_t k, float scale,
                               cudaStream_t stream) {
  constexpr int rows = 16 * ROW_TILES;
  constexpr int smem = lora_reduce_smem_bytes<R, ROW_TILES, K_SPLITS>();
  static_assert(smem <= 48 * 1024, "lora_reduce: partial sums over the default shared-memory limit");
  const int64_t blocks = (m + rows - 1) / rows;
  lora_reduce_kernel<T, R, ROW_TILES, K_SPLITS>
      <<<dim3(unsigned(blocks)), ROW_TILES * K_SPLITS * 32, smem, stream>>>(x, ldx, l, out, m, k, scale);
}

template <typename T, int R>
void launch_lora_reduce_rank(const T* x, int64_t ldx, const T* l, T* out, int64_t m, int64_t k, float scale,
                             int sms, cudaStream_t stream, int variant) {
  if (variant == 0) variant = (m + 31) / 32 >= 2 * int64_t(sms) ? 1 : 2;
  switch (variant) {
    case 1: return launch_lora_reduce_config<T, R, 2, 4>(x, ldx, l, out, m, k, scale, stream);
    case 2: return launch_lora_reduce_config<T, R, 1, 8>(x, ldx, l, out, m, k, scale, stream);
    default: return launch_lora_reduce_config<T, R, 4, 2>(x, ldx, l, out, m, k, scale, stream);
  }
}

// ---- Candidate: dh = s·dy·B and dB = s·dyᵀ·h from ONE read of dy (not used by the op; docs/cuda.md's plan for the
// forward+backward target: cuBLAS reads dy twice, at 53-57 % of copy bandwidth each). A block takes a 256x256 tile of
// dy in four 64-row chunks through shared memory (cp.async, double-buffered; rows padded by 16 bytes so ldmatrix's
// eight row addresses hit distinct banks), with the tile's 256 rows of B and each chunk's rows of h beside it:
//   dh: warp (m-tile w % 4 of the chunk, half w / 4 of the rank's n-tiles): A = dy rows (ldmatrix), B = B's rows
//       (ldmatrix.trans), 16 k-steps over the tile's columns -> a float32 partial per column tile, p_dh [n/256][m][R];
//   dB: warp w owns the tile's columns 32w..32w+31 (two m-tiles of dyᵀ: ldmatrix.trans of dy), B = h's chunk rows
//       (ldmatrix.trans), accumulated over the four chunks -> a float32 partial per row tile, p_db [m/256][n][R];
// then lora_dy_pass_finalize sums the partials (deterministic order) and scales. Ranks 16, 32, 64; m and n multiples
// of 256; dy rows, B and h 16-byte aligned (B, h contiguous). Written without a GPU: the benchmark checks it
// against cuBLAS before timing it.
constexpr int kDyTile = 256, kDyChunk = 64, kDyPitch = kDyTile + 8;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// Four 8x8 b16 matrices; lanes 8i..8i+7 give matrix i's row addresses.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

template <int R>
constexpr size_t dy_pass_smem_bytes() {
  return (2 * kDyChunk * kDyPitch + kDyTile * (R + 8) + 2 * kDyChunk * (R + 8)) * sizeof(bf16);
}

template <int R>
__global__ void __launch_bounds__(256) lora_dy_pass_kernel(const bf16* __restrict__ dy, int64_t ldy,
                                                           const bf16* __restrict__ b, const bf16* __restrict__ h,
                                                           float* __restrict__ p_dh, float* __restrict__ p_db,
                                                           int64_t m, int64_t n) {
  static_assert(R % 16 == 0, "two warps share a 16-row tile's rank n-tiles");
  constexpr int NT = R / 8, PR = R + 8;
  extern __shared__ __align__(16) unsigned char dy_pass_smem[];
  bf16* s_dy = reinterpret_cast<bf16*>(dy_pass_smem);  // [2][kDyChunk][kDyPitch]
  bf16* s_b = s_dy + 2 * kDyChunk * kDyPitch;          // [kDyTile][PR]
  bf16* s_h = s_b + kDyTile * PR;                      // [2][kDyChunk][PR]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int64_t col0 = int64_t(blockIdx.x) * kDyTile, row0 = int64_t(blockIdx.y) * kDyTile;

  auto load_chunk = [&](int c, int buf) {
    const int64_t r0 = row0 + int64_t(c) * kDyChunk;
    for (int i = tid; i < kDyChunk * kDyTile / 8; i += 256) {
      const int row = i / (kDyTile / 8), v = i % (kDyTile / 8);
      cp_async16(s_dy + (buf * kDyChunk + row) * kDyPitch + v * 8, dy + (r0 + row) * ldy + col0 + v * 8);
    }
    for (int i = tid; i < kDyChunk * R / 8; i += 256) {
      const int row = i / (R / 8), v = i % (R / 8);
      cp_async16(s_h + (buf * kDyChunk + row) * PR + v * 8, h + (r0 + row) * R + v * 8);
    }
  };
  for (int i = tid; i < kDyTile * R / 8; i += 256) {
    const int row = i / (R / 8), v = i % (R / 8);
    cp_async16(s_b + row * PR + v * 8, b + (col0 + row) * R + v * 8);
  }
  load_chunk(0, 0);
  cp_async_commit();

  float acc_db[2][NT][4] = {};
  constexpr int kChunks = kDyTile / kDyChunk;
  for (int c = 0; c < kChunks; ++c) {
    const int buf = c & 1;
    if (c + 1 < kChunks) load_chunk(c + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the chunk just issued: chunk c (and B's rows) landed
    __syncthreads();
    const bf16* chunk = s_dy + buf * kDyChunk * kDyPitch;
    {  // dh for the chunk's rows, over the tile's columns
      const int mt = warp % 4, nb = (warp / 4) * (NT / 2);
      float acc[NT / 2][4] = {};
      const bf16* a_row = chunk + (16 * mt + lane % 16) * kDyPitch + 8 * (lane / 16);
#pragma unroll 4
      for (int ks = 0; ks < kDyTile / 16; ++ks) {
        uint32_t a[4];
        ldsm_x4(a, a_row + 16 * ks);
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
          uint32_t bb[2];
          ldsm_x2_trans(bb, s_b + (16 * ks + lane % 16) * PR + 8 * (nb + j));
          mma_16816<bf16>(acc[j], a[0], a[1], a[2], a[3], bb[0], bb[1]);
        }
      }
      const int64_t row = row0 + int64_t(c) * kDyChunk + 16 * mt + g;
      float* out = p_dh + (int64_t(blockIdx.x) * m + row) * R;
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        const int r = 8 * (nb + j) + 2 * t;
        *reinterpret_cast<float2*>(out + r) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(out + 8 * R + r) = make_float2(acc[j][2], acc[j][3]);
      }
    }
    {  // dB for the warp's 32 columns, over the chunk's rows
      const bf16* h_chunk = s_h + buf * kDyChunk * PR;
#pragma unroll
      for (int kk = 0; kk < kDyChunk / 16; ++kk) {
        uint32_t hb[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) ldsm_x2_trans(hb[nt], h_chunk + (16 * kk + lane % 16) * PR + 8 * nt);
#pragma unroll
        for (int mm = 0; mm < 2; ++mm) {
          uint32_t a[4];
          ldsm_x4_trans(a, chunk + (16 * kk + (lane / 16) * 8 + lane % 8) * kDyPitch + 32 * warp + 16 * mm +
                               ((lane / 8) % 2) * 8);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816<bf16>(acc_db[mm][nt], a[0], a[1], a[2], a[3], hb[nt][0], hb[nt][1]);
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites this buffer
  }
#pragma unroll
  for (int mm = 0; mm < 2; ++mm) {
    const int64_t col = col0 + 32 * warp + 16 * mm + g;
    float* out = p_db + (int64_t(blockIdx.y) * n + col) * R;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = 8 * nt + 2 * t;
      *reinterpret_cast<float2*>(out + r) = make_float2(acc_db[mm][nt][0], acc_db[mm][nt][1]);
      *reinterpret_cast<float2*>(out + 8 * R + r) = make_float2(acc_db[mm][nt][2], acc_db[mm][nt][3]);
    }
  }
}

// dh = s · Σ p_dh over the column tiles, dB = s · Σ p_db over the row tiles; four consecutive elements per thread.
__global__ void lora_dy_pass_finalize(const float* __restrict__ p_dh, int col_tiles, const float* __restrict__ p_db,
                                      int row_tiles, bf16* __restrict__ dh, bf16* __restrict__ db, int64_t dh_elems,
                                      int64_t db_elems, float s) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  const bool is_dh = i < dh_elems;
  const int64_t e = is_dh ? i : i - dh_elems;
  if (!is_dh && e >= db_elems) return;
  const float* p = is_dh ? p_dh : p_db;
  const int tiles = is_dh ? col_tiles : row_tiles;
  const int64_t stride = is_dh ? dh_elems : db_elems;
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < tiles; ++k) {
    const float4 v = *reinterpret_cast<const float4*>(p + k * stride + e);
    sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
  }
  bf16* out = (is_dh ? dh : db) + e;
  out[0] = __float2bfloat16(s * sum.x);
  out[1] = __float2bfloat16(s * sum.y);
  out[2] = __float2bfloat16(s * sum.z);
  out[3] = __float2bfloat16(s * sum.w);
}

// Whether the candidate takes this shape; the partial buffers' sizes in floats.
constexpr bool dy_pass_ok(int64_t m, int64_t n, int64_t r) {
  return m % kDyTile == 0 && n % kDyTile == 0 && (r == 16 || r == 32 || r == 64);
}

template <int R>
void launch_dy_pass_rank(const bf16* dy, const bf16* b, const bf16* h, float* p_dh, float* p_db, bf16* dh, bf16* db,
                         int64_t m, int64_t n, float s, cudaStream_t st) {
  constexpr size_t smem = dy_pass_smem_bytes<R>();
  static const bool attr = [] {
    return cudaFuncSetAttribute(lora_dy_pass_kernel<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) ==
           cudaSuccess;
  }();
  if (!attr) {
    fprintf(stderr, "dy pass: shared-memory attribute refused\n");
    exit(1);
  }
  lora_dy_pass_kernel<R><<<dim3(unsigned(n / kDyTile), unsigned(m / kDyTile)), 256, smem, st>>>(dy, n, b, h, p_dh,
                                                                                              p_db, m, n);
  const int64_t groups = (m + n) * R / 4;
  lora_dy_pass_finalize<<<unsigned((groups + 255) / 256), 256, 0, st>>>(p_dh, int(n / kDyTile), p_db,
                                                                      int(m / kDyTile), dh, db, m * R, n * R, s);
}

// out [m, r] = scale · x [m, k] · lᵀ (l: [r, k] contiguous). m > 0; r from lora_tensor_core_rank.
template <typename T>
void launch_lora_reduce(const T* x, int64_t ldx, const T* l, T* out, int64_t m, int64_t k, int64_t r, float scale,
                        int sms, cudaStream_t stream, int variant = 0) {
  with_tensor_core_rank(r, [&]<int R>() {
    launch_lora_reduce_rank<T, R>(x, ldx, l, out, m, k, scale, sms, stream, variant);
  });
}


// lora_expand's variants with the launch rule's grid: 0 the W' kernel's form, 1 STAGED_STORES (the op's y at ranks
// 8 and 16). A prefetch of the next step's addend was timed and dropped (ledger run
// cuda-h200-2026-12-01-lora-kernels-918b59c, variants "…, prefetch").
const char* const kExpandVariants[] = {"launched", "staged stores"};

template <ExpandAddend ADD>
void launch_expand_variant(int variant, const bf16* lm, const bf16* rt, const bf16* c, int64_t ldc, bf16* out,
                           int64_t ldo, int64_t p, int64_t q, int64_t r, float s, int sms, cudaStream_t st) {
  with_tensor_core_rank(r, [&]<int R>() {
    if (variant == 1) {
      launch_lora_expand_rank<bf16, R, ADD, true>(lm, rt, c, ldc, out, ldo, p, q, s, sms, st);
    } else {
      launch_lora_expand_rank<bf16, R, ADD>(lm, rt, c, ldc, out, ldo, p, q, s, sms, st);
    }
  });
}

static cublasHandle_t g_blas, g_blas_side;
static cudaStream_t g_side;  // the skinny products' stream (highest priority) in the pipelined routes
static int g_sms = 0;
static double g_copy_gbps = 0;

// Row-major C[m, n] = alpha · op(X) · op(Y) + beta · C: X is [m, k], or [k, m] when tx; Y is [k, n], or [n, k] when
// ty (all row-major): column-major Cᵀ = op(Y)ᵀ · op(X)ᵀ.
static void gemm(bool tx, bool ty, const bf16* x, const bf16* y, bf16* c, int64_t m, int64_t n, int64_t k,
                 float alpha, float beta, cublasHandle_t hd = g_blas) {
  CB(cublasGemmEx(hd, ty ? CUBLAS_OP_T : CUBLAS_OP_N, tx ? CUBLAS_OP_T : CUBLAS_OP_N, int(n), int(m), int(k), &alpha,
                  y, CUDA_R_16BF, int(ty ? k : n), x, CUDA_R_16BF, int(tx ? m : k), &beta, c, CUDA_R_16BF, int(n),
                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
// C = alpha · X · Yᵀ + beta · C (X [m, k], Y [n, k]).
static void gemm_nt(const bf16* x, const bf16* y, bf16* c, int64_t m, int64_t n, int64_t k, float alpha, float beta,
                    cublasHandle_t hd = g_blas) {
  gemm(false, true, x, y, c, m, n, k, alpha, beta, hd);
}
// C = alpha · X · Y + beta · C (X [m, k], Y [k, n]).
static void gemm_nn(const bf16* x, const bf16* y, bf16* c, int64_t m, int64_t n, int64_t k, float alpha, float beta,
                    cublasHandle_t hd = g_blas) {
  gemm(false, false, x, y, c, m, n, k, alpha, beta, hd);
}
// C = alpha · Xᵀ · Y (X [k, m], Y [k, n]: a reduction over the long dimension k: dA, dB).
static void gemm_tn(const bf16* x, const bf16* y, bf16* c, int64_t m, int64_t n, int64_t k, float alpha,
                    cublasHandle_t hd = g_blas) {
  gemm(true, false, x, y, c, m, n, k, alpha, 0.f, hd);
}
// Row-major transpose of a small [rows, cols] matrix (A -> Aᵀ, B -> Bᵀ), on the host: setup only.
static void transpose(const bf16* src, bf16* dst, int64_t rows, int64_t cols) {
  std::vector<bf16> hs(rows * cols), hd(rows * cols);
  CK(cudaMemcpy(hs.data(), src, hs.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) hd[j * rows + i] = hs[i * cols + j];
  CK(cudaMemcpy(dst, hd.data(), hd.size() * sizeof(bf16), cudaMemcpyHostToDevice));
}

// Worst |a - b| / max(|b|, rms(b)) over the buffer.
static double worst_diff(const bf16* a, const bf16* b, size_t n) {
  std::vector<bf16> ha(n), hb(n);
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(ha.data(), a, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hb.data(), b, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  double ss = 0;
  for (size_t i = 0; i < n; ++i) ss += double(__bfloat162float(hb[i])) * __bfloat162float(hb[i]);
  const double rms = std::sqrt(ss / double(n)) + 1e-30;
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = __bfloat162float(ha[i]), y = __bfloat162float(hb[i]);
    if (std::isnan(x) != std::isnan(y)) return INFINITY;
    worst = std::max(worst, std::fabs(x - y) / std::max(std::fabs(y), rms));
  }
  return worst;
}

static void report(const std::string& shape, const std::string& what, double bytes, float us, double base_us = 0) {
  printf("%-26s %-52s %8.1f us", shape.c_str(), what.c_str(), us);
  if (bytes > 0) printf("  %5.1f %% of copy", 100.0 * bytes / (us * 1e-6) / (g_copy_gbps * 1e9));
  if (base_us > 0) printf("  %.3fx base", us / base_us);
  printf("\n");
}

static void check(const std::string& shape, const char* what, const bf16* ours, const bf16* ref, size_t n) {
  const double d = worst_diff(ours, ref, n);
  printf("%-26s check %-46s worst diff %.2e %s\n", shape.c_str(), what, d, d < 2e-2 ? "ok" : "MISMATCH");
}

// One shape's inputs: random x, W, A, B, bias and dy, and Aᵀ, Bᵀ (the layouts the kernels take), freed at scope end.
struct Operands {
  std::string shape;
  bf16 *x, *w, *a, *b, *bias, *dy, *at, *bt;
  Operands(int64_t m, int64_t k, int64_t n, int64_t r)
      : shape(std::to_string(m) + "x" + std::to_string(k) + "->" + std::to_string(n) + " r" + std::to_string(r)),
        x(alloc_random(m * k, 1.f, 1)),
        w(alloc_random(n * k, 0.02f, 2)),
        a(alloc_random(r * k, 0.02f, 3)),
        b(alloc_random(n * r, 0.25f, 4)),
        bias(alloc_random(n, 1.f, 5)),
        dy(alloc_random(m * n, 1.f, 6)),
        at(alloc(k * r)),
        bt(alloc(r * n)) {
    transpose(a, at, r, k);
    transpose(b, bt, n, r);
  }
  ~Operands() {
    for (bf16* p : {x, w, a, b, bias, dy, at, bt}) cudaFree(p);
  }
};

static void bench_shape(int64_t m, int64_t k, int64_t n, int64_t r) {
  const Operands o(m, k, n, r);
  const std::string& shape = o.shape;
  const float s = 2.0f;
  bf16 *x = o.x, *w = o.w, *a = o.a, *b = o.b, *bias = o.bias, *dy = o.dy, *at = o.at, *bt = o.bt;
  bf16 *h = alloc(m * r), *h_ref = alloc(m * r), *y = alloc(m * n), *y_ref = alloc(m * n);
  bf16 *wm = alloc(n * k), *wm_ref = alloc(n * k), *dx = alloc(m * k), *dx_ref = alloc(m * k);
  bf16 *dh = alloc(m * r), *dh_ref = alloc(m * r), *da = alloc(r * k), *db = alloc(n * r);
  cudaStream_t st = 0;
  const double es = sizeof(bf16);

  // Checks first.
  launch_lora_reduce(x, k, a, h, m, k, r, 1.f, g_sms, st);
  gemm_nt(x, a, h_ref, m, r, k, 1.f, 0.f);
  check(shape, "h = x·Aᵀ (reduce)", h, h_ref, m * r);
  launch_lora_reduce(dy, n, bt, dh, m, n, r, s, g_sms, st);
  gemm_nn(dy, b, dh_ref, m, r, n, s, 0.f);
  check(shape, "dh = s·dy·B (reduce)", dh, dh_ref, m * r);
  launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st);
  CK(cudaMemcpy(wm_ref, w, n * k * es, cudaMemcpyDeviceToDevice));
  gemm_nn(b, a, wm_ref, n, k, r, s, 1.f);
  check(shape, "W' = W + s·B·A (expand)", wm, wm_ref, n * k);
  launch_lora_expand(h_ref, b, ExpandAddend::kRow, bias, 0, y, n, m, n, r, s, g_sms, st);
  for (int64_t i = 0; i < m; ++i) CK(cudaMemcpyAsync(y_ref + i * n, bias, n * es, cudaMemcpyDeviceToDevice));
  gemm_nt(h_ref, b, y_ref, m, n, r, s, 1.f);
  check(shape, "y = bias + s·h·Bᵀ (expand)", y, y_ref, m * n);
  launch_lora_expand(dh_ref, at, ExpandAddend::kNone, static_cast<const bf16*>(nullptr), 0, dx, k, m, k, r, 1.f, g_sms, st);
  gemm_nn(dh_ref, a, dx_ref, m, k, r, 1.f, 0.f);
  check(shape, "dx_lora = dh·A (expand)", dx, dx_ref, m * k);
  for (int v = 1; v < 2; ++v) {  // the variants, each into NaN-filled outputs (an unwritten element fails)
    const std::string tag = std::string(" (expand, ") + kExpandVariants[v] + ")";
    CK(cudaMemset(wm, 0xff, n * k * es));
    launch_expand_variant<ExpandAddend::kMatrix>(v, b, at, w, k, wm, k, n, k, r, s, g_sms, st);
    check(shape, ("W' = W + s·B·A" + tag).c_str(), wm, wm_ref, n * k);
    CK(cudaMemset(y, 0xff, m * n * es));
    launch_expand_variant<ExpandAddend::kRow>(v, h_ref, b, bias, 0, y, n, m, n, r, s, g_sms, st);
    check(shape, ("y = bias + s·h·Bᵀ" + tag).c_str(), y, y_ref, m * n);
    CK(cudaMemset(dx, 0xff, m * k * es));
    launch_expand_variant<ExpandAddend::kNone>(v, dh_ref, at, nullptr, 0, dx, k, m, k, r, 1.f, g_sms, st);
    check(shape, ("dx_lora = dh·A" + tag).c_str(), dx, dx_ref, m * k);
  }

  // Components.
  const float base = time_us([&] { gemm_nt(x, w, y, m, n, k, 1.f, 0.f); });
  report(shape, "base GEMM y = x·Wᵀ", 0, base);
  report(shape, "GEMM y += x·Wᵀ (beta 1)", 0, time_us([&] { gemm_nt(x, w, y, m, n, k, 1.f, 1.f); }), base);
  report(shape, "GEMM dx = dy·W", 0, time_us([&] { gemm_nn(dy, w, dx, m, k, n, 1.f, 0.f); }), base);
  const double h_bytes = (m * k + m * r) * es;
  report(shape, "h: cuBLAS", h_bytes, time_us([&] { gemm_nt(x, a, h_ref, m, r, k, 1.f, 0.f); }));
  for (int v = 1; v <= 3; ++v)
    report(shape, "h: reduce variant " + std::to_string(v), h_bytes,
           time_us([&] { launch_lora_reduce(x, k, a, h, m, k, r, 1.f, g_sms, st, v); }));
  report(shape, "h: reduce (launch rule)", h_bytes,
         time_us([&] { launch_lora_reduce(x, k, a, h, m, k, r, 1.f, g_sms, st); }));
  const double dh_bytes = (m * n + m * r) * es;
  report(shape, "dh: cuBLAS", dh_bytes, time_us([&] { gemm_nn(dy, b, dh_ref, m, r, n, s, 0.f); }));
  report(shape, "dh: reduce", dh_bytes, time_us([&] { launch_lora_reduce(dy, n, bt, dh, m, n, r, s, g_sms, st); }));
  const double w_bytes = 2.0 * n * k * es;
  report(shape, "W': cuBLAS (copy W, GEMM beta 1)", w_bytes, time_us([&] {
           CK(cudaMemcpyAsync(wm_ref, w, n * k * es, cudaMemcpyDeviceToDevice));
           gemm_nn(b, a, wm_ref, n, k, r, s, 1.f);
         }));
  report(shape, "W': expand", w_bytes, time_us([&] {
           launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st);
         }));
  // The launch before the one-wave grid: splits for about four blocks per SM (ceil(4·SMs / row tiles)).
  const int64_t row_tiles = lora_expand_grid(n, k, 1).row_blocks;
  const ExpandGrid before = lora_expand_grid(n, k, 4 * int64_t(g_sms) + row_tiles - 1);
  report(shape, "W': expand, grid of ~4 blocks per SM (before)", w_bytes, time_us([&] {
           with_tensor_core_rank(r, [&]<int R>() {
             lora_expand_kernel<bf16, R, kExpandWarps, ExpandAddend::kMatrix>
                 <<<dim3(unsigned(before.row_blocks), unsigned(before.splits)), kExpandWarps * 32, 0, st>>>(
                     b, at, w, k, wm, k, n, k, before.cols_per_block, s);
           });
         }));
  const double y_bytes = double(m) * n * es;
  report(shape, "y = s·h·Bᵀ: cuBLAS", y_bytes, time_us([&] { gemm_nt(h, b, y_ref, m, n, r, s, 0.f); }));
  report(shape, "y = bias + s·h·Bᵀ: expand", y_bytes, time_us([&] {
           launch_lora_expand(h, b, ExpandAddend::kRow, bias, 0, y, n, m, n, r, s, g_sms, st);
         }));
  report(shape, "dx_lora = dh·A: cuBLAS", double(m) * k * es,
         time_us([&] { gemm_nn(dh, a, dx_ref, m, k, r, 1.f, 0.f); }));
  report(shape, "dx_lora = dh·A: expand", double(m) * k * es, time_us([&] {
           launch_lora_expand(dh, at, ExpandAddend::kNone, static_cast<const bf16*>(nullptr), 0, dx, k, m, k, r, 1.f, g_sms, st);
         }));
  for (int v = 1; v < 2; ++v) {
    const std::string tag = std::string(": expand, ") + kExpandVariants[v];
    report(shape, "W'" + tag, w_bytes, time_us([&] {
             launch_expand_variant<ExpandAddend::kMatrix>(v, b, at, w, k, wm, k, n, k, r, s, g_sms, st);
           }));
    report(shape, "y = bias + s·h·Bᵀ" + tag, y_bytes, time_us([&] {
             launch_expand_variant<ExpandAddend::kRow>(v, h, b, bias, 0, y, n, m, n, r, s, g_sms, st);
           }));
    report(shape, "dx_lora = dh·A" + tag, double(m) * k * es, time_us([&] {
             launch_expand_variant<ExpandAddend::kNone>(v, dh, at, nullptr, 0, dx, k, m, k, r, 1.f, g_sms, st);
           }));
  }
  report(shape, "dA = dhᵀ·x: cuBLAS", (m * k + m * r) * es, time_us([&] { gemm_tn(dh, x, da, r, k, m, 1.f); }));
  report(shape, "dB = s·dyᵀ·h: cuBLAS", (m * n + m * r) * es, time_us([&] { gemm_tn(dy, h, db, n, r, m, s); }));
  // The dh + dB candidate (one read of dy) against cuBLAS's two products, when the shape fits its tiles.
  if (dy_pass_ok(m, n, r)) {
    float *p_dh, *p_db;
    CK(cudaMalloc(&p_dh, size_t(n / kDyTile) * m * r * sizeof(float)));
    CK(cudaMalloc(&p_db, size_t(m / kDyTile) * n * r * sizeof(float)));
    bf16 *dh2 = alloc(m * r), *db2 = alloc(n * r);
    auto dy_pass = [&] {
      if (r == 16) launch_dy_pass_rank<16>(dy, b, h_ref, p_dh, p_db, dh2, db2, m, n, s, st);
      else if (r == 32) launch_dy_pass_rank<32>(dy, b, h_ref, p_dh, p_db, dh2, db2, m, n, s, st);
      else launch_dy_pass_rank<64>(dy, b, h_ref, p_dh, p_db, dh2, db2, m, n, s, st);
    };
    gemm_nt(x, a, h_ref, m, r, k, 1.f, 0.f);
    gemm_nn(dy, b, dh_ref, m, r, n, s, 0.f);
    gemm_tn(dy, h_ref, db, n, r, m, s);
    CK(cudaMemset(dh2, 0xff, m * r * es));  // NaN everywhere: an output or a partial left unwritten fails the check
    CK(cudaMemset(db2, 0xff, n * r * es));
    CK(cudaMemset(p_dh, 0xff, size_t(n / kDyTile) * m * r * sizeof(float)));
    CK(cudaMemset(p_db, 0xff, size_t(m / kDyTile) * n * r * sizeof(float)));
    dy_pass();
    CK(cudaGetLastError());
    check(shape, "dh = s·dy·B (one pass over dy, candidate)", dh2, dh_ref, m * r);
    check(shape, "dB = s·dyᵀ·h (one pass over dy, candidate)", db2, db, n * r);
    const double both = (m * n + 2 * m * r + n * r) * es;
    report(shape, "dh + dB: cuBLAS, two reads of dy", both, time_us([&] {
             gemm_nn(dy, b, dh_ref, m, r, n, s, 0.f);
             gemm_tn(dy, h_ref, db, n, r, m, s);
           }));
    report(shape, "dh + dB: one read of dy (candidate) + finalize", both, time_us(dy_pass));
    CK(cudaFree(p_dh));
    CK(cudaFree(p_db));
    CK(cudaFree(dh2));
    CK(cudaFree(db2));
  }
  // The same four skinny products in the other orientation (the transposed result: [r, tokens] or [features, r]),
  // which cuBLAS's heuristics may serve with another kernel; each checked against the orientation above.
  {
    gemm_nt(x, a, h_ref, m, r, k, 1.f, 0.f);
    gemm_nn(dy, b, dh_ref, m, r, n, s, 0.f);
    gemm_tn(dh_ref, x, da, r, k, m, 1.f);
    gemm_tn(dy, h_ref, db, n, r, m, s);
    bf16 *t = alloc(std::max(m, std::max(n, k)) * r), *back = alloc(std::max(m, std::max(n, k)) * r);
    struct Skinny {
      const char* what;
      double bytes;
      const bf16* want;
      int64_t rows, cols;  // of the transposed result
      std::function<void()> run;
    };
    const Skinny products[] = {
        {"h: cuBLAS as hᵀ = A·xᵀ", h_bytes, h_ref, r, m,  //
         [&] { gemm(false, true, a, x, t, r, m, k, 1.f, 0.f); }},
        {"dh: cuBLAS as dhᵀ = s·Bᵀ·dyᵀ", dh_bytes, dh_ref, r, m,  //
         [&] { gemm(true, true, b, dy, t, r, m, n, s, 0.f); }},
        {"dA: cuBLAS as dAᵀ = xᵀ·dh", (m * k + m * r) * es, da, k, r,
         [&] { gemm(true, false, x, dh_ref, t, k, r, m, 1.f, 0.f); }},
        {"dB: cuBLAS as dBᵀ = s·hᵀ·dy", (m * n + m * r) * es, db, r, n,
         [&] { gemm(true, false, h_ref, dy, t, r, n, m, s, 0.f); }},
    };
    for (const Skinny& p : products) {
      p.run();
      transpose(t, back, p.rows, p.cols);
      check(shape, p.what, back, p.want, p.rows * p.cols);
      report(shape, p.what, p.bytes, time_us(p.run));
    }
    CK(cudaFree(t));
    CK(cudaFree(back));
  }

  // Compositions (bias in the low-rank routes' first write; the merged route's GEMM without bias: cuBLAS's bias
  // epilogue is what at::linear adds there).
  const float fwd_merged = time_us([&] {
    launch_lora_reduce(x, k, a, h, m, k, r, 1.f, g_sms, st);
    launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st);
    gemm_nt(x, wm, y, m, n, k, 1.f, 0.f);
  });
  report(shape, "forward merged: h, W' (ours), GEMM", 0, fwd_merged, base);
  const float fwd_acc = time_us([&] {
    launch_lora_reduce(x, k, a, h, m, k, r, 1.f, g_sms, st);
    launch_lora_expand(h, b, ExpandAddend::kRow, bias, 0, y, n, m, n, r, s, g_sms, st);
    gemm_nt(x, w, y, m, n, k, 1.f, 1.f);
  });
  report(shape, "forward accumulate: h, y (ours), GEMM beta 1", 0, fwd_acc, base);
  const float fwd_acc_blas = time_us([&] {
    gemm_nt(x, a, h, m, r, k, 1.f, 0.f);
    gemm_nt(h, b, y, m, n, r, s, 0.f);
    gemm_nt(x, w, y, m, n, k, 1.f, 1.f);
  });
  report(shape, "forward accumulate, cuBLAS (current op)", 0, fwd_acc_blas, base);
  const float base_dx = time_us([&] { gemm_nn(dy, w, dx, m, k, n, 1.f, 0.f); });
  // dA and dB stay on cuBLAS in both backward routes.
  const float bwd_merged = time_us([&] {
    launch_lora_reduce(dy, n, bt, dh, m, n, r, s, g_sms, st);
    launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st);
    gemm_nn(dy, wm, dx, m, k, n, 1.f, 0.f);
    gemm_tn(dh, x, da, r, k, m, 1.f);
    gemm_tn(dy, h, db, n, r, m, s);
  });
  report(shape, "backward merged: dh, W' (ours), dx, dA, dB", 0, bwd_merged, base_dx);
  const float bwd_low = time_us([&] {
    launch_lora_reduce(dy, n, bt, dh, m, n, r, s, g_sms, st);
    launch_lora_expand(dh, at, ExpandAddend::kNone, static_cast<const bf16*>(nullptr), 0, dx, k, m, k, r, 1.f, g_sms, st);
    gemm_nn(dy, w, dx, m, k, n, 1.f, 1.f);
    gemm_tn(dh, x, da, r, k, m, 1.f);
    gemm_tn(dy, h, db, n, r, m, s);
  });
  report(shape, "backward low-rank: dh, dx_lora (ours), dx += , dA, dB", 0, bwd_low, base_dx);
  printf("%-26s forward+backward vs base fwd + dx GEMMs (%.1f + %.1f): merged/merged %.3fx, acc/merged %.3fx, "
         "acc/low-rank %.3fx\n",
         shape.c_str(), base, base_dx, (fwd_merged + bwd_merged) / (base + base_dx),
         (fwd_acc + bwd_merged) / (base + base_dx), (fwd_acc + bwd_low) / (base + base_dx));
  // The op's routes (cuBLAS for every product but W'), as the op runs them today (accumulate forward; merged
  // backward at many tokens) and with h deferred to the backward: the merged forward needs no h (y = x·W'ᵀ), so
  // it can skip h, and the backward computes it once there (dB = s·dyᵀ·h is its only use).
  const float bwd_op = time_us([&] {
    gemm_nn(dy, b, dh, m, r, n, s, 0.f);
    launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st);
    gemm_nn(dy, wm, dx, m, k, n, 1.f, 0.f);
    gemm_tn(dh, x, da, r, k, m, 1.f);
    gemm_tn(dy, h, db, n, r, m, s);
  });
  const float fwd_no_h = time_us([&] {
    launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st);
    gemm_nt(x, wm, y, m, n, k, 1.f, 0.f);
  });
  const float bwd_with_h = time_us([&] {
    gemm_nt(x, a, h, m, r, k, 1.f, 0.f);
    gemm_nn(dy, b, dh, m, r, n, s, 0.f);
    launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st);
    gemm_nn(dy, wm, dx, m, k, n, 1.f, 0.f);
    gemm_tn(dh, x, da, r, k, m, 1.f);
    gemm_tn(dy, h, db, n, r, m, s);
  });
  report(shape, "op today: backward merged (W' ours, rest cuBLAS)", 0, bwd_op, base_dx);
  report(shape, "h deferred: forward W' (ours) + GEMM, no h", 0, fwd_no_h, base);
  report(shape, "h deferred: backward h, dh, W' (ours), dx, dA, dB", 0, bwd_with_h, base_dx);
  printf("%-26s forward+backward vs base fwd + dx GEMMs: op today %.3fx, h deferred %.3fx\n", shape.c_str(),
         (fwd_acc_blas + bwd_op) / (base + base_dx), (fwd_no_h + bwd_with_h) / (base + base_dx));
  // The op's few-token route (accumulate forward, low-rank backward, cuBLAS but for y), forward and backward timed
  // as one call, with y = bias + s·h·Bᵀ by cuBLAS and by lora_expand with staged stores (the op's y at ranks 8 and
  // 16 since 1dacda9): whether the kernel's gain survives beside the GEMMs that follow it.
  if (lora_staged_rank(r)) {
    for (bool staged : {false, true}) {
      const float both = time_us([&] {
        gemm_nt(x, a, h, m, r, k, 1.f, 0.f);
        if (staged) {
          launch_lora_expand_staged(h, b, bias, y, n, m, n, r, s, g_sms, st);
        } else {
          gemm_nt(h, b, y, m, n, r, s, 0.f);  // no bias here: the timing, not the sum, is compared
        }
        gemm_nt(x, w, y, m, n, k, 1.f, 1.f);
        gemm_nn(dy, b, dh, m, r, n, s, 0.f);
        gemm_nn(dh, a, dx, m, k, r, 1.f, 0.f);
        gemm_nn(dy, w, dx, m, k, n, 1.f, 1.f);
        gemm_tn(dh, x, da, r, k, m, 1.f);
        gemm_tn(dy, h, db, n, r, m, s);
      });
      report(shape, std::string("few-token route fwd+bwd, y by ") + (staged ? "staged expand" : "cuBLAS"), 0, both,
             base + base_dx);
    }
  }
  for (bf16* p : {h, h_ref, y, y_ref, wm, wm_ref, dx, dx_ref, dh, dh_ref, da, db})
    CK(cudaFree(p));
}

// ---- pipelined routes: the skinny products on a second, high-priority stream, a row chunk ahead of the GEMMs ----
// Forward (accumulate): side: h_i = x_i·Aᵀ, y_i = bias + s·h_i·Bᵀ; main: y_i += x_i·Wᵀ once y_i is written.
// Backward (low-rank): side: dh_i = s·dy_i·B, dx_i = dh_i·A; main: dx_i += dy_i·W; side after the last chunk:
// dA = dhᵀ·x and dB = s·dyᵀ·h, which the main stream waits for at the end. ours: our kernels on the side stream,
// else cuBLAS.
struct Events {
  std::vector<cudaEvent_t> ev;
  explicit Events(int n) : ev(n) {
    for (auto& e : ev) CK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  ~Events() {
    for (auto& e : ev) cudaEventDestroy(e);
  }
};

// For each row chunk: side(r0, rows) on the side stream, then main(r0, rows) on the default stream once its own
// side part is done; the side stream first waits for all earlier default-stream work.
template <class Side, class Main>
static void pipelined_chunks(Events& ev, int64_t m, int64_t rows, int chunks, Side&& side, Main&& main) {
  CK(cudaEventRecord(ev.ev[0], 0));
  CK(cudaStreamWaitEvent(g_side, ev.ev[0]));
  for (int i = 0; i < chunks; ++i) {
    const int64_t r0 = i * rows, mi = std::min(rows, m - r0);
    side(r0, mi);
    CK(cudaEventRecord(ev.ev[1 + i], g_side));
    CK(cudaStreamWaitEvent(0, ev.ev[1 + i]));
    main(r0, mi);
  }
}

static void bench_pipelined(int64_t m, int64_t k, int64_t n, int64_t r) {
  const Operands o(m, k, n, r);
  const std::string& shape = o.shape;
  const float s = 2.0f;
  bf16 *x = o.x, *w = o.w, *a = o.a, *b = o.b, *bias = o.bias, *dy = o.dy, *at = o.at, *bt = o.bt;
  bf16 *h = alloc(m * r), *y = alloc(m * n), *y_ref = alloc(m * n);
  bf16 *dx = alloc(m * k), *dh = alloc(m * r), *da = alloc(r * k), *db = alloc(n * r);
  Events ev(20);
  const float base = time_us([&] { gemm_nt(x, w, y, m, n, k, 1.f, 0.f); });
  const float base_dx = time_us([&] { gemm_nn(dy, w, dx, m, k, n, 1.f, 0.f); });
  report(shape, "base GEMM y = x·Wᵀ", 0, base);
  report(shape, "base GEMM dx = dy·W", 0, base_dx);
  for (int ours = 0; ours < 2; ++ours) {
    for (int chunks : {1, 2, 4, 8}) {
      if (m / chunks < 128) continue;
      const int64_t rows = (m + chunks - 1) / chunks;
      auto forward = [&] {
        pipelined_chunks(
            ev, m, rows, chunks,
            [&](int64_t r0, int64_t mi) {
              if (ours) {
                launch_lora_reduce(x + r0 * k, k, a, h + r0 * r, mi, k, r, 1.f, g_sms, g_side);
                launch_lora_expand(h + r0 * r, b, ExpandAddend::kRow, bias, 0, y + r0 * n, n, mi, n, r, s, g_sms,
                                   g_side);
              } else {
                gemm_nt(x + r0 * k, a, h + r0 * r, mi, r, k, 1.f, 0.f, g_blas_side);
                gemm_nt(h + r0 * r, b, y + r0 * n, mi, n, r, s, 0.f, g_blas_side);
              }
            },
            [&](int64_t r0, int64_t mi) { gemm_nt(x + r0 * k, w, y + r0 * n, mi, n, k, 1.f, 1.f); });
      };
      if (ours) {  // the pipelined result equals the one-stream composition
        forward();
        launch_lora_reduce(x, k, a, h, m, k, r, 1.f, g_sms, 0);
        launch_lora_expand(h, b, ExpandAddend::kRow, bias, 0, y_ref, n, m, n, r, s, g_sms, 0);
        gemm_nt(x, w, y_ref, m, n, k, 1.f, 1.f);
        check(shape, ("pipelined forward, " + std::to_string(chunks) + " chunks").c_str(), y, y_ref, m * n);
      }
      const std::string tag = std::string(ours ? "ours" : "cuBLAS") + ", " + std::to_string(chunks) + " chunks";
      report(shape, "forward pipelined (" + tag + ")", 0, time_us(forward), base);
      auto backward = [&] {
        pipelined_chunks(
            ev, m, rows, chunks,
            [&](int64_t r0, int64_t mi) {
              if (ours) {
                launch_lora_reduce(dy + r0 * n, n, bt, dh + r0 * r, mi, n, r, s, g_sms, g_side);
                launch_lora_expand(dh + r0 * r, at, ExpandAddend::kNone, static_cast<const bf16*>(nullptr), 0,
                                   dx + r0 * k, k, mi, k, r, 1.f, g_sms, g_side);
              } else {
                gemm_nn(dy + r0 * n, b, dh + r0 * r, mi, r, n, s, 0.f, g_blas_side);
                gemm_nn(dh + r0 * r, a, dx + r0 * k, mi, k, r, 1.f, 0.f, g_blas_side);
              }
            },
            [&](int64_t r0, int64_t mi) { gemm_nn(dy + r0 * n, w, dx + r0 * k, mi, k, n, 1.f, 1.f); });
        gemm_tn(dh, x, da, r, k, m, 1.f, g_blas_side);
        gemm_tn(dy, h, db, n, r, m, s, g_blas_side);
        CK(cudaEventRecord(ev.ev[19], g_side));
        CK(cudaStreamWaitEvent(0, ev.ev[19]));
      };
      const float bwd = time_us(backward);
      report(shape, "backward pipelined (" + tag + ")", 0, bwd, base_dx);
    }
  }
  for (bf16* p : {h, y, y_ref, dx, dh, da, db}) CK(cudaFree(p));
}

// The order of the backward's products (the L2 question): a product that reads the operand the one before it read
// finds that operand's tail still in the L2 (50 MB), so dh then dB (both over dy) or h then dA (both over x) might
// save a part of a pass; a product after the dx GEMM starts with the GEMM's dirty dx lines in the L2. Forward and
// backward timed as one call (the forward of the op's route first, as the suite times them), every product on
// cuBLAS but W' (the op's kernels). Only the order differs; each composition's results equal the others'.
static void bench_orders(int64_t m, int64_t k, int64_t n, int64_t r) {
  const Operands o(m, k, n, r);
  const std::string& shape = o.shape;
  const float s = 2.0f;
  bf16 *x = o.x, *w = o.w, *a = o.a, *b = o.b, *dy = o.dy, *at = o.at;
  bf16 *h = alloc(m * r), *y = alloc(m * n), *wm = alloc(n * k), *dx = alloc(m * k), *dh = alloc(m * r);
  bf16 *da = alloc(r * k), *db = alloc(n * r);
  cudaStream_t st = 0;
  const bool merged = m > k;  // the op's rule for many tokens (half precision): merged forward without h
  auto forward = [&] {
    if (merged) {
      launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st);
      gemm_nt(x, wm, y, m, n, k, 1.f, 0.f);
    } else {
      gemm_nt(x, a, h, m, r, k, 1.f, 0.f);
      gemm_nt(h, b, y, m, n, r, s, 0.f);
      gemm_nt(x, w, y, m, n, k, 1.f, 1.f);
    }
  };
  std::map<char, std::function<void()>> step = {
      {'h', [&] { gemm_nt(x, a, h, m, r, k, 1.f, 0.f); }},
      {'d', [&] { gemm_nn(dy, b, dh, m, r, n, s, 0.f); }},
      {'A', [&] { gemm_tn(dh, x, da, r, k, m, 1.f); }},
      {'B', [&] { gemm_tn(dy, h, db, n, r, m, s); }},
      {'W', [&] { launch_lora_expand(b, at, ExpandAddend::kMatrix, w, k, wm, k, n, k, r, s, g_sms, st); }},
      {'X', [&] { gemm_nn(dy, wm, dx, m, k, n, 1.f, 0.f); }},  // dx = dy·W'
      {'L', [&] { gemm_nn(dh, a, dx, m, k, r, 1.f, 0.f); }},   // dx = dh·A, then
      {'G', [&] { gemm_nn(dy, w, dx, m, k, n, 1.f, 1.f); }},   // dx += dy·W
  };
  // h: x·Aᵀ, d: dh = s·dy·B, A: dA = dhᵀ·x, B: dB = s·dyᵀ·h, W: W', X: dx = dy·W', L + G: the low-rank dx.
  const std::vector<std::string> orders =
      merged ? std::vector<std::string>{"dWXAhB", "hdBAWX", "dhABWX", "hdWXBA", "dhAWXB", "hdBWXA"}
             : std::vector<std::string>{"dLGAB", "dBALG", "dBLGA", "dLGBA", "dALGB"};
  const std::string today = merged ? "dWXAhB" : "dLGAB";
  // W' kept from the forward (one weight's memory more), for scale only.
  std::vector<std::string> timed = orders;
  if (merged) timed.push_back("hdBAX");
  // The GPU drifts over a run (a first run of this in one sequence timed the later orders slower, monotonically at
  // one shape), so every round times the base pair (x·Wᵀ then dy·W as one call) and then each order, in an order
  // rotated from round to round; each order's ratio is to its round's base, and the median over rounds is reported.
  constexpr int kRounds = 5;
  std::map<std::string, std::vector<float>> ratio, fwd_bwd;
  std::vector<float> bases;
  for (int round = 0; round < kRounds; ++round) {
    const float pair = time_us([&] {
      gemm_nt(x, w, y, m, n, k, 1.f, 0.f);
      gemm_nn(dy, w, dx, m, k, n, 1.f, 0.f);
    });
    bases.push_back(pair);
    for (size_t i = 0; i < timed.size(); ++i) {
      const std::string& ord = timed[(i + round) % timed.size()];
      const float t = time_us([&] {
        forward();
        for (char c : ord) step.at(c)();
      });
      ratio[ord].push_back(t / pair);
      fwd_bwd[ord].push_back(t);
    }
  }
  auto median = [](std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  auto spread = [](std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v.back() - v.front();
  };
  printf("%-26s base x·Wᵀ + dy·W as one call: median %.1f us over %d rounds (range %.1f)\n", shape.c_str(),
         median(bases), kRounds, spread(bases));
  for (const std::string& ord : timed) {
    printf("%-26s order %-8s%s fwd+bwd %7.1f us (range %5.1f)  %.3fx the round's base pair\n", shape.c_str(),
           ord.c_str(), ord == today ? " (op)" : (ord == "hdBAX" ? " (W' kept)" : "     "), median(fwd_bwd[ord]),
           spread(fwd_bwd[ord]), median(ratio[ord]));
  }
  for (bf16* p : {h, y, wm, dx, dh, da, db}) CK(cudaFree(p));
}

int main(int argc, char** argv) {
  if (argc > 1) bench_reps = atoi(argv[1]);
  CB(cublasCreate(&g_blas));
  CB(cublasCreate(&g_blas_side));
  int least = 0, greatest = 0;
  CK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CK(cudaStreamCreateWithPriority(&g_side, cudaStreamNonBlocking, greatest));
  CB(cublasSetStream(g_blas_side, g_side));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  g_copy_gbps = copy_bandwidth_gbps();
  printf("%s, %d SMs, copy bandwidth %.0f GB/s\n", prop.name, g_sms, g_copy_gbps);
  if (argc > 2 && std::string(argv[2]) == "ncu") {  // for Nsight Compute: the first launches are the checks'
    bench_reps = 1;
    bench_shape(8192, 4096, 4096, 16);
    return 0;
  }
  if (argc > 2 && std::string(argv[2]) == "orders") {
    for (int64_t r : {16, 64}) {
      bench_orders(8192, 4096, 4096, r);
      bench_orders(2048, 4096, 11008, r);
    }
    return 0;
  }
  if (argc > 2 && std::string(argv[2]) == "pipelined") {
    for (int64_t r : {16, 64}) {
      bench_pipelined(8192, 4096, 4096, r);
      bench_pipelined(2048, 4096, 11008, r);
    }
    bench_pipelined(512, 512, 512, 8);
    return 0;
  }
  // Edge shapes for the checks only matter for correctness: ragged rows/columns and every rank.
  for (int64_t r : {8, 16, 32, 64}) bench_shape(1000, 1048, 1016, r);
  for (int64_t r : {16, 64}) {
    bench_shape(8192, 4096, 4096, r);
    bench_shape(2048, 4096, 11008, r);
  }
  bench_shape(512, 512, 512, 8);
  bench_shape(512, 512, 512, 32);  // the dy-pass candidate's rank 32 (its other shapes run ranks 16 and 64)
  return 0;
}
