// The MPS implementation of the Encoder used by the shared launch code (csrc/include/tmf/launch/common.h):
// it encodes onto PyTorch's own MPS stream. Use only through run_on_mps_stream().
#pragma once

#import <Metal/Metal.h>

#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <algorithm>
#include <exception>

#include "metal_status.h"
#include "tmf/launch/common.h"

namespace tmf::mps {

using launch::DeviceBuffer;
using launch::DType;
using launch::Pipeline;
using launch::Size3;

// MPSDevice::getCoreCount() first shipped in torch 2.9; the package accepts older torch (setup.py).
#ifndef TMF_TORCH_HAS_MPS_CORE_COUNT
#define TMF_TORCH_HAS_MPS_CORE_COUNT (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9))
#endif

// The GPU's core count (IORegistry, through ATen), read once: launch plans size their grids and the RMSNorm
// backward's partial buffer from it.
inline uint32_t gpu_core_count() {
#if TMF_TORCH_HAS_MPS_CORE_COUNT
  static const uint32_t cores = std::max<uint32_t>(1, at::mps::MPSDevice::getInstance()->getCoreCount());
#else
  static const uint32_t cores = launch::kStandInGpuCores;  // no core count before torch 2.9
#endif
  return cores;
}

// The stream's compute encoder is fetched on the first encoding call, after the launch code has selected its
// pipelines: a launch that throws KernelUnavailable (the reference then serves the call) touches nothing.
class MPSEncoder {
 public:
  explicit MPSEncoder(at::mps::MPSStream* stream) : stream_(stream) {}

  Pipeline pipeline(const std::string& kernel) { return mps::pipeline(kernel); }
  uint32_t gpu_cores() const { return gpu_core_count(); }
  void set_pipeline(const Pipeline& p) {
    [encoder() setComputePipelineState:(__bridge id<MTLComputePipelineState>)p.handle];
  }
  void set_buffer(int index, const DeviceBuffer& b) {
    [encoder() setBuffer:(id<MTLBuffer>)b.handle offset:b.offset atIndex:index];
  }
  void set_bytes(int index, const void* data, size_t size) { [encoder() setBytes:data length:size atIndex:index]; }
  void set_threadgroup_memory(int index, size_t bytes) {
    [encoder() setThreadgroupMemoryLength:(bytes + 15) & ~size_t(15) atIndex:index];
  }
  void dispatch_threadgroups(Size3 groups, Size3 threads) {
    [encoder() dispatchThreadgroups:MTLSizeMake(groups.x, groups.y, groups.z)
              threadsPerThreadgroup:MTLSizeMake(threads.x, threads.y, threads.z)];
  }

 private:
  id<MTLComputeCommandEncoder> encoder() {
    if (!encoder_) encoder_ = stream_->commandEncoder();
    return encoder_;
  }
  at::mps::MPSStream* stream_;
  id<MTLComputeCommandEncoder> encoder_ = nil;
};

// A tensor's storage as a Metal buffer, bound at the tensor's storage offset (a view's first element).
inline DeviceBuffer buffer_of(const at::Tensor& t) {
  if (!t.defined()) return DeviceBuffer{};
  // An MPS tensor's storage data pointer is its id<MTLBuffer> (what ATen's getMTLBufferStorage returns).
  return DeviceBuffer{const_cast<void*>(t.storage().data()), size_t(t.storage_offset() * t.element_size()),
                      size_t(t.storage().nbytes())};
}

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::float32;
    case at::kHalf: return DType::float16;
    case at::kBFloat16: return DType::bfloat16;
    default: TORCH_CHECK(false, "torch_metal_fused: Metal kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Encode on PyTorch's current MPS stream, inside its serial queue: the stream owns the command buffer and
// the encoder (we never create, end or commit our own), so our kernels order with PyTorch's own work.
// Exceptions (KernelUnavailable, TORCH_CHECK) are caught inside the block and its autorelease pool, and rethrown
// with their type on the calling thread (torch's own dispatch_sync_with_rethrow moved namespaces in torch 2.10;
// this is the same few lines, for every torch the package supports).
template <class F>
void run_on_mps_stream(const F& encode) {
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  __block std::exception_ptr error;
  dispatch_sync(stream->queue(), ^() {
    @autoreleasepool {
      try {
        MPSEncoder enc(stream);
        encode(enc);
      } catch (...) {
        error = std::current_exception();
      }
    }
  });
  if (error) std::rethrow_exception(error);
}

}  // namespace tmf::mps
