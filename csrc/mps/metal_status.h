// The MPS backend's pipelines and what it reports about this system's Metal (plain C++: bindings.cpp includes it
// too). Implemented in metal_library.mm: one library per kernel family (shader file), compiled on first use of
// one of its kernels; every outcome, failures included, cached for the process.
#pragma once

#include <string>
#include <vector>

#include "tmf/launch/common.h"

namespace tmf::mps {

// The pipeline of a kernel host name (e.g. "softmax_forward_single_row_half"), thread-safe. Throws
// launch::KernelUnavailable (scope family, with the compiler's message) when its family's library or the
// pipeline cannot be built; the same failure is rethrown, never retried, on later calls.
launch::Pipeline pipeline(const std::string& kernel);

// A kernel family's library (`python -m torch_metal_fused.doctor` prints it); family_status compiles it if not
// tried yet.
struct FamilyStatus {
  bool compiled = false;
  std::string source;  // "metallib" (prebuilt at install) or "source" (compiled at first use)
  double compile_ms = 0;
  std::string error;  // the compiler's message when !compiled
};
FamilyStatus family_status(const std::string& family);
// Why the metallib embedded at install did not load (the sources were compiled instead); "" if it did or none.
std::string prebuilt_metallib_error();

// The kernel host names in a family's embedded shader source (its [[host_name("...")]] attributes).
std::vector<std::string> kernel_names(const std::string& family);

bool supports_bfloat16();
std::string metal_language_version();
std::string device_name();

}  // namespace tmf::mps
