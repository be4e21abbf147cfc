// One MTLLibrary per kernel family, compiled (or taken from the prebuilt metallib) on first use of one of its
// kernels, and one pipeline state per kernel. A family whose source Apple's compiler rejects fails alone: the
// other families still compile, and the Python backend serves the failed one by the reference with one warning
// (torch_metal_fused/_backend.py). Every outcome is cached, failures with their message, so nothing is retried.
// Objects are created once and deliberately never released: no static destructor touches Metal at exit.
// Manual retain/release (-fno-objc-arc): every new…/alloc object below is either kept in the cache or
// released on every path, the dispatch_data_t too; NSError out-parameters are autoreleased, and their
// messages are copied before our autorelease pool drains.
#import <Metal/Metal.h>

#include <ATen/mps/MPSDevice.h>

#include <chrono>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "metal_status.h"
#include "tmf_embedded_shaders.h"

namespace tmf::mps {
namespace {

using launch::KernelUnavailable;

struct FamilyLibrary {
  id<MTLLibrary> library = nil;
  FamilyStatus status;
};

struct PipelineEntry {
  launch::Pipeline pipeline;
  std::string error;  // non-empty: building it failed
};

struct Cache {
  std::mutex mutex;
  bool metallib_tried = false;
  id<MTLLibrary> metallib = nil;  // the prebuilt library of every family, where setup.py could build one
  std::string metallib_error;
  std::unordered_map<std::string, FamilyLibrary> families;
  std::unordered_map<std::string, PipelineEntry> pipelines;
};

Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose (see above)
  return *c;
}

id<MTLDevice> device() { return at::mps::MPSDevice::getInstance()->device(); }

std::string message_of(NSError* error) {
  return error ? std::string(error.localizedDescription.UTF8String) : std::string("unknown error");
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Metal 3.1 (bfloat); IEEE semantics for -inf/NaN and precise exp/log, as PyTorch's MetalShaderLibrary sets them
// (mathMode on macOS 15+, where fastMathEnabled is deprecated; fastMathEnabled = NO on macOS 14, our minimum).
// mathMode exists only in the macOS 15 SDK (Xcode 16): building with Xcode 15 on macOS 14 takes the old setting.
MTLCompileOptions* new_compile_options() {
  MTLCompileOptions* options = [[MTLCompileOptions alloc] init];
  options.languageVersion = MTLLanguageVersion3_1;
#if defined(__MAC_15_0)
  if (@available(macOS 15.0, *)) {
    options.mathMode = MTLMathModeSafe;
    options.mathFloatingPointFunctions = MTLMathFloatingPointFunctionsPrecise;
    return options;
  }
#endif
  options.fastMathEnabled = NO;
  return options;
}

void load_metallib(Cache& c) {
  c.metallib_tried = true;
  if (kEmbeddedMetallibSize == 0) return;
  // The bytes are static: an empty destructor block, so dispatch does not copy them.
  dispatch_data_t data = dispatch_data_create(kEmbeddedMetallib, kEmbeddedMetallibSize, nullptr, ^{});
  NSError* error = nil;
  c.metallib = [device() newLibraryWithData:data error:&error];
  dispatch_release(data);  // the library keeps what it needs
  if (!c.metallib) c.metallib_error = message_of(error);
}

FamilyLibrary& family_library(Cache& c, const std::string& family) {
  auto it = c.families.find(family);
  if (it != c.families.end()) return it->second;
  FamilyLibrary& fam = c.families[family];
  const auto t0 = std::chrono::steady_clock::now();
  if (!c.metallib_tried) load_metallib(c);
  if (c.metallib) {
    fam.library = [c.metallib retain];
    fam.status = FamilyStatus{true, "metallib", ms_since(t0), ""};
    return fam;
  }
  const std::string file = family + ".metal";
  const EmbeddedShader* shader = nullptr;
  for (size_t i = 0; i < kEmbeddedShaderCount; ++i) {
    if (file == kEmbeddedShaders[i].name) shader = &kEmbeddedShaders[i];
  }
  if (!shader) {
    fam.status.error = "no embedded source " + file;
    return fam;
  }
  MTLCompileOptions* options = new_compile_options();
  NSError* error = nil;
  fam.library = [device() newLibraryWithSource:[NSString stringWithUTF8String:shader->source]
                                       options:options
                                         error:&error];
  [options release];
  fam.status.compile_ms = ms_since(t0);
  fam.status.source = "source";
  fam.status.compiled = fam.library != nil;
  if (!fam.library) fam.status.error = "compiling " + file + " failed: " + message_of(error);
  return fam;
}

PipelineEntry build_pipeline(Cache& c, const std::string& family, const std::string& kernel) {
  FamilyLibrary& fam = family_library(c, family);
  if (!fam.library) return PipelineEntry{{}, fam.status.error};
  id<MTLFunction> fn = [fam.library newFunctionWithName:[NSString stringWithUTF8String:kernel.c_str()]];
  if (!fn) return PipelineEntry{{}, "the " + family + " library has no function named " + kernel};
  NSError* error = nil;
  id<MTLComputePipelineState> state = [device() newComputePipelineStateWithFunction:fn error:&error];
  [fn release];
  if (!state) return PipelineEntry{{}, "building the pipeline for " + kernel + " failed: " + message_of(error)};
  return PipelineEntry{launch::Pipeline{(__bridge void*)state, kernel, uint32_t(state.maxTotalThreadsPerThreadgroup),
                                        uint32_t(state.threadExecutionWidth)},
                       ""};
}

}  // namespace

launch::Pipeline pipeline(const std::string& kernel) {
  const std::string family = launch::family_of(kernel);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.pipelines.find(kernel);
  if (it == c.pipelines.end()) {
    @autoreleasepool {  // callers may be outside any pool (a Python thread)
      it = c.pipelines.emplace(kernel, build_pipeline(c, family, kernel)).first;
    }
  }
  if (!it->second.error.empty()) throw KernelUnavailable(family, KernelUnavailable::Scope::family, it->second.error);
  return it->second.pipeline;
}

FamilyStatus family_status(const std::string& family) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  @autoreleasepool {
    return family_library(c, family).status;
  }
}

std::string prebuilt_metallib_error() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.metallib_error;
}

// The deployment target is macOS 14 (tools/build_flags.py; torch 2.13's wheel needs it too), whose Metal 3.1
// has bfloat on every Apple GPU; the Python backend still asks, so the bfloat16 fallback has one source.
bool supports_bfloat16() { return true; }

std::vector<std::string> kernel_names(const std::string& family) {
  std::vector<std::string> names;
  const std::string file = family + ".metal", marker = "host_name(\"";
  for (size_t i = 0; i < kEmbeddedShaderCount; ++i) {
    if (file != kEmbeddedShaders[i].name) continue;
    const std::string source = kEmbeddedShaders[i].source;
    for (size_t at = source.find(marker); at != std::string::npos; at = source.find(marker, at)) {
      at += marker.size();
      names.push_back(source.substr(at, source.find('"', at) - at));
    }
  }
  return names;
}

std::string metal_language_version() { return "3.1"; }

std::string device_name() {
  @autoreleasepool {
    return std::string(device().name.UTF8String);
  }
}

}  // namespace tmf::mps
