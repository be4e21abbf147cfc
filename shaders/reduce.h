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

// Online softmax state (running max m, sum s of exp(x - m)) merged with another; -inf maxima contribute
// nothing (avoids exp(-inf - -inf) = NaN for fully masked stretches).
inline float2 softmax_state_merge(float2 a, float2 b) {
  float m = max(a.x, b.x);
  float sa = a.x == -INFINITY ? 0.0f : a.y * precise::exp(a.x - m);
  float sb = b.x == -INFINITY ? 0.0f : b.y * precise::exp(b.x - m);
  float2 r;
  r.x = m;
  r.y = sa + sb;
  return r;
}
