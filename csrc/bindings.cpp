// Python module torch_metal_fused._C: the compiled backend's kernel entry points (see csrc/ops.h).
#include "ops.h"
#include "tmf/launch/common.h"

#ifdef TMF_WITH_METAL
#include "mps/metal_status.h"
#endif

namespace {

// tmf::launch::KernelUnavailable (thrown before anything is encoded) becomes the Python backend's
// KernelUnavailable, on which it serves the call by the reference (torch_metal_fused/_backend.py).
void translate_kernel_unavailable(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const tmf::launch::KernelUnavailable& e) {
    py::object cls = py::module_::import("torch_metal_fused._backend").attr("KernelUnavailable");
    py::object exc = cls(e.family(), e.scope_name(), e.what());
    PyErr_SetObject(cls.ptr(), exc.ptr());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_metal_fused compiled kernels";
  py::register_exception_translator(&translate_kernel_unavailable);
#ifdef TMF_WITH_METAL
  m.attr("HAS_METAL") = true;
  m.def("metal_supports_bfloat16", &tmf::mps::supports_bfloat16, "whether this system's Metal has bfloat");
  m.def("metal_language_version", &tmf::mps::metal_language_version);
  m.def("metal_device_name", &tmf::mps::device_name);
  m.def("metal_prebuilt_metallib_error", &tmf::mps::prebuilt_metallib_error);
  m.def("metal_kernel_names", &tmf::mps::kernel_names, "the kernel host names of a family's shader file");
  m.def(
      "metal_family_status",
      [](const std::string& family) {
        tmf::mps::FamilyStatus s = tmf::mps::family_status(family);
        py::dict d;
        d["compiled"] = s.compiled;
        d["source"] = s.source;
        d["compile_ms"] = s.compile_ms;
        d["error"] = s.error;
        return d;
      },
      "compiles a kernel family's library if not tried yet; whether it compiled, from what, how long, the error");
  m.def(
      "metal_pipeline_info",
      [](const std::string& kernel) {
        tmf::launch::Pipeline p = tmf::mps::pipeline(kernel);  // KernelUnavailable when it cannot be built
        py::dict d;
        d["max_threads"] = p.max_threads;
        d["execution_width"] = p.execution_width;
        return d;
      },
      "builds a kernel's pipeline if not yet built; its maxTotalThreadsPerThreadgroup and threadExecutionWidth");
#else
  m.attr("HAS_METAL") = false;
#endif
#ifdef TMF_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
  m.def("softmax_forward", &tmf::softmax_forward);
  m.def("softmax_backward", &tmf::softmax_backward);
  m.def("rms_norm_forward", &tmf::rms_norm_forward);
  m.def("rms_norm_backward", &tmf::rms_norm_backward);
  m.def("lora_forward", &tmf::lora_forward);
  m.def("lora_backward", &tmf::lora_backward);
}
