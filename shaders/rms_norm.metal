// RMSNorm over rows, forward and backward, in float32, float16 and bfloat16 (statistics in float32).
// Launch code: torch_metal_fused/backends/metal.py (rms_norm_*).
//
// Forward: y = x * rstd * (w + offset) (offset 0, or 1 for Gemma's (1 + w)) with rstd = rsqrt(mean(x²) + eps) saved as float32 per row (4 B per row).
//   simd_rows  (cols <= 256)  up to 8 SIMD-groups per threadgroup, each walking >= 20 rows, <= 8 elements per lane.
//   single_row (cols <= 8192) one threadgroup walking >= 20 rows, 8 contiguous elements per thread in registers.
//   Both read x once and write y once (2 * sizeof(T) B per element, + w once per row walker: the host packs rows
//   as tmf::launch::plan_rows says).
//   looped     (longer rows)  reads x twice (3 * sizeof(T) B per element).
//   One dispatch per op call. *_noweight variants read no weight.
//   rms_norm_add_forward_* (add_rms_norm): the row is h = x + residual, rounded to T as the unfused add rounds
//   it, written to h and normalised in the same pass (reads x and residual, writes h and y: the minimum; looped
//   re-reads h).
// Backward: one dispatch of the dx kernel over `groups` (4 per GPU core, <= rows / 16) threadgroups, each walking rows
//   group, group + groups, ...: g = dy * w, dx = rstd * (g - x * rstd² * mean(g * x)); with dw, each thread
//   also accumulates dy * x * rstd for its columns (registers in single_row, its own slots of the partial
//   row in looped) and writes one float32 partial row per group; a second dispatch
//   (rms_norm_backward_dw_reduce) sums the partial rows. single_row reads x and dy once and writes dx once;
//   looped reads them twice. Without dw there is no partial buffer and no second dispatch.
//   rms_norm_add_backward_* (add_rms_norm): dx also adds the incoming gradient of h (the residual stream), read once;
//   that sum is the gradient of both x and the residual.
#include <metal_stdlib>
#include "tmf/shader_args.h"
#include "reduce.h"
#include "row_io.h"
using namespace metal;

constant constexpr uint SIMD_ROW_ELEMS = 8;
constant constexpr uint READS = tmf::kRowElementsPerThread;  // per thread in single_row

