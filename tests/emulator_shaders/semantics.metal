// Kernels that exercise the harness's own semantics (tests/test_emulator_semantics.py).
#include <metal_stdlib>
using namespace metal;

constant constexpr uint SIMD_OUTS = 10;

[[kernel]] void simd_ops(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const float v = in[tid];
  device float* o = out + tid * SIMD_OUTS;
  o[0] = simd_sum(v);
  o[1] = simd_max(v);
  o[2] = simd_min(v);
  o[3] = simd_prefix_exclusive_sum(v);
  o[4] = simd_prefix_inclusive_sum(v);
  o[5] = simd_shuffle_xor(v, ushort(1));
  o[6] = simd_broadcast(v, ushort(2));
  o[7] = simd_is_first() ? 1.0f : 0.0f;
  o[8] = simd_any(v > 30.5f) ? 1.0f : 0.0f;
  o[9] = simd_all(v >= 0.0f) ? 1.0f : 0.0f;
}

// Full SIMD-groups only: shuffle_down/up keep the value where the source lane is outside the group.
[[kernel]] void simd_shifts(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint tid [[thread_index_in_threadgroup]]) {
  const float v = in[tid];
  out[tid * 2] = simd_shuffle_down(v, ushort(3));
  out[tid * 2 + 1] = simd_shuffle_up(v, ushort(5));
}

// Lanes in different branches reach different call sites: each is its own set of active lanes.
[[kernel]] void simd_divergent(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const float v = in[tid];
  if (lane < 12) {
    out[tid] = simd_sum(v);
  } else {
    out[tid] = simd_sum(2.0f * v);
  }
}

[[kernel]] void barrier_rotate(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
  threadgroup float buf[1024];
  buf[tid] = float(tid) * 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float v = buf[(tid + 1) % n];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  buf[tid] = v + 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[(tid + n - 1) % n];
}

[[kernel]] void conversions(
    device const float* in [[buffer(0)]],
    device half* h_out [[buffer(1)]],
    device bfloat* b_out [[buffer(2)]],
    device float* back [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  const half h = half(in[i]);
  const bfloat b = bfloat(in[i]);
  h_out[i] = h;
  b_out[i] = b;
  back[2 * i] = float(h);
  back[2 * i + 1] = float(b);
}

[[kernel]] void swizzles(
    device const float4* in [[buffer(0)]],
    device float4* out [[buffer(1)]],
    device float2* out2 [[buffer(2)]],
    device half4* out_half [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  const float4 v = in[i];
  out[i] = v.wzyx + float4(1.0f);
  out2[i] = v.xy * v.zw;
  out_half[i] = half4(v.yxwz);
}

template <typename T>
[[kernel]] void grid_positions(
    device uint* out [[buffer(0)]],
    threadgroup T* shared [[threadgroup(0)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 tid [[thread_position_in_threadgroup]],
    uint2 tpg [[threads_per_threadgroup]],
    uint2 grid [[threads_per_grid]]) {
  const uint local = tid.y * tpg.x + tid.x;
  shared[local] = T(gid.x + 1000 * gid.y);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint n = tpg.x * tpg.y;
  out[gid.y * grid.x + gid.x] = uint(shared[(local + 1) % n]);
}

template [[host_name("grid_positions_uint")]] [[kernel]] decltype(grid_positions<uint>) grid_positions<uint>;

[[kernel]] void too_much_threadgroup_memory(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float big[9000];
  big[tid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = big[tid];
}
