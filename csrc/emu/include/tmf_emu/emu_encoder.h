// The harness's Encoder (see csrc/include/tmf/launch/common.h): the same calls the MPS dispatch makes on an
// MTLComputeCommandEncoder, executed at once on the CPU by the runner in runtime.cpp.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tmf/launch/common.h"

namespace tmf_emu {

using tmf::launch::DeviceBuffer;
using tmf::launch::Size3;

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
  uint32_t max_threads = 1024;  // what the emulated pipeline reports as maxTotalThreadsPerThreadgroup

  void set_kernel(const std::string& name) {
    if (!kernel_exists(name)) throw std::invalid_argument("no Metal kernel named " + name + " in shaders/");
    kernel = name;
  }
  uint32_t max_threads_per_threadgroup() const { return max_threads; }
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
    reports.emplace_back();
    run_dispatch(*this, groups, threads, reports.back());
  }
};

}  // namespace tmf_emu
