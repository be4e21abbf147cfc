// Host-side launch code shared by the MPS dispatch (csrc/mps/*.mm) and the Metal-on-CPU harness
// (csrc/emu/): every decision about which kernel runs, with what grid, threadgroup size, buffers,
// arguments and threadgroup memory is made here, once, for both.
//
// An Encoder provides:
//   Pipeline pipeline(const std::string& kernel);        // built once per process, then cached; throws
//                                                         // KernelUnavailable (scope family) when the kernel's
//                                                         // library or pipeline cannot be built
//   void set_pipeline(const Pipeline& p);
//   void set_buffer(int index, const DeviceBuffer& b);   // bound at b.offset bytes
//   void set_bytes(int index, const void* data, size_t size);
//   void set_threadgroup_memory(int index, size_t bytes);
//   uint32_t gpu_cores();                                 // the GPU's core count (MPS), or the harness's stand-in
//   void dispatch_threadgroups(Size3 groups, Size3 threads_per_group);
//
// Every launch function selects all its pipelines (select_pipeline) and its plan before it encodes anything,
// so a KernelUnavailable leaves nothing half-encoded and the caller can serve the call another way (the
// Python backend selection falls back to the reference: torch_metal_fused/_backend.py).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "tmf/shader_args.h"

namespace tmf::launch {

// Kernel families: one per shader file (shaders/<name>.metal), compiled as one library on first use of one of
// its kernels; every kernel host name starts with its family's prefix. A family whose library or a pipeline
// cannot be built is served by the reference for the rest of the process.
struct KernelFamily {
  const char* name;
  const char* kernel_prefix;
};
inline constexpr KernelFamily kKernelFamilies[] = {
    {"softmax", "softmax_"},
    {"rms_norm", "rms_norm_"},
    {"lora_linear", "lora_"},
    {"cross_entropy", "cross_entropy_"},
    {"glu", "glu_"},
    {"rope", "rope_"},
};

inline const char* family_of(const std::string& kernel) {
  for (const KernelFamily& f : kKernelFamilies) {
    if (kernel.rfind(f.kernel_prefix, 0) == 0) return f.name;
  }
  throw std::invalid_argument("kernel " + kernel + " belongs to no kernel family (tmf/launch/common.h)");
}

// Why a launch cannot run on our kernels. Thrown before anything is encoded.
//  - scope family: the family's library or one of its pipelines cannot be built, or the pipeline does not run
//    32-wide SIMD-groups: the family is served by the reference for the rest of the process.
//  - scope call: no launch plan fits this call's shape on this device's pipelines (e.g. a LoRA rank above the
//    pipeline's thread limit): this call is served by the reference.
class KernelUnavailable : public std::runtime_error {
 public:
  enum class Scope { family, call };
  KernelUnavailable(std::string family, Scope scope, const std::string& reason)
      : std::runtime_error(reason), family_(std::move(family)), scope_(scope) {}
  const std::string& family() const { return family_; }
  Scope scope() const { return scope_; }
  const char* scope_name() const { return scope_ == Scope::family ? "family" : "call"; }

