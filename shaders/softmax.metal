// Softmax over rows, forward and backward, in float32, float16 and bfloat16 (accumulation in float32).
// Launch code: torch_metal_fused/backends/metal.py (plan_rows picks the variant).
//
// Variants (one dispatch per op call; exponentials are exp2-based, exp_nonpositive in reduce.h):
//   simd_rows  (cols <= 256)  8 rows per threadgroup, one SIMD-group (32 threads) per row, <= 8 elements
//                             per lane kept in registers. Forward reads x once, writes y once:
//                             2 * sizeof(T) bytes per element. Backward reads y, dy once, writes dx once.
//   single_row (cols <= 8192) one threadgroup per row, ceil(cols/8) threads rounded up to 32, 8 contiguous
//                             elements per thread in registers; same traffic as simd_rows.
//   looped     (longer rows)  one threadgroup per row, up to 1024 threads striding over the row with an
//                             online max/sum, then a second pass: forward reads x twice (3 * sizeof(T) B per
//                             element), backward reads y and dy twice.
#include <metal_stdlib>
#include "tmf/shader_args.h"
#include "reduce.h"
#include "row_io.h"
using namespace metal;

constant constexpr uint SIMD_ROW_ELEMS = 8;   // elements per lane in simd_rows (cols <= 256)
constant constexpr uint READS = tmf::kRowElementsPerThread;  // per thread in single_row (cols <= 8 * threads)

