// The shader libraries and pipeline states of the MPS backend: compiled once per process, cached per kernel.
#pragma once

#import <Metal/Metal.h>

#include <string>

namespace tmf::mps {

// The pipeline for a kernel host name (e.g. "softmax_forward_single_row_half"); compiled on first use,
// cached, thread-safe. Throws a clear error when the kernel is missing (e.g. bfloat before macOS 14).
id<MTLComputePipelineState> pipeline(const std::string& name);
bool supports_bfloat16();

}  // namespace tmf::mps