 private:
  std::string family_;
  Scope scope_;
};

// A compute pipeline as the launch code sees it: an opaque handle (id<MTLComputePipelineState> on Metal) and
// the two limits every plan depends on.
struct Pipeline {
  void* handle = nullptr;
  std::string kernel;
  uint32_t max_threads = 0;      // maxTotalThreadsPerThreadgroup
  uint32_t execution_width = 0;  // threadExecutionWidth
};

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

constexpr uint32_t kSimdWidth = 32;  // every kernel assumes 32-wide SIMD-groups (simd_sum, simd_shuffle, lanes)
constexpr uint32_t kReadsPerThread = kRowElementsPerThread;  // single_row variants: elements cached per thread
constexpr uint32_t kSimdRowsMaxCols = 256;    // simd_rows variants: at most 8 elements per lane
constexpr uint32_t kSimdRowsPerGroup = 8;     // simd_rows variants: rows (SIMD-groups) per threadgroup
// Threadgroups per GPU core a launch aims for before it packs more rows into a group (latency hiding).
constexpr uint32_t kGroupsPerCore = 4;
// The GPU core count a launch plans for where the real one is not known: the harness's default, and on a Mac with
// torch < 2.9 (no MPSDevice::getCoreCount()). 10 is the largest base chip's (M2, M3, M4); Pro and Max chips have
// 14-40. The count only sizes grids and the RMSNorm backward's partial buffer: a wrong one costs speed, not results.
constexpr uint32_t kStandInGpuCores = 10;
// A kernel that keeps a per-column operand in registers (RMSNorm's weight) re-reads it for every row walker (a
// threadgroup, or a SIMD-group in simd_rows): walking at least this many rows keeps the re-reads under
// 1 / (2 · 20) = 2.5 % of the traffic (x read and y written once per row).
constexpr uint32_t kMinRowsPerOperandRead = 20;

inline uint32_t ceil_div(uint64_t a, uint64_t b) { return uint32_t((a + b - 1) / b); }
inline uint32_t round_up(uint32_t v, uint32_t m) { return ceil_div(v, m) * m; }
inline uint32_t round_down(uint32_t v, uint32_t m) { return v / m * m; }

inline std::string kernel_name(const char* base, const char* variant, DType t) {
  return std::string(base) + "_" + variant + "_" + dtype_suffix(t);
}

// The pipeline of `kernel`, checked against what every kernel assumes: 32-wide SIMD-groups (else the family is
// unusable on this device) and room for at least one SIMD-group (else no plan fits).
template <class Encoder>
Pipeline select_pipeline(Encoder& enc, const std::string& kernel) {
  Pipeline p = enc.pipeline(kernel);
  if (p.execution_width != kSimdWidth) {
    throw KernelUnavailable(family_of(kernel), KernelUnavailable::Scope::family,
                            "pipeline " + kernel + " has threadExecutionWidth " + std::to_string(p.execution_width) +
                                "; the kernels assume 32-wide SIMD-groups");
  }
  if (p.max_threads < kSimdWidth) {
    throw KernelUnavailable(family_of(kernel), KernelUnavailable::Scope::call,
                            "pipeline " + kernel + " allows " + std::to_string(p.max_threads) +
                                " threads per threadgroup, fewer than one SIMD-group");
  }
  return p;
}

// How a row-wise kernel family (softmax forward/backward, RMSNorm forward) covers `rows` x `cols`:
//  - simd_rows  (cols <= 256): one SIMD-group per row, 8 SIMD-groups per threadgroup; each lane caches <= 8
//    elements.
//  - single_row (cols <= 8 * max threads, so up to 8192): one threadgroup per row, each thread caches 8
//    contiguous elements in registers, so x is read once and y written once.
//  - looped     (longer rows): one threadgroup per row, up to 1024 threads striding over the row; reads
//    the input twice (see each kernel's notes).
// Row walkers (a SIMD-group in simd_rows, else a threadgroup) take one row each, unless the kernel re-reads a
// per-column operand per walker (`reuses_column_operand`: RMSNorm's weight): then each walks
// max(kMinRowsPerOperandRead, rows / (kGroupsPerCore · cores · walkers per group)) rows, so the operand costs
// <= 2.5 % of the traffic and, where there are enough rows, every core still gets kGroupsPerCore groups. With
// fewer than kGroupsPerCore · cores · 20 rows not every core gets that many: such launches move less than a few MB,
// where launch latency, not bandwidth, sets the time.
struct RowPlan {
  Pipeline pipeline;
  Size3 groups, threads;
  uint32_t rows_per_group = 1;
};

inline uint32_t rows_per_walker(uint32_t rows, bool reuses_column_operand, uint32_t walkers_per_group,
                                uint32_t gpu_cores) {
  if (!reuses_column_operand) return 1;
  const uint64_t walkers_wanted = uint64_t(kGroupsPerCore) * std::max<uint32_t>(gpu_cores, 1) * walkers_per_group;
  return std::max<uint32_t>(kMinRowsPerOperandRead, ceil_div(rows, walkers_wanted));
}

template <class Encoder>
RowPlan plan_rows(Encoder& enc, const char* base, DType t, uint32_t rows, uint32_t cols,
                  bool reuses_column_operand = false) {
  RowPlan plan;
  if (cols <= kSimdRowsMaxCols) {
    plan.pipeline = select_pipeline(enc, kernel_name(base, "simd_rows", t));
    const uint32_t max_simd = std::min(kSimdRowsPerGroup, plan.pipeline.max_threads / kSimdWidth);
    const uint32_t per_walker = rows_per_walker(rows, reuses_column_operand, max_simd, enc.gpu_cores());
    const uint32_t n_simd = std::min(ceil_div(rows, per_walker), max_simd);
    plan.threads.x = n_simd * kSimdWidth;
    plan.rows_per_group = n_simd * per_walker;
  } else {
    uint32_t needed = round_up(ceil_div(cols, kReadsPerThread), kSimdWidth);
    plan.pipeline = select_pipeline(enc, kernel_name(base, "single_row", t));
    if (needed <= plan.pipeline.max_threads) {
      plan.threads.x = needed;
    } else {
      plan.pipeline = select_pipeline(enc, kernel_name(base, "looped", t));
      plan.threads.x = std::min<uint32_t>(1024, round_down(plan.pipeline.max_threads, kSimdWidth));
    }
    plan.rows_per_group = rows_per_walker(rows, reuses_column_operand, 1, enc.gpu_cores());
  }
  plan.rows_per_group = std::min(plan.rows_per_group, rows);
  plan.groups.x = ceil_div(rows, plan.rows_per_group);
  return plan;
}

inline void check_u32(uint64_t v, const char* what) {
  if (v > UINT32_MAX) throw std::invalid_argument(std::string(what) + " exceeds 2^32 - 1, the kernels' limit");
}

}  // namespace tmf::launch
