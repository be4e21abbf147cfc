// The harness's Encoder: the calls torch.mps.compile_shader's kernels make on an
// MTLComputeCommandEncoder, executed at once on the CPU by the runner in runtime.cpp.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "tmf/launch/common.h"
#include "tmf_emu_families.h"  // generated from torch_metal_fused/_families.py by emulator/build.py

namespace tmf_emu {

using tmf::launch::DeviceBuffer;
using tmf::launch::KernelUnavailable;
using tmf::launch::Pipeline;
using tmf::launch::Size3;

// Fault injection, so the fallback decisions (tmf/launch, torch_metal_fused/_backend.py) run end to end on
// Linux: a comma-separated list (TORCH_METAL_FUSED_EMU_FAULTS, or torch_metal_fused.emulator.runner.faults())
// of
//   compile:<family>             the family's library fails to compile
//   pipeline:<target>            building the pipeline fails
//   max_threads:<target>=<n>     the pipeline's maxTotalThreadsPerThreadgroup is n
//   simd_width:<target>=<n>      the pipeline's threadExecutionWidth is n
// where <target> is a family name or a kernel host name. (`no_bfloat` is read by the Python backend.)

struct Faults {
  std::string spec;

  // The value of fault `kind` for `kernel` ("" if absent; "1" for a fault without a value).
  std::string find(const std::string& kind, const std::string& kernel) const {
    std::stringstream items(spec);
    std::string item;
    while (std::getline(items, item, ',')) {
      const size_t colon = item.find(':');
      if (colon == std::string::npos || item.substr(0, colon) != kind) continue;
      std::string target = item.substr(colon + 1), value = "1";
      if (const size_t eq = target.find('='); eq != std::string::npos) {
        value = target.substr(eq + 1);
        target = target.substr(0, eq);
      }
      if (target == kernel || target == family_of(kernel)) return value;
    }
    return "";
  }
};

struct BoundBuffer {
  void* base = nullptr;  // start of the buffer (the tensor's storage)
  size_t nbytes = 0;
  size_t offset = 0;  // bind offset, as in setBuffer:offset:atIndex:
  bool argument_bytes = false;  // set with setBytes: a small constant argument, not counted as traffic
  void* address() const { return static_cast<char*>(base) + offset; }
  size_t size() const { return nbytes - offset; }
};

struct ErrorRecord {
  std::string kind, file;
  int line;
  uintptr_t pc;  // offset in the shader library, for symbolizing loads/stores (0 when file:line is known)
  std::string message;
  int count;
  int buffer = -1;  // the [[buffer(n)]] index an out-of-bounds access belongs to (-1: none or unknown)
};

struct Traffic {
  uint64_t bytes_read = 0, bytes_written = 0;
};

struct DispatchReport {
  std::string kernel;
  Size3 groups, threads;
  std::map<int, Traffic> traffic;  // by buffer index (counted in checking mode only)
  std::vector<ErrorRecord> errors;
  size_t threadgroup_memory = 0;
  // Set when the runner abandoned the dispatch (a fault, the watchdog, an access the checker stopped): the kind
  // of the finding that ended it. Nothing was copied back to the buffers.
  std::string aborted;
};

class EmuEncoder;
void run_dispatch(const EmuEncoder& enc, const Size3& groups, const Size3& threads, DispatchReport& report);
bool kernel_exists(const std::string& name);
std::vector<std::string> kernel_names();

class EmuEncoder {
 public:
  std::string kernel;
  std::map<int, BoundBuffer> buffers;
  std::map<int, size_t> threadgroup_memory;
  std::vector<std::unique_ptr<std::vector<unsigned char>>> bytes_storage;
  std::vector<DispatchReport> reports;
  bool checking = false;
  uint32_t max_threads = 1024;  // what the emulated pipelines report as maxTotalThreadsPerThreadgroup
  uint32_t pipeline_max_threads = 1024;  // the bound pipeline's limit (faults applied)
  Faults faults;