// The weight + offset for a thread's N columns (1 without a weight, and past the end of the row).
template <uint N, bool HAS_WEIGHT, typename T>
inline void load_weight_elements(device const T* w, uint c0, uint cols, float offset, thread float* wv) {
  if (HAS_WEIGHT) {
    load_row_elements<N>(w, c0, cols, 1.0f - offset, wv);
    for (uint i = 0; i < N; ++i) {
      wv[i] += offset;
    }
  } else {
    for (uint i = 0; i < N; ++i) {
      wv[i] = 1.0f;
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------------
// ADD (add variants): the row is x + residual (buffer 5), written out to h (buffer 6, contiguous); without ADD both
// are bound to x and neither is touched.
template <typename T, bool HAS_WEIGHT, bool ADD>
[[kernel]] void rms_norm_forward_simd_rows(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device T* y [[buffer(2)]],
    device float* rstd [[buffer(3)]],
    constant tmf::RowParams& p [[buffer(4)]],
    device const T* residual [[buffer(5)]],
    device T* h [[buffer(6)]],
    uint group [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  float wv[SIMD_ROW_ELEMS];  // the weight, read once per SIMD-group and reused for all its rows
  for (uint i = 0; i < SIMD_ROW_ELEMS; ++i) {
    const uint c = lane + i * 32;
    wv[i] = (HAS_WEIGHT && c < p.cols) ? float(w[c]) + p.weight_offset : 1.0f;
  }
  const uint last = min(p.rows, (group + 1) * p.rows_per_group);
  for (uint row = group * p.rows_per_group + simd_group; row < last; row += n_simd) {  // no barriers inside
  device const T* xr = x + ulong(row) * p.x_row_stride;
  device T* yr = y + ulong(row) * p.cols;
  float v[SIMD_ROW_ELEMS];
  float ss = 0.0f;
  for (uint i = 0; i < SIMD_ROW_ELEMS; ++i) {
    const uint c = lane + i * 32;
    v[i] = c < p.cols ? float(xr[c]) : 0.0f;
    if (ADD && c < p.cols) {
      const T sum = static_cast<T>(v[i] + float(residual[ulong(row) * p.residual_row_stride + c]));
      h[ulong(row) * p.cols + c] = sum;
      v[i] = float(sum);
    }
    ss += v[i] * v[i];
  }
  const float r = precise::rsqrt(simd_sum(ss) / float(p.cols) + p.eps);
  if (lane == 0) {
    rstd[row] = r;
  }
  for (uint i = 0; i < SIMD_ROW_ELEMS; ++i) {
    const uint c = lane + i * 32;
    if (c < p.cols) {
      yr[c] = static_cast<T>(v[i] * r * wv[i]);
    }
  }
  }
}

template <typename T, bool HAS_WEIGHT, bool ADD>
[[kernel]] void rms_norm_forward_single_row(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device T* y [[buffer(2)]],
    device float* rstd [[buffer(3)]],
    constant tmf::RowParams& p [[buffer(4)]],
    device const T* residual [[buffer(5)]],
    device T* h [[buffer(6)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const uint c0 = tid * READS;
  float wv[READS];  // the weight (+ offset), read once per threadgroup and reused for all its rows
  load_weight_elements<READS, HAS_WEIGHT>(w, c0, p.cols, p.weight_offset, wv);
  const uint last = min(p.rows, (group + 1) * p.rows_per_group);
  for (uint row = group * p.rows_per_group; row < last; ++row) {  // uniform across the threadgroup
  device const T* xr = x + ulong(row) * p.x_row_stride;
  device T* yr = y + ulong(row) * p.cols;
  float v[READS];
  load_row_elements<READS>(xr, c0, p.cols, 0.0f, v);
  if (ADD) {
    float rv[READS];
    load_row_elements<READS>(residual + ulong(row) * p.residual_row_stride, c0, p.cols, 0.0f, rv);
    for (uint i = 0; i < READS; ++i) {
      v[i] = float(static_cast<T>(v[i] + rv[i]));  // rounded as the unfused add rounds it
    }
    store_row_elements<READS>(h + ulong(row) * p.cols, c0, p.cols, v);
  }
  float ss = 0.0f;
  for (uint i = 0; i < READS; ++i) {
    ss += v[i] * v[i];
  }
  const float r = precise::rsqrt(threadgroup_sum(ss, scratch, lane, simd_group, n_simd) / float(p.cols) + p.eps);
  if (tid == 0) {
    rstd[row] = r;
  }
  for (uint i = 0; i < READS; ++i) {
    v[i] *= r * wv[i];
  }
  store_row_elements<READS>(yr, c0, p.cols, v);
  }
}

template <typename T, bool HAS_WEIGHT, bool ADD>
[[kernel]] void rms_norm_forward_looped(
    device const T* x [[buffer(0)]],
    device const T* w [[buffer(1)]],
    device T* y [[buffer(2)]],
    device float* rstd [[buffer(3)]],
    constant tmf::RowParams& p [[buffer(4)]],
    device const T* residual [[buffer(5)]],
    device T* h [[buffer(6)]],
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
  device T* hr = h + ulong(row) * p.cols;
  float ss = 0.0f;
  for (uint c = tid; c < p.cols; c += threads) {
    float v = float(xr[c]);
    if (ADD) {
      const T sum = static_cast<T>(v + float(residual[ulong(row) * p.residual_row_stride + c]));
      hr[c] = sum;  // re-read below by this same thread (same columns in both loops)
      v = float(sum);
    }
    ss += v * v;
  }
  const float r = precise::rsqrt(threadgroup_sum(ss, scratch, lane, simd_group, n_simd) / float(p.cols) + p.eps);
  if (tid == 0) {
    rstd[row] = r;
  }
  for (uint c = tid; c < p.cols; c += threads) {
    const float v = float(ADD ? hr[c] : xr[c]) * r;
    yr[c] = static_cast<T>(HAS_WEIGHT ? v * (float(w[c]) + p.weight_offset) : v);
  }
  }
}

// ---- backward ---------------------------------------------------------------------------------------
// ADD (add variants): d_residual (buffer 7), the incoming gradient of h, is added to dx; bound to dy and unread
// otherwise.
template <typename T, bool DX, bool DW, bool ADD>
[[kernel]] void rms_norm_backward_single_row(
    device const T* dy [[buffer(0)]],
    device const T* x [[buffer(1)]],
    device const T* w [[buffer(2)]],
    device const float* rstd [[buffer(3)]],
    device T* dx [[buffer(4)]],
    device float* dw_partial [[buffer(5)]],
    constant tmf::RmsNormBackwardParams& p [[buffer(6)]],
    device const T* d_residual [[buffer(7)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  const uint c0 = tid * READS;
  float wv[READS];
  float dw_acc[READS];
  if (p.has_weight != 0) {
    load_weight_elements<READS, true>(w, c0, p.cols, p.weight_offset, wv);
  } else {
    load_weight_elements<READS, false>(w, c0, p.cols, p.weight_offset, wv);
  }
  for (uint i = 0; i < READS; ++i) {
    dw_acc[i] = 0.0f;
  }
  const float inv_cols = 1.0f / float(p.cols);
  for (uint row = group; row < p.rows; row += p.groups) {  // uniform across the threadgroup
    device const T* xr = x + ulong(row) * p.x_row_stride;
    device const T* dyr = dy + ulong(row) * p.dy_row_stride;
    const float r = load_uniform(rstd, row, lane);
    float xv[READS];
    float gv[READS];
    load_row_elements<READS>(xr, c0, p.cols, 0.0f, xv);
    load_row_elements<READS>(dyr, c0, p.cols, 0.0f, gv);
    float dot = 0.0f;
    for (uint i = 0; i < READS; ++i) {
      const float d = gv[i];
      if (DW) {
        dw_acc[i] += d * xv[i] * r;
      }
      gv[i] = d * wv[i];
      dot += gv[i] * xv[i];
    }
    if (DX) {
      const float coef = r * r * threadgroup_sum(dot, scratch, lane, simd_group, n_simd) * inv_cols;
      for (uint i = 0; i < READS; ++i) {
        gv[i] = r * (gv[i] - xv[i] * coef);  // dx
      }
      if (ADD) {
        float rv[READS];
        load_row_elements<READS>(d_residual + ulong(row) * p.d_residual_row_stride, c0, p.cols, 0.0f, rv);
        for (uint i = 0; i < READS; ++i) {
          gv[i] += rv[i];
        }
      }
      store_row_elements<READS>(dx + ulong(row) * p.cols, c0, p.cols, gv);
    }
  }
  if (DW) {
    store_row_elements<READS>(dw_partial + ulong(group) * p.cols, c0, p.cols, dw_acc);
  }
}

template <typename T, bool DX, bool DW, bool ADD>
[[kernel]] void rms_norm_backward_looped(
    device const T* dy [[buffer(0)]],
    device const T* x [[buffer(1)]],
    device const T* w [[buffer(2)]],
    device const float* rstd [[buffer(3)]],
    device T* dx [[buffer(4)]],
    device float* dw_partial [[buffer(5)]],
    constant tmf::RmsNormBackwardParams& p [[buffer(6)]],
    device const T* d_residual [[buffer(7)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  device float* partial = dw_partial + ulong(group) * p.cols;
  if (DW) {
    for (uint c = tid; c < p.cols; c += threads) {
      partial[c] = 0.0f;  // each thread owns columns tid, tid + threads, ...: no races, no barrier needed
    }
  }
  const float inv_cols = 1.0f / float(p.cols);
  for (uint row = group; row < p.rows; row += p.groups) {
    device const T* xr = x + ulong(row) * p.x_row_stride;
    device const T* dyr = dy + ulong(row) * p.dy_row_stride;
    const float r = load_uniform(rstd, row, lane);
    float coef = 0.0f;
    if (DX) {
      float dot = 0.0f;
      for (uint c = tid; c < p.cols; c += threads) {
        const float wc = p.has_weight != 0 ? float(w[c]) + p.weight_offset : 1.0f;
        dot += float(dyr[c]) * wc * float(xr[c]);
      }
      coef = r * r * threadgroup_sum(dot, scratch, lane, simd_group, n_simd) * inv_cols;
    }
    device T* dxr = dx + ulong(row) * p.cols;
    for (uint c = tid; c < p.cols; c += threads) {
      const float xc = float(xr[c]);
      const float d = float(dyr[c]);
      if (DW) {
        partial[c] += d * xc * r;
      }
      if (DX) {
        const float wc = p.has_weight != 0 ? float(w[c]) + p.weight_offset : 1.0f;
        const float through = ADD ? float(d_residual[ulong(row) * p.d_residual_row_stride + c]) : 0.0f;
        dxr[c] = static_cast<T>(r * (d * wc - xc * coef) + through);
      }
    }
  }
}

// dw[c] = sum over groups of the float32 partial rows. A threadgroup takes kDwReduceColumns (32) columns; its
// threads / 32 slices sum interleaved subsets of the partial rows side by side, then the first slice adds them up
// (one thread per column left a GPU cols / 256 threadgroups, each thread walking every partial row in turn).
// Reads each partial element once, writes dw once.
template <typename T>
[[kernel]] void rms_norm_backward_dw_reduce_columns(
    device const float* dw_partial [[buffer(0)]],
    device T* dw [[buffer(1)]],
    constant tmf::RmsNormBackwardParams& p [[buffer(2)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  threadgroup float slice_sums[tmf::kDwReduceMaxSlices * tmf::kDwReduceColumns];
  const uint slices = threads / tmf::kDwReduceColumns, slice = tid / tmf::kDwReduceColumns;
  const uint col = tid % tmf::kDwReduceColumns, c = group * tmf::kDwReduceColumns + col;
  float s = 0.0f;
  if (c < p.cols) {
    for (uint g = slice; g < p.groups; g += slices) {
      s += dw_partial[ulong(g) * p.cols + c];
    }
  }
  slice_sums[tid] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (slice == 0 && c < p.cols) {
    float total = 0.0f;
    for (uint i = 0; i < slices; ++i) {
      total += slice_sums[i * tmf::kDwReduceColumns + col];
    }
    dw[c] = static_cast<T>(total);
  }
}

// ---- instantiations ----------------------------------------------------------------------------------
template [[host_name("rms_norm_forward_simd_rows_float")]] [[kernel]] decltype(rms_norm_forward_simd_rows<float, true, false>) rms_norm_forward_simd_rows<float, true, false>;
template [[host_name("rms_norm_forward_simd_rows_half")]] [[kernel]] decltype(rms_norm_forward_simd_rows<half, true, false>) rms_norm_forward_simd_rows<half, true, false>;
template [[host_name("rms_norm_forward_single_row_float")]] [[kernel]] decltype(rms_norm_forward_single_row<float, true, false>) rms_norm_forward_single_row<float, true, false>;
template [[host_name("rms_norm_forward_single_row_half")]] [[kernel]] decltype(rms_norm_forward_single_row<half, true, false>) rms_norm_forward_single_row<half, true, false>;
template [[host_name("rms_norm_forward_looped_float")]] [[kernel]] decltype(rms_norm_forward_looped<float, true, false>) rms_norm_forward_looped<float, true, false>;
template [[host_name("rms_norm_forward_looped_half")]] [[kernel]] decltype(rms_norm_forward_looped<half, true, false>) rms_norm_forward_looped<half, true, false>;
template [[host_name("rms_norm_forward_noweight_simd_rows_float")]] [[kernel]] decltype(rms_norm_forward_simd_rows<float, false, false>) rms_norm_forward_simd_rows<float, false, false>;
template [[host_name("rms_norm_forward_noweight_simd_rows_half")]] [[kernel]] decltype(rms_norm_forward_simd_rows<half, false, false>) rms_norm_forward_simd_rows<half, false, false>;
template [[host_name("rms_norm_forward_noweight_single_row_float")]] [[kernel]] decltype(rms_norm_forward_single_row<float, false, false>) rms_norm_forward_single_row<float, false, false>;
template [[host_name("rms_norm_forward_noweight_single_row_half")]] [[kernel]] decltype(rms_norm_forward_single_row<half, false, false>) rms_norm_forward_single_row<half, false, false>;
template [[host_name("rms_norm_forward_noweight_looped_float")]] [[kernel]] decltype(rms_norm_forward_looped<float, false, false>) rms_norm_forward_looped<float, false, false>;
template [[host_name("rms_norm_forward_noweight_looped_half")]] [[kernel]] decltype(rms_norm_forward_looped<half, false, false>) rms_norm_forward_looped<half, false, false>;
template [[host_name("rms_norm_backward_dx_dw_single_row_float")]] [[kernel]] decltype(rms_norm_backward_single_row<float, true, true, false>) rms_norm_backward_single_row<float, true, true, false>;
template [[host_name("rms_norm_backward_dx_dw_single_row_half")]] [[kernel]] decltype(rms_norm_backward_single_row<half, true, true, false>) rms_norm_backward_single_row<half, true, true, false>;
template [[host_name("rms_norm_backward_dx_single_row_float")]] [[kernel]] decltype(rms_norm_backward_single_row<float, true, false, false>) rms_norm_backward_single_row<float, true, false, false>;
template [[host_name("rms_norm_backward_dx_single_row_half")]] [[kernel]] decltype(rms_norm_backward_single_row<half, true, false, false>) rms_norm_backward_single_row<half, true, false, false>;
template [[host_name("rms_norm_backward_dw_single_row_float")]] [[kernel]] decltype(rms_norm_backward_single_row<float, false, true, false>) rms_norm_backward_single_row<float, false, true, false>;
template [[host_name("rms_norm_backward_dw_single_row_half")]] [[kernel]] decltype(rms_norm_backward_single_row<half, false, true, false>) rms_norm_backward_single_row<half, false, true, false>;
template [[host_name("rms_norm_backward_dx_dw_looped_float")]] [[kernel]] decltype(rms_norm_backward_looped<float, true, true, false>) rms_norm_backward_looped<float, true, true, false>;
template [[host_name("rms_norm_backward_dx_dw_looped_half")]] [[kernel]] decltype(rms_norm_backward_looped<half, true, true, false>) rms_norm_backward_looped<half, true, true, false>;
template [[host_name("rms_norm_backward_dx_looped_float")]] [[kernel]] decltype(rms_norm_backward_looped<float, true, false, false>) rms_norm_backward_looped<float, true, false, false>;
template [[host_name("rms_norm_backward_dx_looped_half")]] [[kernel]] decltype(rms_norm_backward_looped<half, true, false, false>) rms_norm_backward_looped<half, true, false, false>;
template [[host_name("rms_norm_backward_dw_looped_float")]] [[kernel]] decltype(rms_norm_backward_looped<float, false, true, false>) rms_norm_backward_looped<float, false, true, false>;
template [[host_name("rms_norm_backward_dw_looped_half")]] [[kernel]] decltype(rms_norm_backward_looped<half, false, true, false>) rms_norm_backward_looped<half, false, true, false>;
template [[host_name("rms_norm_backward_dw_reduce_columns_float")]] [[kernel]] decltype(rms_norm_backward_dw_reduce_columns<float>) rms_norm_backward_dw_reduce_columns<float>;
template [[host_name("rms_norm_backward_dw_reduce_columns_half")]] [[kernel]] decltype(rms_norm_backward_dw_reduce_columns<half>) rms_norm_backward_dw_reduce_columns<half>;
template [[host_name("rms_norm_add_forward_simd_rows_float")]] [[kernel]] decltype(rms_norm_forward_simd_rows<float, true, true>) rms_norm_forward_simd_rows<float, true, true>;
template [[host_name("rms_norm_add_forward_single_row_float")]] [[kernel]] decltype(rms_norm_forward_single_row<float, true, true>) rms_norm_forward_single_row<float, true, true>;
template [[host_name("rms_norm_add_forward_looped_float")]] [[kernel]] decltype(rms_norm_forward_looped<float, true, true>) rms_norm_forward_looped<float, true, true>;
template [[host_name("rms_norm_add_backward_dx_dw_single_row_float")]] [[kernel]] decltype(rms_norm_backward_single_row<float, true, true, true>) rms_norm_backward_single_row<float, true, true, true>;
template [[host_name("rms_norm_add_backward_dx_dw_looped_float")]] [[kernel]] decltype(rms_norm_backward_looped<float, true, true, true>) rms_norm_backward_looped<float, true, true, true>;
template [[host_name("rms_norm_add_backward_dx_single_row_float")]] [[kernel]] decltype(rms_norm_backward_single_row<float, true, false, true>) rms_norm_backward_single_row<float, true, false, true>;
template [[host_name("rms_norm_add_backward_dx_looped_float")]] [[kernel]] decltype(rms_norm_backward_looped<float, true, false, true>) rms_norm_backward_looped<float, true, false, true>;
template [[host_name("rms_norm_add_forward_simd_rows_half")]] [[kernel]] decltype(rms_norm_forward_simd_rows<half, true, true>) rms_norm_forward_simd_rows<half, true, true>;
template [[host_name("rms_norm_add_forward_single_row_half")]] [[kernel]] decltype(rms_norm_forward_single_row<half, true, true>) rms_norm_forward_single_row<half, true, true>;
template [[host_name("rms_norm_add_forward_looped_half")]] [[kernel]] decltype(rms_norm_forward_looped<half, true, true>) rms_norm_forward_looped<half, true, true>;
template [[host_name("rms_norm_add_backward_dx_dw_single_row_half")]] [[kernel]] decltype(rms_norm_backward_single_row<half, true, true, true>) rms_norm_backward_single_row<half, true, true, true>;
template [[host_name("rms_norm_add_backward_dx_dw_looped_half")]] [[kernel]] decltype(rms_norm_backward_looped<half, true, true, true>) rms_norm_backward_looped<half, true, true, true>;
template [[host_name("rms_norm_add_backward_dx_single_row_half")]] [[kernel]] decltype(rms_norm_backward_single_row<half, true, false, true>) rms_norm_backward_single_row<half, true, false, true>;
template [[host_name("rms_norm_add_backward_dx_looped_half")]] [[kernel]] decltype(rms_norm_backward_looped<half, true, false, true>) rms_norm_backward_looped<half, true, false, true>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("rms_norm_forward_simd_rows_bfloat")]] [[kernel]] decltype(rms_norm_forward_simd_rows<bfloat, true, false>) rms_norm_forward_simd_rows<bfloat, true, false>;
template [[host_name("rms_norm_forward_single_row_bfloat")]] [[kernel]] decltype(rms_norm_forward_single_row<bfloat, true, false>) rms_norm_forward_single_row<bfloat, true, false>;
template [[host_name("rms_norm_forward_looped_bfloat")]] [[kernel]] decltype(rms_norm_forward_looped<bfloat, true, false>) rms_norm_forward_looped<bfloat, true, false>;
template [[host_name("rms_norm_forward_noweight_simd_rows_bfloat")]] [[kernel]] decltype(rms_norm_forward_simd_rows<bfloat, false, false>) rms_norm_forward_simd_rows<bfloat, false, false>;
template [[host_name("rms_norm_forward_noweight_single_row_bfloat")]] [[kernel]] decltype(rms_norm_forward_single_row<bfloat, false, false>) rms_norm_forward_single_row<bfloat, false, false>;
template [[host_name("rms_norm_forward_noweight_looped_bfloat")]] [[kernel]] decltype(rms_norm_forward_looped<bfloat, false, false>) rms_norm_forward_looped<bfloat, false, false>;
template [[host_name("rms_norm_backward_dx_dw_single_row_bfloat")]] [[kernel]] decltype(rms_norm_backward_single_row<bfloat, true, true, false>) rms_norm_backward_single_row<bfloat, true, true, false>;
template [[host_name("rms_norm_backward_dx_single_row_bfloat")]] [[kernel]] decltype(rms_norm_backward_single_row<bfloat, true, false, false>) rms_norm_backward_single_row<bfloat, true, false, false>;
template [[host_name("rms_norm_backward_dw_single_row_bfloat")]] [[kernel]] decltype(rms_norm_backward_single_row<bfloat, false, true, false>) rms_norm_backward_single_row<bfloat, false, true, false>;
template [[host_name("rms_norm_backward_dx_dw_looped_bfloat")]] [[kernel]] decltype(rms_norm_backward_looped<bfloat, true, true, false>) rms_norm_backward_looped<bfloat, true, true, false>;
template [[host_name("rms_norm_backward_dx_looped_bfloat")]] [[kernel]] decltype(rms_norm_backward_looped<bfloat, true, false, false>) rms_norm_backward_looped<bfloat, true, false, false>;
template [[host_name("rms_norm_backward_dw_looped_bfloat")]] [[kernel]] decltype(rms_norm_backward_looped<bfloat, false, true, false>) rms_norm_backward_looped<bfloat, false, true, false>;
template [[host_name("rms_norm_backward_dw_reduce_columns_bfloat")]] [[kernel]] decltype(rms_norm_backward_dw_reduce_columns<bfloat>) rms_norm_backward_dw_reduce_columns<bfloat>;
template [[host_name("rms_norm_add_forward_simd_rows_bfloat")]] [[kernel]] decltype(rms_norm_forward_simd_rows<bfloat, true, true>) rms_norm_forward_simd_rows<bfloat, true, true>;
template [[host_name("rms_norm_add_forward_single_row_bfloat")]] [[kernel]] decltype(rms_norm_forward_single_row<bfloat, true, true>) rms_norm_forward_single_row<bfloat, true, true>;
template [[host_name("rms_norm_add_forward_looped_bfloat")]] [[kernel]] decltype(rms_norm_forward_looped<bfloat, true, true>) rms_norm_forward_looped<bfloat, true, true>;
template [[host_name("rms_norm_add_backward_dx_dw_single_row_bfloat")]] [[kernel]] decltype(rms_norm_backward_single_row<bfloat, true, true, true>) rms_norm_backward_single_row<bfloat, true, true, true>;
template [[host_name("rms_norm_add_backward_dx_dw_looped_bfloat")]] [[kernel]] decltype(rms_norm_backward_looped<bfloat, true, true, true>) rms_norm_backward_looped<bfloat, true, true, true>;
template [[host_name("rms_norm_add_backward_dx_single_row_bfloat")]] [[kernel]] decltype(rms_norm_backward_single_row<bfloat, true, false, true>) rms_norm_backward_single_row<bfloat, true, false, true>;
template [[host_name("rms_norm_add_backward_dx_looped_bfloat")]] [[kernel]] decltype(rms_norm_backward_looped<bfloat, true, false, true>) rms_norm_backward_looped<bfloat, true, false, true>;
#endif
