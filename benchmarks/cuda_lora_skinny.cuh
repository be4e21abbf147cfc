// A candidate for LoRA's skinny products over a tall operand, on tensor cores — measured slower than cuBLAS, so the
// op (csrc/cuda/lora_linear.cu) does not use it; kept here with the benchmark that measured it
// (cuda_lora_kernels_bench.cu) for whoever tries the next design. The products: the row product out[M, R] = s·X·L
// (h = x·Aᵀ, dh = s·dy·B) and the column product out = s·Xᵀ·H (dA = dhᵀ·x as [R, K], dB = s·dyᵀ·h as [N, R]).
// Each reads its tall operand X (tokens x features, 16-64 MiB at 8192 tokens) once against a rank-sized one, r
// multiply-adds per element of X: bandwidth-bound. cuBLAS runs these at 53-59 % of copy bandwidth on an H200 in the
// benchmark's timed loop (bf16 8192x4096 r16: 27-30 µs each), four of them in every backward.
//
// Both kernels stream X through shared memory in chunks (cp.async, STAGES deep: STAGES - 1 chunks in flight while
// one is multiplied), with the chunk's slice of the rank-sized operand beside it, and multiply on mma.sync
// m16n8k16 (float32 accumulation) from ldmatrix fragments. Rows padded by 16 bytes, so the eight row addresses of
// an ldmatrix phase fall on distinct bank groups.
//   lora_rows: a block owns 16·MT rows of X and walks their columns (all of them, or one split of them: then float32
//     partial sums per split, summed by lora_skinny_finalize in a fixed order); warp w takes m-tile w % MT and the
//     k-steps ≡ w / MT (mod 8 / MT) of each CHUNK-column chunk; the k-groups meet in shared memory at the end.
//   lora_cols: a block owns a strip of 128·WARP_MT columns of X (16·WARP_MT per warp) and walks its rows (all, or
//     one split), X's fragments transposed by ldmatrix.trans.
// Measured (H200, bf16, benchmarks/results/cuda-h200-2026-12-01-lora-kernels-{50379cd,03bc8d9,f2df319}.txt; every
// variant checked against cuBLAS into NaN-filled outputs, all within 8e-3): at 8192x4096 r16 in the first run h
// 33.2-35.4 µs against cuBLAS's 27.7, dh 35.3-37.4 against 29.2, dA 34.7-36.1 against 30.3, dB 34.4-35.7 against
// 29.4; r64 h 42.1 against 28.9. Neither 8 stages, a rotated walk (each block starting at another chunk),
// 256/512-column chunks nor 256/512-column strips closed the gap: the best h 30.9 (cuBLAS 26.8), dB 33.5 (cuBLAS
// 30.2), r64 h 37.2 (cuBLAS 28.2), 2048-token dB 24.0 (cuBLAS 20.9).
// Nsight Compute (cuda-h200-2026-12-01-ncu-skinny-03bc8d9.txt) read the r16 h kernel's launch at 24.0 µs, 2.90 TB/s
// (60 % of DRAM peak), 25 % occupancy (shared memory: 2 blocks of 8 warps per SM), issue slots 46 % busy (the
// cp.async address arithmetic, 4-5 copies per thread per chunk): the same launch takes ~10 µs longer in the
// benchmark's timed loop, after the 512 MB memset that leaves the L2 dirty. cuBLAS's h under Nsight Compute: 20.2 µs
// (72 %; a warp-specialized kernel fed by the bulk-copy engine), ...-ncu-cublas-skinny-fb330d8.txt.
// Preconditions: T __nv_bfloat16 or __half; R 16, 32 or 64; X's rows 16-byte aligned with a row stride that is a
// multiple of 8 elements, its width (K or C) a multiple of 8; L and H contiguous, 16-byte aligned; out 4-byte
// aligned; no aliasing between out / partial and the inputs.
#pragma once

#include <atomic>
#include <cstdint>

#include "cp_async.cuh"
#include "lora_kernels.cuh"

