// C entry points of the Metal-on-CPU harness, called from torch_metal_fused/backends/emulated.py through
// ctypes. Each runs the same launch code as the MPS dispatch (csrc/include/tmf/launch/*.h) on an EmuEncoder
// and returns a report of the dispatches (kernel, grid, traffic per buffer, checker findings).
#include <cstdio>
#include <sstream>
#include <string>

#include "tmf/launch/cross_entropy.h"
#include "tmf/launch/glu.h"
#include "tmf/launch/rope.h"
#include "tmf/launch/lora_linear.h"
#include "tmf/launch/rms_norm.h"
#include "tmf/launch/softmax.h"
#include "tmf_emu/emu_encoder.h"

namespace {

using tmf::launch::DeviceBuffer;
using tmf::launch::DType;

struct TensorArg {  // mirrors TensorArg in emulated.py
  void* base;
  uint64_t nbytes;
  uint64_t offset;
};

DeviceBuffer buf(const TensorArg& t) { return DeviceBuffer{t.base, size_t(t.offset), size_t(t.nbytes)}; }

thread_local std::string g_report;
thread_local std::string g_faults;  // tmf_emu_set_faults
thread_local uint32_t g_gpu_cores = tmf_emu::kHarnessGpuCores;  // tmf_emu_set_gpu_cores

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
  enc.cores = g_gpu_cores;
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

// The GPU core count the next launches on this thread plan for (see tmf_emu::kHarnessGpuCores).
void tmf_emu_set_gpu_cores(uint32_t cores) { g_gpu_cores = cores; }

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

const char* tmf_emu_softmax_forward(int checking, uint32_t max_threads, int dtype, TensorArg x, uint64_t x_stride,
                                    TensorArg y, uint64_t rows, uint64_t cols) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::softmax_forward(enc, DType(dtype), buf(x), x_stride, buf(y), rows, cols);
  });
}

const char* tmf_emu_softmax_backward(int checking, uint32_t max_threads, int dtype, TensorArg y, TensorArg dy,
                                     uint64_t dy_stride, TensorArg dx, uint64_t rows, uint64_t cols) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::softmax_backward(enc, DType(dtype), buf(y), buf(dy), dy_stride, buf(dx), rows, cols);
  });
}

const char* tmf_emu_rms_norm_forward(int checking, uint32_t max_threads, int dtype, TensorArg x, uint64_t x_stride,
                                     TensorArg weight, TensorArg y, TensorArg rstd, uint64_t rows, uint64_t cols,
                                     float eps, float weight_offset) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::rms_norm_forward(enc, DType(dtype), buf(x), x_stride, buf(weight), buf(y), buf(rstd), rows, cols,
                                  eps, weight_offset);
  });
}

const char* tmf_emu_rms_norm_backward(int checking, uint32_t max_threads, int dtype, TensorArg dy, uint64_t dy_stride,
                                      TensorArg x, uint64_t x_stride, TensorArg weight, TensorArg rstd, TensorArg dx,
                                      TensorArg dw_partial, TensorArg dw, uint64_t rows, uint64_t cols,
                                      float weight_offset) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::rms_norm_backward(enc, DType(dtype), buf(dy), dy_stride, buf(x), x_stride, buf(weight), buf(rstd),
                                   buf(dx), buf(dw_partial), buf(dw), rows, cols, weight_offset);
  });
}

// add_rms_norm: h = x + residual written and normalised in one pass; backward adds h's incoming gradient to dx.
const char* tmf_emu_rms_norm_add_forward(int checking, uint32_t max_threads, int dtype, TensorArg x, uint64_t x_stride,
                                         TensorArg residual, uint64_t residual_stride, TensorArg weight, TensorArg y,
                                         TensorArg h, TensorArg rstd, uint64_t rows, uint64_t cols, float eps,
                                         float weight_offset) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::rms_norm_forward(enc, DType(dtype), buf(x), x_stride, buf(weight), buf(y), buf(rstd), rows, cols,
                                  eps, weight_offset, buf(residual), residual_stride, buf(h));
  });
}

const char* tmf_emu_rms_norm_add_backward(int checking, uint32_t max_threads, int dtype, TensorArg dy,
                                          uint64_t dy_stride, TensorArg dh, uint64_t dh_stride, TensorArg h,
                                          TensorArg weight, TensorArg rstd, TensorArg dx, TensorArg dw_partial,
                                          TensorArg dw, uint64_t rows, uint64_t cols, float weight_offset) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::rms_norm_backward(enc, DType(dtype), buf(dy), dy_stride, buf(h), cols, buf(weight), buf(rstd),
                                   buf(dx), buf(dw_partial), buf(dw), rows, cols, weight_offset, buf(dh), dh_stride);
  });
}

