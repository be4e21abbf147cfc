// LoRA's merged weight W' = W + s·B·A on tensor cores (mma.sync m16n8k16, float32 accumulation), for the
// half-precision CUDA op over many tokens (csrc/cuda/lora_linear.cu: the merged forward and backward). A K = r
// product (r: 8–64) is bandwidth-bound — r multiply-adds per weight read and written — so the kernel streams W once
// with 16-byte loads and stores and keeps the rank-sized operands in registers and L1, where cuBLAS needs a copy of W
// and then a GEMM with beta = 1, i.e. W moved twice (ledger: lora, kernel, H200, bfloat16 8192x4096x4096x16 and x64,
// variants "W': expand" against "W': cuBLAS (copy W, GEMM beta 1)").
//
//   lora_expand: out[P, Q] = C + scale · Lm[P, R] · Rtᵀ, Rt [Q, R] row-major, C none / a row vector / a matrix.
//   The op uses C = W (Lm = B, Rt = Aᵀ), and with few tokens at ranks 8 and 16 C = bias, Lm = h, Rt = B for
//   y = bias + s·h·Bᵀ (STAGED_STORES). The benchmark (benchmarks/cuda_lora_kernels_bench.cu) also times dh·A with
//   it, and a reduce kernel for h = x·Aᵀ and dh = s·dy·B — slower than cuBLAS there, so the op leaves those to
//   cuBLAS.
//
// The output columns are permuted inside each 32-column group (n-slot 2t+i of n-tile j is column 8t + 2j + i, lane
// (g, t) = (lane / 4, lane % 4)), so each lane's accumulators are 8 consecutive columns of rows g and g+8: C is read
// and out written as whole 16-byte vectors. The rank index is visited in 16-wide k-steps, lane (g, t) taking k
// 4t..4t+3 of each in both operands (the order of a reduction index is free as long as both operands share it).
//
// Preconditions (checked by the host: lora_linear.cu): T is __nv_bfloat16 or __half; R is 8, 16, 32 or 64; C/out
// rows 16-byte aligned with row strides a multiple of 8 elements; Lm and Rt contiguous and 16-byte aligned (8 would
// do: their loads are 8 bytes); Q a multiple of 8; P, Q > 0; out aliases none of C, Lm, Rt (read through the
// read-only path); every pointer on the current device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace tmf::cuda {

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// 16 bytes from global memory through the read-only path, or zeros where the vector lies outside the operand.
__device__ __forceinline__ uint4 load16_or_zero(const void* p, bool valid) {
  return valid ? __ldg(static_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  uint32_t v;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    *reinterpret_cast<__nv_bfloat162*>(&v) = __floats2bfloat162_rn(a, b);
  } else {
    *reinterpret_cast<__half2*>(&v) = __floats2half2_rn(a, b);
  }
  return v;
}

// ---- lora_expand ------------------------------------------------------------------------------------------------
// A block has WARPS warps, one 16-row tile each, all walking the block's column range in steps of 64 columns (two
// 32-column groups), so the Rt fragments of a step are read once from L2 and then hit L1. Lm's fragments of the
// warp's rows stay in registers. The rank dimension is visited in 16-wide k-steps, lane (g, t) taking k 4t..4t+3 of
// each (8-byte loads; ranks under 16 load zeros past R).
enum class ExpandAddend { kNone, kRow, kMatrix };
constexpr int kExpandStep = 64;