namespace tmf::cuda {

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

constexpr int kSkinnyStages = 4, kSkinnyThreads = 256;
constexpr int kRowsChunk = 128, kRowsMT = 4;      // lora_rows: X columns per chunk (8 k-steps), m-tiles per block
constexpr int kColsChunk = 64, kColsStrip = 128;  // lora_cols: X rows per chunk (4 k-steps), columns per block

template <int R, int MT, bool L_KMAJOR, int CHUNK = kRowsChunk>
struct RowsLayout {
  static constexpr int TM = 16 * MT;
  static constexpr int XP = CHUNK + 8;  // X's pitch, elements
  static constexpr int LROWS = L_KMAJOR ? CHUNK : R, LP = L_KMAJOR ? R + 8 : CHUNK + 8;
  static constexpr int STAGE = TM * XP + LROWS * LP;  // elements
  static constexpr int SMEM = kSkinnyStages * STAGE * 2;
  static constexpr int smem(int stages) { return stages * STAGE * 2; }
};

template <int R, int STRIP = kColsStrip>
struct ColsLayout {
  static constexpr int XP = STRIP + 8, HP = R + 8;
  static constexpr int STAGE = kColsChunk * XP + kColsChunk * HP;
  static constexpr int SMEM = kSkinnyStages * STAGE * 2;
  static constexpr int smem(int stages) { return stages * STAGE * 2; }
};

// The chunk loop both kernels share: the first kSkinnyStages - 1 chunks issued, then per chunk: wait for it, one
// barrier (every warp is past the previous chunk, whose stage the next load overwrites), issue the chunk
// kSkinnyStages - 1 ahead, multiply. Every iteration commits a group (empty past the end) so the wait count holds.
// ROTATE: block b walks its chunks starting at chunk b mod count (wrapping), so that the blocks in flight at once
// spread over the whole walked range instead of all reading the same columns (a candidate: benchmark variant).
template <int STAGES, bool ROTATE, typename Load, typename Compute>
__device__ __forceinline__ void skinny_pipeline(int64_t c_begin, int64_t c_end, Load&& load, Compute&& compute) {
  const int64_t count = c_end - c_begin, rot = ROTATE ? int64_t(blockIdx.x) % count : 0;
  auto chunk = [&](int64_t i) { return c_begin + (i + rot < count ? i + rot : i + rot - count); };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < count) load(chunk(s), s);
    cp_async_commit();
  }
  for (int64_t i = 0; i < count; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (i + STAGES - 1 < count) load(chunk(i + STAGES - 1), int((i + STAGES - 1) % STAGES));
    cp_async_commit();
    compute(int(i % STAGES));
  }
  cp_async_wait<0>();
}

// out[M, R] = scale · X[M, K] · L, L [R, K] (L_KMAJOR false: A for h) or [K, R] (true: B for dh). With `partial`
// the block writes float32 sums of its column split to partial[split][M][R] instead.
template <typename T, int R, int MT, bool L_KMAJOR, int STAGES = kSkinnyStages, bool ROTATE = false,
          int CHUNK = kRowsChunk>