  // As the MPS pipeline cache: a kernel missing from its family's library, or a pipeline that cannot be built,
  // makes the family unavailable.
  Pipeline pipeline(const std::string& name) const {
    const std::string family = family_of(name);
    if (!faults.find("compile", name).empty()) {
      throw KernelUnavailable(family, KernelUnavailable::Scope::family,
                              "compiling " + family + ".metal failed: injected fault (TORCH_METAL_FUSED_EMU_FAULTS)");
    }
    if (!kernel_exists(name)) {
      throw KernelUnavailable(family, KernelUnavailable::Scope::family,
                              "the " + family + " library has no function named " + name);
    }
    if (!faults.find("pipeline", name).empty()) {
      throw KernelUnavailable(family, KernelUnavailable::Scope::family,
                              "building the pipeline for " + name + " failed: injected fault");
    }
    Pipeline p{nullptr, name, max_threads, 32};
    if (std::string v = faults.find("max_threads", name); !v.empty()) {
      p.max_threads = std::min<uint32_t>(p.max_threads, uint32_t(std::stoul(v)));
    }
    if (std::string v = faults.find("simd_width", name); !v.empty()) p.execution_width = uint32_t(std::stoul(v));
    return p;
  }
  void set_pipeline(const Pipeline& p) {
    kernel = p.kernel;
    pipeline_max_threads = p.max_threads;
  }
  // Any registered kernel, family or not (the harness's own test shaders), without the pipeline checks.
  void set_kernel_unchecked(const std::string& name) {
    if (!kernel_exists(name)) throw std::invalid_argument("no Metal kernel named " + name);
    kernel = name;
    pipeline_max_threads = UINT32_MAX;  // the checker's own limit (1024) applies
  }
  void set_buffer(int index, const DeviceBuffer& b) {
    buffers[index] = BoundBuffer{b.handle, b.nbytes, b.offset};
  }
  void set_bytes(int index, const void* data, size_t size) {
    if (size > 4096) throw std::invalid_argument("setBytes takes at most 4 KiB");
    bytes_storage.push_back(std::make_unique<std::vector<unsigned char>>(
        static_cast<const unsigned char*>(data), static_cast<const unsigned char*>(data) + size));
    buffers[index] = BoundBuffer{bytes_storage.back()->data(), size, 0, true};
  }
  void set_threadgroup_memory(int index, size_t bytes) { threadgroup_memory[index] = (bytes + 15) & ~size_t(15); }
  void dispatch_threadgroups(Size3 groups, Size3 threads) {
    // After an abandoned dispatch the rest of the command buffer does not run (as after a GPU fault): its inputs
    // were never written, and a second runaway dispatch would cost another watchdog period.
    if (!reports.empty() && !reports.back().aborted.empty()) return;
    // Metal rejects a dispatch with more threads per threadgroup than the pipeline allows: a launch plan that
    // ignores the pipeline's limit is an error here too, not a run a Mac would never make.
    const uint64_t per_group = uint64_t(threads.x) * threads.y * threads.z;
    if (per_group > pipeline_max_threads) {
      throw std::invalid_argument("dispatch of " + std::to_string(per_group) + " threads per threadgroup to " +
                                  kernel + ", whose pipeline allows " + std::to_string(pipeline_max_threads));
    }
    // setThreadgroupMemoryLength arguments beyond the device's 32 KiB fail Metal's validation as well (and would
    // overrun the runner's arena); kernel-local arrays are checked by the runner as threadgroups declare them.
    size_t threadgroup_arguments = 0;
    for (const auto& [index, bytes] : threadgroup_memory) threadgroup_arguments += bytes;
    if (threadgroup_arguments > 32 * 1024) {
      throw std::invalid_argument("dispatch of " + kernel + " with " + std::to_string(threadgroup_arguments) +
                                  " bytes of threadgroup memory arguments; Apple GPUs allow 32 KiB");
    }
    reports.emplace_back();
    run_dispatch(*this, groups, threads, reports.back());
  }
};

}  // namespace tmf_emu
