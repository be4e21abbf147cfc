// C entry points of the Metal-on-CPU harness, called from torch_metal_fused/emulator/runner.py through ctypes: a
// dispatch as torch.mps.compile_shader encodes it (the stand-in, emulator/compile_shader.py), a raw dispatch (the
// harness's own tests), pipeline limits and kernel names; each dispatch returns a report (kernel, grid, traffic per
// buffer, checker findings). Plus the CUDA backend's shared C++ rules, so that CI tests them.
#include <cstdio>
#include <sstream>
#include <string>

#include "tmf/launch/lora_linear.h"
#include "tmf_emu/emu_encoder.h"

namespace {

using tmf::launch::DeviceBuffer;

struct TensorArg {  // mirrors TensorArg in emulated.py
  void* base;
  uint64_t nbytes;
  uint64_t offset;
};

DeviceBuffer buf(const TensorArg& t) { return DeviceBuffer{t.base, size_t(t.offset), size_t(t.nbytes)}; }

thread_local std::string g_report;
thread_local std::string g_faults;  // tmf_emu_set_faults

const char* write_report(const tmf_emu::EmuEncoder& enc) {
  std::ostringstream out;
  for (const auto& r : enc.reports) {
    out << "dispatch\t" << r.kernel << '\t' << r.groups.x << ',' << r.groups.y << ',' << r.groups.z << '\t'
        << r.threads.x << ',' << r.threads.y << ',' << r.threads.z << '\t' << r.threadgroup_memory << '\n';
    for (const auto& [index, t] : r.traffic)
      out << "traffic\t" << index << '\t' << t.bytes_read << '\t' << t.bytes_written << '\n';
    for (const auto& e : r.errors)
      out << "error\t" << e.kind << '\t' << e.file << '\t' << e.line << '\t' << e.pc << '\t' << e.count << '\t'
          << e.message << '\t' << e.buffer << '\n';
    if (!r.aborted.empty()) out << "aborted\t" << r.aborted << '\n';
  }
  g_report = out.str();
  return g_report.c_str();
}

template <class F>
const char* run(int checking, uint32_t max_threads, F&& launch) {
  tmf_emu::EmuEncoder enc;
  enc.checking = checking != 0;
  enc.max_threads = max_threads;
  enc.faults.spec = g_faults;
  try {
    launch(enc);
  } catch (const tmf::launch::KernelUnavailable& e) {
    // The dispatches made before it stay in the report: launch code must select every pipeline before encoding
    // anything, and the tests check that none were made.
    write_report(enc);
    g_report += std::string("unavailable\t") + e.family() + '\t' + e.scope_name() + '\t' + e.what() + "\n";
    return g_report.c_str();
  } catch (const std::exception& e) {
    g_report = std::string("exception\t") + e.what() + "\n";
    return g_report.c_str();
  }
  return write_report(enc);
}

}  // namespace

extern "C" {

// The faults the next launches on this thread emulate (see tmf_emu::Faults).
void tmf_emu_set_faults(const char* spec) { g_faults = spec ? spec : ""; }


// A kernel's pipeline as the launch code would get it (faults applied): "pipeline\t<max threads>\t<execution
// width>", or an "unavailable" line. For `python -m torch_metal_fused.doctor`.
const char* tmf_emu_pipeline_info(uint32_t max_threads, const char* kernel) {
  tmf_emu::EmuEncoder enc;
  enc.max_threads = max_threads;
  enc.faults.spec = g_faults;
  try {
    const tmf::launch::Pipeline p = enc.pipeline(kernel);
    g_report = "pipeline\t" + std::to_string(p.max_threads) + '\t' + std::to_string(p.execution_width) + "\n";
  } catch (const tmf::launch::KernelUnavailable& e) {
    g_report = std::string("unavailable\t") + e.family() + '\t' + e.scope_name() + '\t' + e.what() + "\n";
  }
  return g_report.c_str();
}

const char* tmf_emu_kernel_names() {
  static std::string names;
  names.clear();
  for (auto& n : tmf_emu::kernel_names()) names += n + "\n";
  return names.c_str();
}

int tmf_emu_lora_use_merged_weight(uint64_t tokens, uint64_t in_features, int has_dropout) {
  return tmf::launch::lora_use_merged_weight(tokens, in_features, has_dropout != 0) ? 1 : 0;
}

// The CUDA backend's K-concatenated GEMM rules (no Metal kernel: exposed here so that CI tests the shared rule).
int tmf_emu_lora_kconcat_gemm_is_pingpong(uint64_t rows, uint64_t cols) {
  return tmf::launch::lora_kconcat_gemm_for(rows, cols) == tmf::launch::LoraKConcatGemm::pingpong_128x128 ? 1 : 0;
}

int tmf_emu_lora_kconcat_fills_device(uint64_t tokens, uint64_t in_features, uint64_t out_features, uint64_t sms) {
  return tmf::launch::lora_kconcat_fills_device(tokens, in_features, out_features, sms) ? 1 : 0;
}

}  // extern "C"

extern "C" {

// One dispatch as torch.mps.compile_shader encodes it (torch_metal_fused/emulator/compile_shader.py): the kernel's
// pipeline as a Mac builds it (faults and the pipeline's thread limit applied), buffers by [[buffer(n)]] index, and
// constant data (Python ints, floats and lists) set with setBytes, not counted as device traffic.
const char* tmf_emu_encode(int checking, uint32_t max_threads, const char* kernel, int n_buffers,
                           const int* buffer_indices, const TensorArg* buffers, int n_bytes, const int* bytes_indices,
                           const void* const* bytes_data, const uint64_t* bytes_sizes, const uint32_t* groups,
                           const uint32_t* threads) {
  return run(checking, max_threads, [&](auto& enc) {
    enc.set_pipeline(enc.pipeline(kernel));
    for (int i = 0; i < n_buffers; ++i) enc.set_buffer(buffer_indices[i], buf(buffers[i]));
    for (int i = 0; i < n_bytes; ++i) enc.set_bytes(bytes_indices[i], bytes_data[i], size_t(bytes_sizes[i]));
    enc.dispatch_threadgroups(tmf::launch::Size3{groups[0], groups[1], groups[2]},
                              tmf::launch::Size3{threads[0], threads[1], threads[2]});
  });
}

// A raw dispatch of any kernel, for the harness's own tests: buffers by [[buffer(n)]] index, threadgroup
// memory lengths by [[threadgroup(n)]] index.
const char* tmf_emu_dispatch(int checking, uint32_t max_threads, const char* kernel, int n_buffers,
                             const int* buffer_indices, const TensorArg* buffers, int n_tg,
                             const int* tg_indices, const uint64_t* tg_bytes, const uint32_t* groups,
                             const uint32_t* threads) {
  return run(checking, max_threads, [&](auto& enc) {
    enc.set_kernel_unchecked(kernel);
    for (int i = 0; i < n_buffers; ++i) enc.set_buffer(buffer_indices[i], buf(buffers[i]));
    for (int i = 0; i < n_tg; ++i) enc.set_threadgroup_memory(tg_indices[i], size_t(tg_bytes[i]));
    enc.dispatch_threadgroups(tmf::launch::Size3{groups[0], groups[1], groups[2]},
                              tmf::launch::Size3{threads[0], threads[1], threads[2]});
  });
}

}  // extern "C"