__global__ void __launch_bounds__(kSkinnyThreads)
    lora_rows_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ l, T* __restrict__ out,
                     float* __restrict__ partial, int64_t m, int64_t k, int64_t chunks_per_split, float scale) {
  using Lay = RowsLayout<R, MT, L_KMAJOR, CHUNK>;
  constexpr int NT = R / 8, KG = 8 / MT, KSTEPS = CHUNK / 16;
  static_assert(R % 16 == 0 && MT * KG == 8 && KSTEPS % KG == 0, "lora_rows: 8 warps over the m-tiles");
  extern __shared__ __align__(16) unsigned char skinny_smem[];
  T* smem = reinterpret_cast<T*>(skinny_smem);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, mt = warp % MT, kg = warp / MT;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = int64_t(blockIdx.x) * Lay::TM;
  const int64_t chunks = (k + CHUNK - 1) / CHUNK;
  const int64_t c_begin = int64_t(blockIdx.y) * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < chunks ? c_begin + chunks_per_split : chunks;

  auto load = [&](int64_t c, int stage) {
    T* sx = smem + stage * Lay::STAGE;
    T* sl = sx + Lay::TM * Lay::XP;
    const int64_t k0 = c * CHUNK;
    for (int i = tid; i < Lay::TM * (CHUNK / 8); i += kSkinnyThreads) {
      const int row = i / (CHUNK / 8), v = i % (CHUNK / 8);
      const int64_t gr = row0 + row, gk = k0 + 8 * v;
      const bool ok = gr < m && gk < k;
      cp_async16_or_zero(sx + row * Lay::XP + 8 * v, x + (ok ? gr * ldx + gk : 0), ok);
    }
    if constexpr (L_KMAJOR) {
      for (int i = tid; i < CHUNK * (R / 8); i += kSkinnyThreads) {
        const int row = i / (R / 8), v = i % (R / 8);
        const int64_t gk = k0 + row;
        const bool ok = gk < k;
        cp_async16_or_zero(sl + row * Lay::LP + 8 * v, l + (ok ? gk * R + 8 * v : 0), ok);
      }
    } else {
      for (int i = tid; i < R * (CHUNK / 8); i += kSkinnyThreads) {
        const int row = i / (CHUNK / 8), v = i % (CHUNK / 8);
        const int64_t gk = k0 + 8 * v;
        const bool ok = gk < k;
        cp_async16_or_zero(sl + row * Lay::LP + 8 * v, l + (ok ? row * k + gk : 0), ok);
      }
    }
  };

  float acc[NT][4] = {};
  skinny_pipeline<STAGES, ROTATE>(c_begin, c_end, load, [&](int stage) {
    const T* sx = smem + stage * Lay::STAGE;
    const T* sl = sx + Lay::TM * Lay::XP;
#pragma unroll
    for (int step = 0; step < KSTEPS / KG; ++step) {
      const int ks = step * KG + kg;
      uint32_t a[4];
      ldsm_x4(a, sx + (16 * mt + lane % 16) * Lay::XP + 16 * ks + 8 * (lane / 16));
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {  // n-tiles 2j and 2j + 1
        uint32_t b[4];
        if constexpr (L_KMAJOR) {
          ldsm_x4_trans(b, sl + (16 * ks + lane % 16) * Lay::LP + 16 * j + 8 * (lane / 16));
        } else {
          ldsm_x4(b, sl + (16 * j + lane % 8 + 8 * (lane / 16)) * Lay::LP + 16 * ks + 8 * ((lane / 8) % 2));
        }
        mma_16816<T>(acc[2 * j], a[0], a[1], a[2], a[3], b[0], b[1]);
        mma_16816<T>(acc[2 * j + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
      }
    }
  });

  if constexpr (KG > 1) {  // the k-groups' sums meet in shared memory, in a fixed order
    float* red = reinterpret_cast<float*>(skinny_smem);  // [KG - 1][MT][NT·4][32], lane fastest
    __syncthreads();
    if (kg > 0) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) red[(((kg - 1) * MT + mt) * NT * 4 + j * 4 + q) * 32 + lane] = acc[j][q];
    }
    __syncthreads();
    if (kg > 0) return;
#pragma unroll
    for (int o = 0; o < KG - 1; ++o)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] += red[((o * MT + mt) * NT * 4 + j * 4 + q) * 32 + lane];
  }
  // acc[j][q]: row g + 8·(q / 2) of the warp's m-tile, column 8j + 2t + q % 2.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + 16 * mt + g + 8 * half;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int col = 8 * j + 2 * t;
      const float v0 = acc[j][2 * half], v1 = acc[j][2 * half + 1];
      if (partial != nullptr) {
        *reinterpret_cast<float2*>(partial + (int64_t(blockIdx.y) * m + row) * R + col) = make_float2(v0, v1);
      } else {
        *reinterpret_cast<uint32_t*>(out + row * R + col) = pack2<T>(scale * v0, scale * v1);
      }
    }
  }
}

