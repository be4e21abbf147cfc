// Compiles the embedded shader sources (or loads the prebuilt metallib) once per process and caches one
// pipeline state per kernel. Objects are created once and deliberately never released: no static
// destructor touches Metal at process exit.
#include "metal_library.h"

#include <ATen/mps/MPSDevice.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <unordered_map>
#include <vector>

#include "tmf_embedded_shaders.h"

namespace tmf::mps {
namespace {

struct Libraries {
  std::vector<id<MTLLibrary>> libraries;
  std::unordered_map<std::string, id<MTLComputePipelineState>> pipelines;
  std::mutex mutex;
};

id<MTLDevice> device() { return at::mps::MPSDevice::getInstance()->device(); }

Libraries* load() {
  // Callers may be outside any autorelease pool (a Python thread calling supports_bfloat16): drain our own.
  static Libraries* libs = [] { @autoreleasepool {
    auto* l = new Libraries();  // leaked on purpose (see above)
    NSError* error = nil;
    if (kEmbeddedMetallibSize > 0) {
      dispatch_data_t data = dispatch_data_create(kEmbeddedMetallib, kEmbeddedMetallibSize, nullptr,
                                                  DISPATCH_DATA_DESTRUCTOR_DEFAULT);
      id<MTLLibrary> lib = [device() newLibraryWithData:data error:&error];
      if (lib) {
        l->libraries.push_back(lib);
        return l;
      }
    }
    MTLCompileOptions* options = [[MTLCompileOptions alloc] init];
    if (@available(macOS 14.0, *)) {
      options.languageVersion = MTLLanguageVersion3_1;  // bfloat
    }
    options.fastMathEnabled = NO;  // -inf/NaN semantics of the kernels rely on IEEE arithmetic
    for (size_t i = 0; i < kEmbeddedShaderCount; ++i) {
      NSString* src = [NSString stringWithUTF8String:kEmbeddedShaders[i].source];
      id<MTLLibrary> lib = [device() newLibraryWithSource:src options:options error:&error];
      TORCH_CHECK(lib != nil, "torch_metal_fused: compiling ", kEmbeddedShaders[i].name, " failed: ",
                  error ? error.localizedDescription.UTF8String : "unknown error");
      l->libraries.push_back(lib);
    }
    [options release];
    return l;
  } }();
  return libs;
}

}  // namespace

id<MTLComputePipelineState> pipeline(const std::string& name) {
  Libraries* libs = load();
  std::lock_guard<std::mutex> lock(libs->mutex);
  auto it = libs->pipelines.find(name);
  if (it != libs->pipelines.end()) return it->second;
  NSString* fname = [NSString stringWithUTF8String:name.c_str()];
  for (id<MTLLibrary> lib : libs->libraries) {
    id<MTLFunction> fn = [lib newFunctionWithName:fname];
    if (!fn) continue;
    NSError* error = nil;
    id<MTLComputePipelineState> state = [device() newComputePipelineStateWithFunction:fn error:&error];
    [fn release];
    TORCH_CHECK(state != nil, "torch_metal_fused: pipeline for ", name, " failed: ",
                error ? error.localizedDescription.UTF8String : "unknown error");
    libs->pipelines.emplace(name, state);
    return state;
  }
  TORCH_CHECK(name.find("_bfloat") == std::string::npos,
              "torch_metal_fused: bfloat16 kernels need Metal 3.1 (macOS 14 or newer); use float16/float32 or "
              "TORCH_METAL_FUSED_BACKEND=reference");
  TORCH_CHECK(false, "torch_metal_fused: no Metal kernel named ", name);
  return nil;
}

bool supports_bfloat16() {
  Libraries* libs = load();
  for (id<MTLLibrary> lib : libs->libraries) {
    id<MTLFunction> fn = [lib newFunctionWithName:@"softmax_forward_single_row_bfloat"];
    if (fn) {
      [fn release];
      return true;
    }
  }
  return false;
}

}  // namespace tmf::mps