// ---- forward ----------------------------------------------------------------------------------------
template <typename T>
[[kernel]] void softmax_forward_simd_rows(
    device const T* x [[buffer(0)]],
    device T* y [[buffer(1)]],
    constant tmf::RowParams& p [[buffer(2)]],
    uint group [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  const uint last = min(p.rows, (group + 1) * p.rows_per_group);
  for (uint row = group * p.rows_per_group + simd_group; row < last; row += n_simd) {  // no barriers inside
  device const T* xr = x + ulong(row) * p.x_row_stride;
  device T* yr = y + ulong(row) * p.cols;
  float v[SIMD_ROW_ELEMS];
  float m = -INFINITY;
  for (uint i = 0; i < SIMD_ROW_ELEMS; ++i) {
    const uint c = lane + i * 32;
    v[i] = c < p.cols ? float(xr[c]) : -INFINITY;
    m = max(m, v[i]);
  }
  m = simd_max(m);
  float s = 0.0f;
  for (uint i = 0; i < SIMD_ROW_ELEMS; ++i) {
    const uint c = lane + i * 32;
    v[i] = c < p.cols ? exp_nonpositive(v[i] - m) : 0.0f;
    s += v[i];
  }
  const float inv = 1.0f / simd_sum(s);
  for (uint i = 0; i < SIMD_ROW_ELEMS; ++i) {
    const uint c = lane + i * 32;
    if (c < p.cols) {
      yr[c] = static_cast<T>(v[i] * inv);
    }
  }
  }
}

template <typename T>
[[kernel]] void softmax_forward_single_row(
    device const T* x [[buffer(0)]],
    device T* y [[buffer(1)]],
    constant tmf::RowParams& p [[buffer(2)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const uint last = min(p.rows, (group + 1) * p.rows_per_group);
  for (uint row = group * p.rows_per_group; row < last; ++row) {  // uniform across the threadgroup
  device const T* xr = x + ulong(row) * p.x_row_stride;
  device T* yr = y + ulong(row) * p.cols;
  const uint c0 = tid * READS;
  float v[READS];
  load_row_elements<READS>(xr, c0, p.cols, -INFINITY, v);
  float m = -INFINITY;
  for (uint i = 0; i < READS; ++i) {
    m = max(m, v[i]);
  }
  m = threadgroup_max(m, scratch, lane, simd_group, n_simd);
  float s = 0.0f;
  for (uint i = 0; i < READS; ++i) {
    v[i] = c0 + i < p.cols ? exp_nonpositive(v[i] - m) : 0.0f;
    s += v[i];
  }
  const float inv = 1.0f / threadgroup_sum(s, scratch, lane, simd_group, n_simd);
  for (uint i = 0; i < READS; ++i) {
    v[i] *= inv;
  }
  store_row_elements<READS>(yr, c0, p.cols, v);
  }
}

template <typename T>
[[kernel]] void softmax_forward_looped(
    device const T* x [[buffer(0)]],
    device T* y [[buffer(1)]],
    constant tmf::RowParams& p [[buffer(2)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const uint last = min(p.rows, (group + 1) * p.rows_per_group);
  for (uint row = group * p.rows_per_group; row < last; ++row) {  // uniform across the threadgroup
  device const T* xr = x + ulong(row) * p.x_row_stride;
  device T* yr = y + ulong(row) * p.cols;
  // Pass 1: online max and sum of exp(x - max) per thread.
  float m = -INFINITY;
  float s = 0.0f;
  for (uint c = tid; c < p.cols; c += threads) {
    const float xv = float(xr[c]);
    if (xv > m) {
      s = s * exp_nonpositive(m - xv) + exp_nonpositive(xv - xv);  // exp(xv - xv): 1, or NaN for +inf (as torch)
      m = xv;
    } else if (xv != -INFINITY) {
      s += exp_nonpositive(xv - m);  // NaN input lands here and poisons the row, as in torch
    }
  }
  const float row_max = threadgroup_max(m, scratch, lane, simd_group, n_simd);
  // m = -inf (no finite or +inf element): s is 0, or NaN from a NaN element, and must stay so (not exp(-inf - -inf)
  // = NaN for an all -inf thread, not 0 for a NaN one: max drops a NaN, only the sum carries it to the row).
  s = m == -INFINITY ? (isnan(s) ? s : 0.0f) : s * exp_nonpositive(m - row_max);
  const float inv = 1.0f / threadgroup_sum(s, scratch, lane, simd_group, n_simd);
  // Pass 2: re-read x, write y.
  for (uint c = tid; c < p.cols; c += threads) {
    yr[c] = static_cast<T>(exp_nonpositive(float(xr[c]) - row_max) * inv);
  }
  }
}

// ---- backward: dx = y * (dy - sum(dy * y)) ----------------------------------------------------------
template <typename T>
[[kernel]] void softmax_backward_simd_rows(
    device const T* y [[buffer(0)]],
    device const T* dy [[buffer(1)]],
    device T* dx [[buffer(2)]],
    constant tmf::RowParams& p [[buffer(3)]],
    uint group [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  const uint last = min(p.rows, (group + 1) * p.rows_per_group);
  for (uint row = group * p.rows_per_group + simd_group; row < last; row += n_simd) {  // no barriers inside
  device const T* yr = y + ulong(row) * p.cols;
  device const T* dyr = dy + ulong(row) * p.dy_row_stride;
  device T* dxr = dx + ulong(row) * p.cols;
  float yv[SIMD_ROW_ELEMS];
  float gv[SIMD_ROW_ELEMS];
  float dot = 0.0f;
  for (uint i = 0; i < SIMD_ROW_ELEMS; ++i) {
    const uint c = lane + i * 32;
    yv[i] = c < p.cols ? float(yr[c]) : 0.0f;
    gv[i] = c < p.cols ? float(dyr[c]) : 0.0f;
    dot += yv[i] * gv[i];
  }
  dot = simd_sum(dot);
  for (uint i = 0; i < SIMD_ROW_ELEMS; ++i) {
    const uint c = lane + i * 32;
    if (c < p.cols) {
      dxr[c] = static_cast<T>(yv[i] * (gv[i] - dot));
    }
  }
  }
}

template <typename T>
[[kernel]] void softmax_backward_single_row(
    device const T* y [[buffer(0)]],
    device const T* dy [[buffer(1)]],
    device T* dx [[buffer(2)]],
    constant tmf::RowParams& p [[buffer(3)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const uint last = min(p.rows, (group + 1) * p.rows_per_group);
  for (uint row = group * p.rows_per_group; row < last; ++row) {  // uniform across the threadgroup
  device const T* yr = y + ulong(row) * p.cols;
  device const T* dyr = dy + ulong(row) * p.dy_row_stride;
  device T* dxr = dx + ulong(row) * p.cols;
  const uint c0 = tid * READS;
  float yv[READS];
  float gv[READS];
  load_row_elements<READS>(yr, c0, p.cols, 0.0f, yv);
  load_row_elements<READS>(dyr, c0, p.cols, 0.0f, gv);
  float dot = 0.0f;
  for (uint i = 0; i < READS; ++i) {
    dot += yv[i] * gv[i];
  }
  dot = threadgroup_sum(dot, scratch, lane, simd_group, n_simd);
  for (uint i = 0; i < READS; ++i) {
    yv[i] *= gv[i] - dot;  // dx
  }
  store_row_elements<READS>(dxr, c0, p.cols, yv);
  }
}

template <typename T>
[[kernel]] void softmax_backward_looped(
    device const T* y [[buffer(0)]],
    device const T* dy [[buffer(1)]],
    device T* dx [[buffer(2)]],
    constant tmf::RowParams& p [[buffer(3)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const uint last = min(p.rows, (group + 1) * p.rows_per_group);
  for (uint row = group * p.rows_per_group; row < last; ++row) {  // uniform across the threadgroup
  device const T* yr = y + ulong(row) * p.cols;
  device const T* dyr = dy + ulong(row) * p.dy_row_stride;
  device T* dxr = dx + ulong(row) * p.cols;
  float dot = 0.0f;
  for (uint c = tid; c < p.cols; c += threads) {
    dot += float(yr[c]) * float(dyr[c]);
  }
  dot = threadgroup_sum(dot, scratch, lane, simd_group, n_simd);
  for (uint c = tid; c < p.cols; c += threads) {
    dxr[c] = static_cast<T>(float(yr[c]) * (float(dyr[c]) - dot));
  }
  }
}

// ---- instantiations: host names are <kernel>_<dtype>, as composed by tmf::launch::kernel_name ----------
template [[host_name("softmax_forward_simd_rows_float")]] [[kernel]] decltype(softmax_forward_simd_rows<float>) softmax_forward_simd_rows<float>;
template [[host_name("softmax_forward_simd_rows_half")]] [[kernel]] decltype(softmax_forward_simd_rows<half>) softmax_forward_simd_rows<half>;
template [[host_name("softmax_forward_single_row_float")]] [[kernel]] decltype(softmax_forward_single_row<float>) softmax_forward_single_row<float>;
template [[host_name("softmax_forward_single_row_half")]] [[kernel]] decltype(softmax_forward_single_row<half>) softmax_forward_single_row<half>;
template [[host_name("softmax_forward_looped_float")]] [[kernel]] decltype(softmax_forward_looped<float>) softmax_forward_looped<float>;
template [[host_name("softmax_forward_looped_half")]] [[kernel]] decltype(softmax_forward_looped<half>) softmax_forward_looped<half>;
template [[host_name("softmax_backward_simd_rows_float")]] [[kernel]] decltype(softmax_backward_simd_rows<float>) softmax_backward_simd_rows<float>;
template [[host_name("softmax_backward_simd_rows_half")]] [[kernel]] decltype(softmax_backward_simd_rows<half>) softmax_backward_simd_rows<half>;
template [[host_name("softmax_backward_single_row_float")]] [[kernel]] decltype(softmax_backward_single_row<float>) softmax_backward_single_row<float>;
template [[host_name("softmax_backward_single_row_half")]] [[kernel]] decltype(softmax_backward_single_row<half>) softmax_backward_single_row<half>;
template [[host_name("softmax_backward_looped_float")]] [[kernel]] decltype(softmax_backward_looped<float>) softmax_backward_looped<float>;
template [[host_name("softmax_backward_looped_half")]] [[kernel]] decltype(softmax_backward_looped<half>) softmax_backward_looped<half>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("softmax_forward_simd_rows_bfloat")]] [[kernel]] decltype(softmax_forward_simd_rows<bfloat>) softmax_forward_simd_rows<bfloat>;
template [[host_name("softmax_forward_single_row_bfloat")]] [[kernel]] decltype(softmax_forward_single_row<bfloat>) softmax_forward_single_row<bfloat>;
template [[host_name("softmax_forward_looped_bfloat")]] [[kernel]] decltype(softmax_forward_looped<bfloat>) softmax_forward_looped<bfloat>;
template [[host_name("softmax_backward_simd_rows_bfloat")]] [[kernel]] decltype(softmax_backward_simd_rows<bfloat>) softmax_backward_simd_rows<bfloat>;
template [[host_name("softmax_backward_single_row_bfloat")]] [[kernel]] decltype(softmax_backward_single_row<bfloat>) softmax_backward_single_row<bfloat>;
template [[host_name("softmax_backward_looped_bfloat")]] [[kernel]] decltype(softmax_backward_looped<bfloat>) softmax_backward_looped<bfloat>;
#endif