// out = scale · Xᵀ · H, X [M, C], H [M, R]: out [C, R] (OUT_RC false: dB) or [R, C] (true: dA). With `partial`
// the block writes float32 sums of its row split to partial[split][C][R] instead.
template <typename T, int R, bool OUT_RC, int STAGES = kSkinnyStages, bool ROTATE = false, int WARP_MT = 1>
__global__ void __launch_bounds__(kSkinnyThreads)
    lora_cols_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ hm, T* __restrict__ out,
                     float* __restrict__ partial, int64_t m, int64_t c, int64_t chunks_per_split, float scale) {
  constexpr int STRIP = 16 * WARP_MT * (kSkinnyThreads / 32);  // WARP_MT 16-column m-tiles per warp
  using Lay = ColsLayout<R, STRIP>;
  constexpr int NT = R / 8;
  static_assert(R % 16 == 0, "lora_cols: ranks in 16-wide pairs of n-tiles");
  extern __shared__ __align__(16) unsigned char skinny_smem[];
  T* smem = reinterpret_cast<T*>(skinny_smem);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t col0 = int64_t(blockIdx.x) * STRIP;
  const int64_t chunks = (m + kColsChunk - 1) / kColsChunk;
  const int64_t c_begin = int64_t(blockIdx.y) * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < chunks ? c_begin + chunks_per_split : chunks;

  auto load = [&](int64_t ch, int stage) {
    T* sx = smem + stage * Lay::STAGE;
    T* sh = sx + kColsChunk * Lay::XP;
    const int64_t r0 = ch * kColsChunk;
    for (int i = tid; i < kColsChunk * (STRIP / 8); i += kSkinnyThreads) {
      const int row = i / (STRIP / 8), v = i % (STRIP / 8);
      const int64_t gr = r0 + row, gc = col0 + 8 * v;
      const bool ok = gr < m && gc < c;
      cp_async16_or_zero(sx + row * Lay::XP + 8 * v, x + (ok ? gr * ldx + gc : 0), ok);
    }
    for (int i = tid; i < kColsChunk * (R / 8); i += kSkinnyThreads) {
      const int row = i / (R / 8), v = i % (R / 8);
      const int64_t gr = r0 + row;
      const bool ok = gr < m;
      cp_async16_or_zero(sh + row * Lay::HP + 8 * v, hm + (ok ? gr * R + 8 * v : 0), ok);
    }
  };

  float acc[WARP_MT][NT][4] = {};
  skinny_pipeline<STAGES, ROTATE>(c_begin, c_end, load, [&](int stage) {
    const T* sx = smem + stage * Lay::STAGE;
    const T* sh = sx + kColsChunk * Lay::XP;
#pragma unroll
    for (int kk = 0; kk < kColsChunk / 16; ++kk) {
      uint32_t b[NT / 2][4];
#pragma unroll
      for (int j = 0; j < NT / 2; ++j)
        ldsm_x4_trans(b[j], sh + (16 * kk + lane % 16) * Lay::HP + 16 * j + 8 * (lane / 16));
#pragma unroll
      for (int mi = 0; mi < WARP_MT; ++mi) {
        uint32_t a[4];  // Xᵀ's 16x16 tile: 16 columns of X as rows, X's rows 16·kk.. as k
        ldsm_x4_trans(a, sx + (16 * kk + lane % 8 + 8 * (lane / 16)) * Lay::XP + 16 * (warp * WARP_MT + mi) +
                             8 * ((lane / 8) % 2));
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
          mma_16816<T>(acc[mi][2 * j], a[0], a[1], a[2], a[3], b[j][0], b[j][1]);
          mma_16816<T>(acc[mi][2 * j + 1], a[0], a[1], a[2], a[3], b[j][2], b[j][3]);
        }
      }
    }
  });
  // acc[mi][j][q]: column col0 + 16·(warp·WARP_MT + mi) + g + 8·(q / 2) of X, rank index 8j + 2t + q % 2.
#pragma unroll
  for (int mi = 0; mi < WARP_MT; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t col = col0 + 16 * (warp * WARP_MT + mi) + g + 8 * half;
      if (col >= c) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int r = 8 * j + 2 * t;
        const float v0 = acc[mi][j][2 * half], v1 = acc[mi][j][2 * half + 1];
        if (partial != nullptr) {
          *reinterpret_cast<float2*>(partial + (int64_t(blockIdx.y) * c + col) * R + r) = make_float2(v0, v1);
        } else if constexpr (OUT_RC) {
          const uint32_t p = pack2<T>(scale * v0, scale * v1);
          out[r * c + col] = reinterpret_cast<const T*>(&p)[0];
          out[(r + 1) * c + col] = reinterpret_cast<const T*>(&p)[1];
        } else {
          *reinterpret_cast<uint32_t*>(out + col * R + r) = pack2<T>(scale * v0, scale * v1);
        }
      }
    }
  }
}

