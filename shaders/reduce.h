// Threadgroup-wide reductions shared by the row kernels: simd_sum/simd_max within each SIMD-group,
// one value per SIMD-group through `scratch` (32 floats), then every SIMD-group reduces the partials, so all
// threads get the result without a third barrier. The leading barrier makes back-to-back reductions
// over the same scratch safe (the previous readers are done before it is overwritten).
#pragma once
#include <metal_stdlib>
using namespace metal;

struct SumOp {
  static float identity() { return 0.0f; }
  static float simd(float v) { return simd_sum(v); }
};
struct MaxOp {
  static float identity() { return -INFINITY; }
  static float simd(float v) { return simd_max(v); }
};

template <typename Op>
inline float threadgroup_reduce(float v, threadgroup float* scratch, uint lane, uint simd_group, uint n_simd) {
  v = Op::simd(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane == 0) {
    scratch[simd_group] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return Op::simd(lane < n_simd ? scratch[lane] : Op::identity());
}

inline float threadgroup_sum(float v, threadgroup float* scratch, uint lane, uint simd_group, uint n_simd) {
  return threadgroup_reduce<SumOp>(v, scratch, lane, simd_group, n_simd);
}

inline float threadgroup_max(float v, threadgroup float* scratch, uint lane, uint simd_group, uint n_simd) {
  return threadgroup_reduce<MaxOp>(v, scratch, lane, simd_group, n_simd);
}

// A value uniform across the threadgroup (a row's rstd, target, scale): lane 0 of each SIMD-group loads it and
// broadcasts it, one device load per SIMD-group instead of one per thread. The whole SIMD-group must call it.
template <typename T>
inline T load_uniform(device const T* values, uint index, uint lane) {
  T v = T(0);
  if (lane == 0) {
    v = values[index];
  }
  return simd_broadcast(v, 0);
}

// exp(x) for x <= 0 (softmax's x - max), as exp2(x · log2 e): exp2 is a native instruction on Apple GPUs while
// precise::exp is a multi-instruction sequence (MLX's softmax uses fast::exp likewise). Safe for these arguments: the
// result lies in [0, 1] (no overflow); rounding x · log2 e adds a relative error of about |x| · 2^-24 to a term of
// size exp(x), far inside the float32 contract after normalisation; exp2(-inf) = 0 (MLX relies on it too). NaN is
// passed through explicitly: what fast::exp2 returns for NaN is not documented, and the contract's NaN rows need NaN.
inline float exp_nonpositive(float x) {
  return isnan(x) ? x : fast::exp2(x * 1.4426950408889634f);
}
