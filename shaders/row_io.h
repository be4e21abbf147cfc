// Loads and stores of the row kernels' single_row variants, where each thread owns N contiguous elements of a row.
// When all N lie inside the row (every thread but the one holding the row's tail), the branch without bounds checks
// lets Apple's compiler issue wide loads and stores, as MLX's row kernels do; the tail goes element by element.
#pragma once
#include <metal_stdlib>
using namespace metal;

// v[i] = row[c0 + i] as float, `fill` past the end of the row.
template <uint N, typename T>
inline void load_row_elements(device const T* row, uint c0, uint cols, float fill, thread float* v) {
  if (c0 + N <= cols) {
    for (uint i = 0; i < N; ++i) {
      v[i] = float(row[c0 + i]);
    }
  } else {
    for (uint i = 0; i < N; ++i) {
      v[i] = c0 + i < cols ? float(row[c0 + i]) : fill;
    }
  }
}

// row[c0 + i] = v[i] rounded to T, for the elements inside the row.
template <uint N, typename T>
inline void store_row_elements(device T* row, uint c0, uint cols, const thread float* v) {
  if (c0 + N <= cols) {
    for (uint i = 0; i < N; ++i) {
      row[c0 + i] = static_cast<T>(v[i]);
    }
  } else {
    for (uint i = 0; i < N; ++i) {
      if (c0 + i < cols) {
        row[c0 + i] = static_cast<T>(v[i]);
      }
    }
  }
}
