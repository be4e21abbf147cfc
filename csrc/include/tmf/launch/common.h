// Host-side definitions shared by the Metal-on-CPU harness (csrc/emu/) and the compiled CUDA extension: the
// KernelUnavailable error, and what the harness's encoder reports about a pipeline. The Metal launch
// plans themselves are Python (torch_metal_fused/backends/metal.py), executed on a Mac through
// torch.mps.compile_shader and in CI through the harness's stand-in for it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace tmf::launch {

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

inline uint32_t ceil_div(uint64_t a, uint64_t b) { return uint32_t((a + b - 1) / b); }

}  // namespace tmf::launch