// STAGED_STORES writes each warp's 16x64 tile through shared memory, so that eight lanes store a row's 128 contiguous
// bytes (whole lines when q is a multiple of 64) instead of four lanes storing 64: without it the kernel without
// addend is bound by the L2 (each store instruction writes half of eight lines) while DRAM idles. The op's y takes it
// at ranks 8 and 16, where it beats cuBLAS (ledger: lora, kernel, H200, bfloat16 2048x4096x11008x16, variant
// "y = bias + s·h·Bᵀ: expand, staged stores"); at r64 the staging tile costs registers and shared memory per block
// (fewer blocks resident) and it is slower, as it is for W' with a matrix addend at every rank (same rows, x64).
// Loading the next step's addend before the current step's mma (a prefetch, +16-30 registers) was slower or level
// everywhere (variants "…, prefetch").
template <typename T, int R, int WARPS, ExpandAddend ADD, bool STAGED_STORES = false>
__global__ void __launch_bounds__(WARPS * 32)
    lora_expand_kernel(const T* __restrict__ lm, const T* __restrict__ rt, const T* __restrict__ c, int64_t ldc,
                       T* __restrict__ out, int64_t ldo, int64_t p, int64_t q, int64_t cols_per_block, float scale) {
  constexpr int KS = (R + 15) / 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row_lo = (int64_t(blockIdx.x) * WARPS + warp) * 16 + g, row_hi = row_lo + 8;
  const bool lo_ok = row_lo < p, hi_ok = row_hi < p;
  // [warp][row r of the tile][16-byte chunk, XOR 4 on odd rows: the 8 lanes of a store phase hit distinct banks]
  __shared__ uint4 stage[STAGED_STORES ? WARPS * 16 * 8 : 1];

  auto load8 = [](const T* base, bool valid) -> uint2 {
    return valid ? __ldg(reinterpret_cast<const uint2*>(base)) : make_uint2(0, 0);
  };
  uint2 a_lo[KS], a_hi[KS];  // Lm rows g and g+8, k 16s + 4t .. +3
#pragma unroll
  for (int s = 0; s < KS; ++s) {
    const int kk = 16 * s + 4 * t;
    a_lo[s] = load8(lm + (lo_ok ? row_lo : 0) * R + kk, lo_ok && kk < R);
    a_hi[s] = load8(lm + (hi_ok ? row_hi : 0) * R + kk, hi_ok && kk < R);
  }

  const int64_t col_begin = int64_t(blockIdx.y) * cols_per_block;
  const int64_t col_end = col_begin + cols_per_block < q ? col_begin + cols_per_block : q;
  // The addend of the step at col0: [group][row g, row g+8].
  auto load_addend = [&](int64_t col0, uint4 (&add)[2][2]) {
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
      const int64_t col = col0 + 32 * grp + 8 * t;
      const bool col_ok = col < col_end;
      if constexpr (ADD == ExpandAddend::kMatrix) {
        add[grp][0] = load16_or_zero(c + (lo_ok ? row_lo : 0) * ldc + col, lo_ok && col_ok);
        add[grp][1] = load16_or_zero(c + (hi_ok ? row_hi : 0) * ldc + col, hi_ok && col_ok);
      } else if constexpr (ADD == ExpandAddend::kRow) {
        add[grp][0] = add[grp][1] = load16_or_zero(c + col, col_ok);
      } else {
        add[grp][0] = add[grp][1] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  for (int64_t col0 = col_begin; col0 < col_end; col0 += kExpandStep) {
    // The addend first: its loads are in flight while the mma run.
    uint4 add[2][2];
    load_addend(col0, add);
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
      float acc[4][4] = {};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // n-slot g of n-tile j is column 8·(g / 2) + 2j + g % 2 of the group.
        const int64_t col = col0 + 32 * grp + 8 * (g / 2) + 2 * j + (g % 2);
        const bool col_ok = col < col_end;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
          const int kk = 16 * s + 4 * t;
          const uint2 b = load8(rt + (col_ok ? col : 0) * R + kk, col_ok && kk < R);
          mma_16816<T>(acc[j], a_lo[s].x, a_hi[s].x, a_lo[s].y, a_hi[s].y, b.x, b.y);
        }
      }
      const int64_t col = col0 + 32 * grp + 8 * t;
      if (!STAGED_STORES && col >= col_end) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = half ? row_hi : row_lo;
        if (!STAGED_STORES && row >= p) continue;
        const uint32_t* cv = reinterpret_cast<const uint32_t*>(&add[grp][half]);
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 base = unpack2<T>(cv[j]);
          o[j] = pack2<T>(base.x + scale * acc[j][2 * half], base.y + scale * acc[j][2 * half + 1]);
        }
        if constexpr (STAGED_STORES) {
          const int r = g + 8 * half;
          stage[(warp * 16 + r) * 8 + ((grp * 4 + t) ^ ((r & 1) * 4))] = make_uint4(o[0], o[1], o[2], o[3]);
        } else {
          *reinterpret_cast<uint4*>(out + row * ldo + col) = make_uint4(o[0], o[1], o[2], o[3]);
        }
      }
    }
    if constexpr (STAGED_STORES) {
      __syncwarp();
#pragma unroll
      for (int it = 0; it < 4; ++it) {  // four rows per instruction, eight lanes (128 bytes) per row
        const int r = it * 4 + lane / 8, chunk = lane % 8;
        const int64_t row = row_lo - g + r, col = col0 + 8 * chunk;
        if (row < p && col < col_end)
          *reinterpret_cast<uint4*>(out + row * ldo + col) = stage[(warp * 16 + r) * 8 + (chunk ^ ((r & 1) * 4))];
      }
      __syncwarp();
    }
  }
}

