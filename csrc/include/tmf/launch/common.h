// Host-side launch code shared by the MPS dispatch (csrc/mps/*.mm) and the Metal-on-CPU harness
// (csrc/emu/): every decision about which kernel runs, with what grid, threadgroup size, buffers,
// arguments and threadgroup memory is made here, once, for both.
//
// An Encoder provides:
//   void set_kernel(const std::string& name);            // selects (and caches) the pipeline
//   uint32_t max_threads_per_threadgroup();              // of the selected pipeline
//   void set_buffer(int index, const DeviceBuffer& b);   // bound at b.offset bytes
//   void set_bytes(int index, const void* data, size_t size);
//   void set_threadgroup_memory(int index, size_t bytes);
//   void dispatch_threadgroups(Size3 groups, Size3 threads_per_group);
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "tmf/shader_args.h"

namespace tmf::launch {

struct Size3 {
  uint32_t x = 1, y = 1, z = 1;
};

// A tensor's storage as the GPU sees it: the buffer (an id<MTLBuffer> on Metal, the storage's host address
// in the harness), the byte offset of the tensor's first element, and the buffer's size in bytes.
struct DeviceBuffer {
  void* handle = nullptr;
  size_t offset = 0;
  size_t nbytes = 0;
};

enum class DType { float32 = 0, float16 = 1, bfloat16 = 2 };

inline const char* dtype_suffix(DType t) {
  switch (t) {
    case DType::float32: return "float";
    case DType::float16: return "half";
    case DType::bfloat16: return "bfloat";
  }
  throw std::invalid_argument("unknown dtype");
}

constexpr uint32_t kSimdWidth = 32;
constexpr uint32_t kReadsPerThread = 4;       // single_row variants: elements cached per thread
constexpr uint32_t kSimdRowsMaxCols = 256;    // simd_rows variants: at most 8 elements per lane
constexpr uint32_t kSimdRowsPerGroup = 8;     // simd_rows variants: rows (SIMD-groups) per threadgroup

inline uint32_t ceil_div(uint64_t a, uint64_t b) { return uint32_t((a + b - 1) / b); }
inline uint32_t round_up(uint32_t v, uint32_t m) { return ceil_div(v, m) * m; }
inline uint32_t round_down(uint32_t v, uint32_t m) { return v / m * m; }

inline std::string kernel_name(const char* base, const char* variant, DType t) {
  return std::string(base) + "_" + variant + "_" + dtype_suffix(t);
}

// How a row-wise kernel family (softmax forward/backward, RMSNorm forward) covers `rows` x `cols`:
//  - simd_rows  (cols <= 256): one SIMD-group per row, 8 SIMD-groups per threadgroup; each lane caches <= 8
//    elements.
//  - single_row (cols <= 4 * max threads): one threadgroup per row, each thread caches 4 contiguous
//    elements in registers, so x is read once and y written once.
//  - looped     (longer rows): one threadgroup per row, up to 1024 threads striding over the row; reads
//    the input twice (see each kernel's notes).
// `rows_per_thread` > 1 makes each SIMD-group (simd_rows) or threadgroup (the others) walk that many rows,
// so a per-column operand (RMSNorm's weight) is read once per `rows_per_thread` rows instead of every row.
struct RowPlan {
  std::string kernel;
  Size3 groups, threads;
  uint32_t rows_per_group = 1;
};

template <class Encoder>
RowPlan plan_rows(Encoder& enc, const char* base, DType t, uint32_t rows, uint32_t cols, uint32_t rows_per_thread = 1) {
  RowPlan plan;
  if (cols <= kSimdRowsMaxCols) {
    plan.kernel = kernel_name(base, "simd_rows", t);
    enc.set_kernel(plan.kernel);
    uint32_t max_simd = std::max<uint32_t>(1, enc.max_threads_per_threadgroup() / kSimdWidth);
    uint32_t n_simd = std::min({kSimdRowsPerGroup, ceil_div(rows, rows_per_thread), max_simd});
    plan.threads.x = n_simd * kSimdWidth;
    plan.rows_per_group = n_simd * rows_per_thread;
  } else {
    uint32_t needed = round_up(ceil_div(cols, kReadsPerThread), kSimdWidth);
    plan.kernel = kernel_name(base, "single_row", t);
    enc.set_kernel(plan.kernel);
    if (needed <= enc.max_threads_per_threadgroup()) {
      plan.threads.x = needed;
    } else {
      plan.kernel = kernel_name(base, "looped", t);
      enc.set_kernel(plan.kernel);
      plan.threads.x = std::min<uint32_t>(1024, round_down(enc.max_threads_per_threadgroup(), kSimdWidth));
    }
    plan.rows_per_group = rows_per_thread;
  }
  plan.rows_per_group = std::min(plan.rows_per_group, rows);
  plan.groups.x = ceil_div(rows, plan.rows_per_group);
  return plan;
}

inline void check_u32(uint64_t v, const char* what) {
  if (v > UINT32_MAX) throw std::invalid_argument(std::string(what) + " exceeds 2^32 - 1, the kernels' limit");
}

}  // namespace tmf::launch
