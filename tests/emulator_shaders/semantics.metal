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

// NaN operands of max/min/fmax/fmin (scalar, vector, half) and of simd_max/simd_min: the harness drops a NaN, as
// the MSL specification documents fmax/fmin (NaN only when every operand is one).
constant constexpr uint NAN_OUTS = 10;

[[kernel]] void nan_max_min(
    device const float* a [[buffer(0)]],
    device const float* b [[buffer(1)]],
    device float* out [[buffer(2)]],
    device half* out_h [[buffer(3)]],
    uint tid [[thread_index_in_threadgroup]]) {
  const float x = a[tid], y = b[tid];
  device float* o = out + tid * NAN_OUTS;
  o[0] = max(x, y);
  o[1] = min(x, y);
  o[2] = fmax(x, y);
  o[3] = fmin(x, y);
  const float2 v = max(float2(x, y), float2(y, x));
  const float2 w = min(float2(x, y), float2(y, x));
  o[4] = v.x;
  o[5] = w.y;
  o[6] = simd_max(x);
  o[7] = simd_min(x);
  o[8] = float(max(half(x), half(y)));
  o[9] = clamp(x, -1.0f, 1.0f);
  out_h[tid * 2] = simd_max(half(x));
  out_h[tid * 2 + 1] = simd_min(half(x));
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

// simdgroup_matrix: d = a·b + c for 8x8 matrices: a row-major from device memory, b transposed while loading, c
// from threadgroup memory; d stored into a 9 x 16 device matrix at row 1, column 8. One SIMD-group.
template <typename T>
[[kernel]] void simdgroup_mma(
    device const T* a [[buffer(0)]],
    device const T* b [[buffer(1)]],
    device const T* c [[buffer(2)]],
    device T* d [[buffer(3)]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup T c_tile[64];
  c_tile[lane] = c[lane];
  c_tile[lane + 32] = c[lane + 32];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_matrix<T, 8, 8> ma, mb, mc, md;
  simdgroup_load(ma, a);
  simdgroup_load(mb, b, 8, ulong2(0, 0), true);
  simdgroup_load(mc, c_tile);
  simdgroup_multiply_accumulate(md, ma, mb, mc);
  simdgroup_store(md, d, 16, ulong2(8, 1));
}
template [[host_name("simdgroup_mma_float")]] [[kernel]] decltype(simdgroup_mma<float>) simdgroup_mma<float>;
template [[host_name("simdgroup_mma_half")]] [[kernel]] decltype(simdgroup_mma<half>) simdgroup_mma<half>;

// simdgroup_multiply with one lane left out (a planted divergence): lane 31 skips the product.
[[kernel]] void simdgroup_mma_diverged(
    device const float* a [[buffer(0)]],
    device float* d [[buffer(1)]],
    uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 ma, md = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_load(ma, a);
  if (lane < 31) {
    simdgroup_multiply(md, ma, ma);
  }
  simdgroup_store(md, d);
}