// ---- host launcher (shared by lora_linear.cu and benchmarks/cuda_lora_kernels_bench.cu) -------------------------
constexpr bool lora_tensor_core_rank(int64_t r) { return r == 8 || r == 16 || r == 32 || r == 64; }

// f.template operator()<R>() for the rank r (one of lora_tensor_core_rank's; anything else takes 64).
template <typename F>
void with_tensor_core_rank(int64_t r, F&& f) {
  switch (r) {
    case 8: return f.template operator()<8>();
    case 16: return f.template operator()<16>();
    case 32: return f.template operator()<32>();
    default: return f.template operator()<64>();
  }
}

// Expand: 8 warps (128 rows) per block, the grid one wave: as many blocks as the SMs hold at once (the occupancy
// API's count; the kernel is register-bound), the columns split into equal whole 64-column steps between the blocks
// of a row tile. Memory-bound, the kernel needs every resident block streaming until the end: a grid of a fixed
// number of blocks per SM leaves a partial last wave in which most SMs idle (ledger: lora, kernel, H200, bfloat16
// 8192x4096x4096x16, variant "W': expand, grid of ~4 blocks per SM (before)").
constexpr int kExpandWarps = 8;

// Resident blocks per SM of one kernel variant on the current device (its registers per thread depend on the
// architecture it was built for), cached per device ordinal.
template <typename T, int R, ExpandAddend ADD, bool STAGED_STORES = false>
int lora_expand_blocks_per_sm() {
  constexpr int kDevices = 64;
  static std::atomic<int> cached[kDevices];  // 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) {
    (void)cudaGetLastError();
    device = -1;
  } else if (const int n = cached[device].load(std::memory_order_relaxed); n > 0) {
    return n;
  }
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lora_expand_kernel<T, R, kExpandWarps, ADD, STAGED_STORES>,
                                                    kExpandWarps * 32, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; fall back to the kernel's register-bound count on sm_90
    n = 3;
  }
  n = n > 0 ? n : 1;
  if (device >= 0) cached[device].store(n, std::memory_order_relaxed);
  return n;
}

// The column split of a row tile: `splits` blocks of `cols_per_block` columns (a multiple of kExpandStep) each,
// for `resident` blocks at once. Shared with the benchmark, which also times the earlier rule.
struct ExpandGrid {
  int64_t row_blocks, splits, cols_per_block;
};

inline ExpandGrid lora_expand_grid(int64_t p, int64_t q, int64_t resident) {
  const int64_t row_blocks = (p + 16 * kExpandWarps - 1) / (16 * kExpandWarps);
  const int64_t steps = (q + kExpandStep - 1) / kExpandStep;
  int64_t splits = resident / row_blocks;  // one wave; a single split when the row tiles alone fill it
  splits = splits < 1 ? 1 : (splits > steps ? steps : splits);
  const int64_t cols_per_block = (steps + splits - 1) / splits * kExpandStep;
  return {row_blocks, (q + cols_per_block - 1) / cols_per_block, cols_per_block};
}

