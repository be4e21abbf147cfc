// LoRA's skinny products on tensor cores (mma.sync m16n8k16, float32 accumulation), for the half-precision CUDA op
// (csrc/cuda/lora_linear.cu). cuBLAS is far from the memory floor on these shapes (one dimension is the rank, 8–64):
// they are bandwidth-bound (a rank-r product does r multiply-adds per element it reads or writes), so each kernel
// streams its big operand once with 16-byte loads and keeps the rank-sized operand in L1/L2.
//
//   lora_reduce: out[M, R] = scale · X[M, K] · Lᵀ, L [R, K] row-major — h = x·Aᵀ (L = A), dh = s·dy·B (L = Bᵀ).
//   lora_expand: out[P, Q] = C + scale · Lm[P, R] · Rtᵀ, Rt [Q, R] row-major, C none / a row vector / a matrix —
//                W' = W + s·B·A (Lm = B, Rt = Aᵀ, C = W), y = bias + s·h·Bᵀ (Lm = h, Rt = B, C = bias).
//
// The reduction index of a product can be visited in any order as long as both operands use the same one. Both
// kernels use that to give every lane whole 16-byte vectors: in lora_reduce lane (g, t) of a warp (g = lane / 4,
// t = lane % 4) loads 8 consecutive K-elements of rows g and g+8 of X and of row g of L, and the m16n8k16 fragments
// take elements {0,1},{2,3} as their k-slots {2t,2t+1},{2t+8,2t+9} of one mma and {4,5},{6,7} of a second. In
// lora_expand the output columns are permuted the same way (n-slot 2t+i of n-tile j is column 8t + 2j + i of a
// 32-column group), so each lane's accumulators are 8 consecutive columns of rows g and g+8: C is read and out
// written as whole 16-byte vectors.
//
// Preconditions (checked by the host: lora_linear.cu's tensor_core_ok): T is __nv_bfloat16 or __half; R is 8, 16, 32
// or 64; X/out/C rows and L/Rt are 16-byte aligned with row strides a multiple of 8 elements; K, Q multiples of 8.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
__device__ __forceinline__ T round_to(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return __float2half_rn(v);
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

// ---- lora_reduce ------------------------------------------------------------------------------------------------
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

// ---- lora_expand ------------------------------------------------------------------------------------------------
// A block has WARPS warps, one 16-row tile each, all walking the block's column range in steps of 64 columns (two
// 32-column groups), so the Rt fragments of a step are read once from L2 and then hit L1. Lm's fragments of the
// warp's rows stay in registers. The rank dimension is visited in 16-wide k-steps, lane (g, t) taking k 4t..4t+3 of
// each (8-byte loads; ranks under 16 load zeros past R).
enum class ExpandAddend { kNone, kRow, kMatrix };
constexpr int kExpandStep = 64;

template <typename T, int R, int WARPS, ExpandAddend ADD>
__global__ void __launch_bounds__(WARPS * 32)
    lora_expand_kernel(const T* __restrict__ lm, const T* __restrict__ rt, const T* __restrict__ c, int64_t ldc,
                       T* __restrict__ out, int64_t ldo, int64_t p, int64_t q, int64_t cols_per_block, float scale) {
  constexpr int KS = (R + 15) / 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row_lo = (int64_t(blockIdx.x) * WARPS + warp) * 16 + g, row_hi = row_lo + 8;
  const bool lo_ok = row_lo < p, hi_ok = row_hi < p;

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
  for (int64_t col0 = col_begin; col0 < col_end; col0 += kExpandStep) {
    // The addend first: its loads are in flight while the mma run.
    uint4 add[2][2];  // [group][row g, row g+8]
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
      if (col >= col_end) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = half ? row_hi : row_lo;
        if (row >= p) continue;
        const uint32_t* cv = reinterpret_cast<const uint32_t*>(&add[grp][half]);
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 base = unpack2<T>(cv[j]);
          o[j] = pack2<T>(base.x + scale * acc[j][2 * half], base.y + scale * acc[j][2 * half + 1]);
        }
        *reinterpret_cast<uint4*>(out + row * ldo + col) = make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
  }
}

// ---- host launchers (shared by lora_linear.cu and benchmarks/cuda_lora_kernels_bench.cu) ------------------------
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

constexpr bool lora_tensor_core_rank(int64_t r) { return r == 8 || r == 16 || r == 32 || r == 64; }

// out [m, r] = scale · x [m, k] · lᵀ (l: [r, k] contiguous). m > 0; r from lora_tensor_core_rank.
template <typename T>
void launch_lora_reduce(const T* x, int64_t ldx, const T* l, T* out, int64_t m, int64_t k, int64_t r, float scale,
                        int sms, cudaStream_t stream, int variant = 0) {
  switch (r) {
    case 8: return launch_lora_reduce_rank<T, 8>(x, ldx, l, out, m, k, scale, sms, stream, variant);
    case 16: return launch_lora_reduce_rank<T, 16>(x, ldx, l, out, m, k, scale, sms, stream, variant);
    case 32: return launch_lora_reduce_rank<T, 32>(x, ldx, l, out, m, k, scale, sms, stream, variant);
    default: return launch_lora_reduce_rank<T, 64>(x, ldx, l, out, m, k, scale, sms, stream, variant);
  }
}

// Expand: 8 warps (128 rows) per block; the columns split so that the grid has about four blocks per SM, each
// block's range a whole number of 64-column steps.
constexpr int kExpandWarps = 8;

template <typename T, int R, ExpandAddend ADD>
void launch_lora_expand_rank(const T* lm, const T* rt, const T* c, int64_t ldc, T* out, int64_t ldo, int64_t p,
                             int64_t q, float scale, int sms, cudaStream_t stream) {
  const int64_t row_blocks = (p + 16 * kExpandWarps - 1) / (16 * kExpandWarps);
  const int64_t steps = (q + kExpandStep - 1) / kExpandStep;
  int64_t splits = (4 * int64_t(sms) + row_blocks - 1) / row_blocks;
  splits = splits < 1 ? 1 : (splits > steps ? steps : splits);
  const int64_t cols_per_block = (steps + splits - 1) / splits * kExpandStep;
  splits = (q + cols_per_block - 1) / cols_per_block;
  lora_expand_kernel<T, R, kExpandWarps, ADD><<<dim3(unsigned(row_blocks), unsigned(splits)), kExpandWarps * 32, 0,
                                                 stream>>>(lm, rt, c, ldc, out, ldo, p, q, cols_per_block, scale);
}

template <typename T, ExpandAddend ADD>
void launch_lora_expand_addend(const T* lm, const T* rt, const T* c, int64_t ldc, T* out, int64_t ldo, int64_t p,
                               int64_t q, int64_t r, float scale, int sms, cudaStream_t stream) {
  switch (r) {
    case 8: return launch_lora_expand_rank<T, 8, ADD>(lm, rt, c, ldc, out, ldo, p, q, scale, sms, stream);
    case 16: return launch_lora_expand_rank<T, 16, ADD>(lm, rt, c, ldc, out, ldo, p, q, scale, sms, stream);
    case 32: return launch_lora_expand_rank<T, 32, ADD>(lm, rt, c, ldc, out, ldo, p, q, scale, sms, stream);
    default: return launch_lora_expand_rank<T, 64, ADD>(lm, rt, c, ldc, out, ldo, p, q, scale, sms, stream);
  }
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

}  // namespace tmf::cuda
