// The MPS implementation of the Encoder used by the shared launch code (csrc/include/tmf/launch/common.h):
// it encodes onto PyTorch's own MPS stream. Use only through run_on_mps_stream().
#pragma once

#import <Metal/Metal.h>

#include <ATen/mps/MPSStream.h>
#include <torch/extension.h>

#include "metal_library.h"
#include "tmf/launch/common.h"

namespace tmf::mps {

using launch::DeviceBuffer;
using launch::DType;
using launch::Size3;

class MPSEncoder {
 public:
  explicit MPSEncoder(id<MTLComputeCommandEncoder> encoder) : encoder_(encoder) {}

  void set_kernel(const std::string& name) {
    pipeline_ = pipeline(name);
    [encoder_ setComputePipelineState:pipeline_];
  }
  uint32_t max_threads_per_threadgroup() const { return uint32_t(pipeline_.maxTotalThreadsPerThreadgroup); }
  void set_buffer(int index, const DeviceBuffer& b) {
    [encoder_ setBuffer:(id<MTLBuffer>)b.handle offset:b.offset atIndex:index];
  }
  void set_bytes(int index, const void* data, size_t size) { [encoder_ setBytes:data length:size atIndex:index]; }
  void set_threadgroup_memory(int index, size_t bytes) {
    [encoder_ setThreadgroupMemoryLength:(bytes + 15) & ~size_t(15) atIndex:index];
  }
  void dispatch_threadgroups(Size3 groups, Size3 threads) {
    [encoder_ dispatchThreadgroups:MTLSizeMake(groups.x, groups.y, groups.z)
             threadsPerThreadgroup:MTLSizeMake(threads.x, threads.y, threads.z)];
  }

 private:
  id<MTLComputeCommandEncoder> encoder_;
  id<MTLComputePipelineState> pipeline_ = nil;
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
template <class F>
void run_on_mps_stream(const F& encode) {
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  at::mps::dispatch_sync_with_rethrow(stream->queue(), ^() {
    @autoreleasepool {
      MPSEncoder enc(stream->commandEncoder());
      encode(enc);
    }
  });
}

}  // namespace tmf::mps