template <typename T, int R, ExpandAddend ADD, bool STAGED_STORES = false>
void launch_lora_expand_rank(const T* lm, const T* rt, const T* c, int64_t ldc, T* out, int64_t ldo, int64_t p,
                             int64_t q, float scale, int sms, cudaStream_t stream) {
  const int per_sm = lora_expand_blocks_per_sm<T, R, ADD, STAGED_STORES>();
  const ExpandGrid grid = lora_expand_grid(p, q, int64_t(per_sm) * sms);
  lora_expand_kernel<T, R, kExpandWarps, ADD, STAGED_STORES>
      <<<dim3(unsigned(grid.row_blocks), unsigned(grid.splits)), kExpandWarps * 32, 0, stream>>>(
          lm, rt, c, ldc, out, ldo, p, q, grid.cols_per_block, scale);
}

template <typename T, ExpandAddend ADD>
void launch_lora_expand_addend(const T* lm, const T* rt, const T* c, int64_t ldc, T* out, int64_t ldo, int64_t p,
                               int64_t q, int64_t r, float scale, int sms, cudaStream_t stream) {
  with_tensor_core_rank(r, [&]<int R>() {
    launch_lora_expand_rank<T, R, ADD>(lm, rt, c, ldc, out, ldo, p, q, scale, sms, stream);
  });
}

// out [p, q] = addend + scale · lm [p, r] · rtᵀ (lm, rt [q, r] contiguous); addend: none, a [q] row vector or a
// [p, q] matrix with row stride ldc. p, q > 0; r from lora_tensor_core_rank.
template <typename T>
void launch_lora_expand(const T* lm, const T* rt, ExpandAddend add, const T* c, int64_t ldc, T* out, int64_t ldo,
                        int64_t p, int64_t q, int64_t r, float scale, int sms, cudaStream_t stream) {
  switch (add) {
    case ExpandAddend::kNone:
      return launch_lora_expand_addend<T, ExpandAddend::kNone>(lm, rt, c, ldc, out, ldo, p, q, r, scale, sms, stream);
    case ExpandAddend::kRow:
      return launch_lora_expand_addend<T, ExpandAddend::kRow>(lm, rt, c, ldc, out, ldo, p, q, r, scale, sms, stream);
    default:
      return launch_lora_expand_addend<T, ExpandAddend::kMatrix>(lm, rt, c, ldc, out, ldo, p, q, r, scale, sms,
                                                                 stream);
  }
}

// The ranks at which y = bias + s·h·Bᵀ takes lora_expand with staged stores instead of cuBLAS (STAGED_STORES).
constexpr bool lora_staged_rank(int64_t r) { return r == 8 || r == 16; }

// out [p, q] = bias + scale · lm [p, r] · rtᵀ with staged stores; bias a [q] row vector or null; r from
// lora_staged_rank; otherwise launch_lora_expand's preconditions.
template <typename T>
void launch_lora_expand_staged(const T* lm, const T* rt, const T* bias, T* out, int64_t ldo, int64_t p, int64_t q,
                               int64_t r, float scale, int sms, cudaStream_t stream) {
  auto go = [&]<ExpandAddend ADD>() {
    if (r == 8) {
      launch_lora_expand_rank<T, 8, ADD, true>(lm, rt, bias, 0, out, ldo, p, q, scale, sms, stream);
    } else {
      launch_lora_expand_rank<T, 16, ADD, true>(lm, rt, bias, 0, out, ldo, p, q, scale, sms, stream);
    }
  };
  if (bias != nullptr) {
    go.template operator()<ExpandAddend::kRow>();
  } else {
    go.template operator()<ExpandAddend::kNone>();
  }
}

}  // namespace tmf::cuda