// out = scale · Σ_s partial[s] over `splits` float32 [rows, R] partials, into [rows, R] (or [R, rows] when
// transposed), summed in split order. Two consecutive elements per thread.
template <typename T>
__global__ void lora_skinny_finalize(const float* __restrict__ partial, int64_t splits, int64_t rows, int64_t r,
                                     T* __restrict__ out, bool transposed, float scale) {
  const int64_t e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 2, elems = rows * r;
  if (e >= elems) return;
  float2 sum = make_float2(0.f, 0.f);
  for (int64_t s = 0; s < splits; ++s) {
    const float2 v = *reinterpret_cast<const float2*>(partial + s * elems + e);
    sum.x += v.x;
    sum.y += v.y;
  }
  const uint32_t p = pack2<T>(scale * sum.x, scale * sum.y);
  if (!transposed) {
    *reinterpret_cast<uint32_t*>(out + e) = p;
  } else {
    const int64_t row = e / r, col = e % r;
    out[col * rows + row] = reinterpret_cast<const T*>(&p)[0];
    out[(col + 1) * rows + row] = reinterpret_cast<const T*>(&p)[1];
  }
}

// ---- host side -------------------------------------------------------------------------------------------------
constexpr bool lora_skinny_rank(int64_t r) { return r == 16 || r == 32 || r == 64; }

// Resident blocks per SM of a kernel with SMEM bytes of dynamic shared memory, on the current device (the
// shared-memory attribute set on first use), cached per kernel, size and device ordinal. 0 when the device refuses
// the attribute.
template <auto Kernel, int SMEM>
int skinny_blocks_per_sm() {
  constexpr int smem = SMEM;
  constexpr int kDevices = 64;
  static std::atomic<int> cached[kDevices];  // 0: not asked yet, -1: refused
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) {
    (void)cudaGetLastError();
    return 0;
  }
  if (const int n = cached[device].load(std::memory_order_relaxed); n != 0) return n > 0 ? n : 0;
  int n = 0;
  if (cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kSkinnyThreads, smem) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 0;
  }
  cached[device].store(n > 0 ? n : -1, std::memory_order_relaxed);
  return n;
}

// A launch of either kernel: tiles (row blocks or column strips) x splits of the walked dimension's chunks, and the
// float32 partial buffer it needs (0 floats: no split, the kernel writes out itself).
struct SkinnyPlan {
  int64_t tiles = 0, splits = 1, chunks_per_split = 0, partial_floats = 0;
  int blocks_per_sm = 0, smem = 0;
  bool ok() const { return blocks_per_sm > 0; }
};

// Enough blocks for one wave of `resident` blocks: the walked dimension split when the tiles alone do not fill it.
inline SkinnyPlan skinny_plan(int64_t tiles, int64_t chunks, int64_t out_elems, int64_t resident, int blocks_per_sm,
                              int smem) {
  SkinnyPlan plan;
  if (tiles <= 0 || chunks <= 0) return plan;  // an empty operand: not ok(), nothing to launch
  plan.tiles = tiles;
  plan.blocks_per_sm = blocks_per_sm;
  plan.smem = smem;
  int64_t splits = resident / tiles;
  splits = splits < 1 ? 1 : (splits > chunks ? chunks : splits);
  plan.chunks_per_split = (chunks + splits - 1) / splits;
  plan.splits = (chunks + plan.chunks_per_split - 1) / plan.chunks_per_split;
  plan.partial_floats = plan.splits > 1 ? plan.splits * out_elems : 0;
  return plan;
}

// One of a kernel's two instantiations (by `flag`) on the plan's grid.
template <typename... Args>
void launch_planned(const SkinnyPlan& plan, bool flag, void (*if_true)(Args...), void (*if_false)(Args...),
                    cudaStream_t stream, Args... args) {
  const dim3 grid(unsigned(plan.tiles), unsigned(plan.splits));
  (flag ? if_true : if_false)<<<grid, kSkinnyThreads, plan.smem, stream>>>(args...);
}

// The split launches' second kernel: out from their float32 partials (none when the plan has one split).
template <typename T>
void finalize_splits(const SkinnyPlan& plan, const float* partial, int64_t rows, int r, T* out, bool transposed,
                     float scale, cudaStream_t stream) {
  if (partial == nullptr) return;
  const int64_t pairs = rows * r / 2;
  lora_skinny_finalize<T><<<unsigned((pairs + 255) / 256), 256, 0, stream>>>(partial, plan.splits, rows, r, out,
                                                                             transposed, scale);
}