uint32_t tmf_emu_rms_norm_backward_groups(uint64_t rows) {
  return tmf::launch::rms_norm_backward_groups(rows, g_gpu_cores);
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

const char* tmf_emu_lora_forward_lowrank(int checking, uint32_t max_threads, int dtype, TensorArg x,
                                         uint64_t x_stride, TensorArg lora_a, TensorArg lora_b, TensorArg mask,
                                         TensorArg y, TensorArg h, uint64_t tokens, uint64_t in_features,
                                         uint64_t out_features, uint64_t rank, float scale) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::lora_forward_lowrank(enc, DType(dtype), buf(x), x_stride, buf(lora_a), buf(lora_b), buf(mask),
                                      buf(y), buf(h), tokens, in_features, out_features, rank, scale);
  });
}

const char* tmf_emu_lora_backward_lowrank(int checking, uint32_t max_threads, int dtype, TensorArg dy,
                                          uint64_t dy_stride, TensorArg lora_a, TensorArg lora_b, TensorArg mask,
                                          TensorArg dh, TensorArg dx, uint64_t tokens, uint64_t in_features,
                                          uint64_t out_features, uint64_t rank, float scale) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::lora_backward_lowrank(enc, DType(dtype), buf(dy), dy_stride, buf(lora_a), buf(lora_b), buf(mask),
                                       buf(dh), buf(dx), tokens, in_features, out_features, rank, scale);
  });
}

const char* tmf_emu_cross_entropy_rows(int checking, uint32_t max_threads, int dtype, TensorArg logits,
                                      uint64_t row_stride, TensorArg target, TensorArg row_scale, TensorArg loss,
                                      TensorArg grad, uint64_t rows, uint64_t vocab, int64_t ignore_index,
                                      float label_smoothing, float softcap) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::cross_entropy_rows(enc, DType(dtype), buf(logits), row_stride, buf(target), buf(row_scale),
                                    buf(loss), buf(grad), rows, vocab, ignore_index, label_smoothing, softcap);
  });
}

const char* tmf_emu_glu_forward(int checking, uint32_t max_threads, int dtype, uint64_t activation, TensorArg gate,
                                uint64_t gate_stride, TensorArg up, uint64_t up_stride, TensorArg out, uint64_t rows,
                                uint64_t cols) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::glu_forward(enc, DType(dtype), uint32_t(activation), buf(gate), gate_stride, buf(up), up_stride, buf(out), rows,
                             cols);
  });
}

const char* tmf_emu_glu_backward(int checking, uint32_t max_threads, int dtype, uint64_t activation, TensorArg gate,
                                 uint64_t gate_stride, TensorArg up, uint64_t up_stride, TensorArg dout,
                                 uint64_t dout_stride, TensorArg dgate, TensorArg dup, uint64_t rows, uint64_t cols) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::glu_backward(enc, DType(dtype), uint32_t(activation), buf(gate), gate_stride, buf(up), up_stride, buf(dout),
                              dout_stride, buf(dgate), buf(dup), rows, cols);
  });
}

// q and k: {buffer, batch stride, head stride, seq stride, heads} each, as tmf::launch::RopeOperand.
const char* tmf_emu_rope_apply(int checking, uint32_t max_threads, int dtype, TensorArg q, uint64_t q_batch_stride,
                               uint64_t q_head_stride, uint64_t q_seq_stride, uint64_t q_heads, TensorArg k,
                               uint64_t k_batch_stride, uint64_t k_head_stride, uint64_t k_seq_stride,
                               uint64_t k_heads, TensorArg cos_table, TensorArg sin_table, uint64_t cos_batches,
                               TensorArg q_out, TensorArg k_out, uint64_t batch, uint64_t seq, uint64_t head_dim,
                               uint64_t rotary_dim, uint64_t interleaved, uint64_t backward) {
  return run(checking, max_threads, [&](auto& enc) {
    tmf::launch::rope_apply(enc, DType(dtype), {buf(q), q_batch_stride, q_head_stride, q_seq_stride, q_heads},
                            {buf(k), k_batch_stride, k_head_stride, k_seq_stride, k_heads}, buf(cos_table),
                            buf(sin_table), cos_batches, buf(q_out), buf(k_out), batch, seq, head_dim, rotary_dim,
                            interleaved != 0, backward != 0);
  });
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