// The plan of out[m, r] = scale · x[m, k] · L. `waves` scales the resident blocks the grid aims at (0: no split,
// one block per tile); only the benchmark's variants change it.
template <typename T>
SkinnyPlan lora_rows_plan(int64_t m, int64_t k, int64_t r, bool l_kmajor, int sms, int waves = 1) {
  SkinnyPlan plan;
  with_tensor_core_rank(r, [&]<int R>() {
    if constexpr (R % 16 == 0) {
      constexpr int smem = RowsLayout<R, kRowsMT, false>::SMEM > RowsLayout<R, kRowsMT, true>::SMEM
                               ? RowsLayout<R, kRowsMT, false>::SMEM
                               : RowsLayout<R, kRowsMT, true>::SMEM;
      const int per_sm = l_kmajor ? skinny_blocks_per_sm<lora_rows_kernel<T, R, kRowsMT, true>, smem>()
                                  : skinny_blocks_per_sm<lora_rows_kernel<T, R, kRowsMT, false>, smem>();
      plan = skinny_plan((m + 16 * kRowsMT - 1) / (16 * kRowsMT), (k + kRowsChunk - 1) / kRowsChunk, m * R,
                         waves > 0 ? int64_t(per_sm) * sms * waves : 1, per_sm, smem);
    }
  });
  return plan;
}

// out[m, r] = scale · x[m, k] · L (L [r, k], or [k, r] when l_kmajor), by `plan` (from lora_rows_plan with the same
// arguments); partial: plan.partial_floats floats of scratch when that is not 0.
template <typename T>
void launch_lora_rows(const SkinnyPlan& plan, const T* x, int64_t ldx, const T* l, bool l_kmajor, T* out,
                      float* partial, int64_t m, int64_t k, int64_t r, float scale, cudaStream_t stream) {
  with_tensor_core_rank(r, [&]<int R>() {
    if constexpr (R % 16 == 0) {
      float* p = plan.partial_floats > 0 ? partial : nullptr;
      launch_planned(plan, l_kmajor, lora_rows_kernel<T, R, kRowsMT, true>, lora_rows_kernel<T, R, kRowsMT, false>,
                     stream, x, ldx, l, out, p, m, k, plan.chunks_per_split, scale);
      finalize_splits(plan, p, m, R, out, false, scale, stream);
    }
  });
}

// The plan of out = scale · xᵀ · h over x [m, c], h [m, r]; `waves` as for lora_rows_plan.
template <typename T>
SkinnyPlan lora_cols_plan(int64_t m, int64_t c, int64_t r, int sms, int waves = 1) {
  SkinnyPlan plan;
  with_tensor_core_rank(r, [&]<int R>() {
    if constexpr (R % 16 == 0) {
      constexpr int smem = ColsLayout<R>::SMEM;
      // Both output layouts share the layout and registers: one count serves both.
      const int per_sm = skinny_blocks_per_sm<lora_cols_kernel<T, R, false>, smem>();
      (void)skinny_blocks_per_sm<lora_cols_kernel<T, R, true>, smem>();  // its shared-memory attribute
      plan = skinny_plan((c + kColsStrip - 1) / kColsStrip, (m + kColsChunk - 1) / kColsChunk, c * R,
                         waves > 0 ? int64_t(per_sm) * sms * waves : 1, per_sm, smem);
    }
  });
  return plan;
}

// out = scale · xᵀ · h: [c, r] (dB), or [r, c] when out_rc (dA).
template <typename T>
void launch_lora_cols(const SkinnyPlan& plan, const T* x, int64_t ldx, const T* hm, bool out_rc, T* out,
                      float* partial, int64_t m, int64_t c, int64_t r, float scale, cudaStream_t stream) {
  with_tensor_core_rank(r, [&]<int R>() {
    if constexpr (R % 16 == 0) {
      float* p = plan.partial_floats > 0 ? partial : nullptr;
      launch_planned(plan, out_rc, lora_cols_kernel<T, R, true>, lora_cols_kernel<T, R, false>, stream, x, ldx, hm,
                     out, p, m, c, plan.chunks_per_split, scale);
      finalize_splits(plan, p, c, R, out, out_rc, scale, stream);
    }
  });
}

}  // namespace tmf::cuda
