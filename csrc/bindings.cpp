// Python module torch_metal_fused._C: the compiled backend's kernel entry points (see csrc/ops.h).
#include "ops.h"
#include "tmf/launch/common.h"

#ifdef TMF_WITH_CUDA
#include "cuda/lora_kconcat.h"
#endif

namespace {

// tmf::launch::KernelUnavailable (thrown before anything is encoded) becomes the Python class
// torch_metal_fused._backend.KernelUnavailable, on which the backend serves the call by the reference. The class is
// looked up once, at import, and never released (no static destructor touches Python at exit).
PyObject* g_kernel_unavailable = nullptr;

void translate_kernel_unavailable(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const tmf::launch::KernelUnavailable& e) {
    py::object exc = py::reinterpret_borrow<py::object>(g_kernel_unavailable)(e.family(), e.scope_name(), e.what());
    PyErr_SetObject(g_kernel_unavailable, exc.ptr());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_metal_fused compiled kernels";
  py::object kernel_unavailable = py::module_::import("torch_metal_fused._backend").attr("KernelUnavailable");
  g_kernel_unavailable = kernel_unavailable.release().ptr();
  py::register_local_exception_translator(&translate_kernel_unavailable);
  m.def(
      "_raise_kernel_unavailable",
      [](const std::string& family, bool whole_family) {
        using Scope = tmf::launch::KernelUnavailable::Scope;
        throw tmf::launch::KernelUnavailable(family, whole_family ? Scope::family : Scope::call, "raised on request");
      },
      "for tests: the translation of tmf::launch::KernelUnavailable into the Python class");
#ifdef TMF_WITH_CUDA
  m.attr("HAS_CUDA") = true;
  m.attr("HAS_LORA_KCONCAT") = tmf::cuda::lora_kconcat_built();
  m.def("lora_kconcat_mode", [] {
        switch (tmf::cuda::lora_kconcat_mode()) {
          case tmf::cuda::KConcatMode::never: return "never";
          case tmf::cuda::KConcatMode::by_size: return "by_size";
          default: return "always";
        }
      },
      "how the LoRA op chooses its K-concatenated GEMM: 'never' (built without CUTLASS, or "
      "TORCH_METAL_FUSED_LORA_KCONCAT=0), 'by_size' (the default: where its tiles fill the GPU) or 'always' (=1)");
  m.def("lora_takes_kconcat_route", &tmf::lora_takes_kconcat_route,
        "whether the LoRA op takes the K-concatenated GEMM for x, weight and lora_a (no dropout)");
  m.def("lora_kconcat_gemm_for", [](int64_t rows, int64_t cols) {
        return tmf::cuda::lora_kconcat_gemm_name(tmf::cuda::lora_kconcat_gemm_in_effect(rows, cols));
      },
      "which configuration of the K-concatenated GEMM runs a rows x cols output: 'cooperative' or 'pingpong' (by "
      "shape, or the one TORCH_METAL_FUSED_LORA_KCONCAT_GEMM forces)");
  m.def("lora_kconcat_gemm_launches", [] {
        py::dict counts;
        for (auto g : tmf::cuda::kLoraKConcatGemms)
          counts[tmf::cuda::lora_kconcat_gemm_name(g)] = tmf::cuda::lora_kconcat_gemm_launches(g);
        return counts;
      },
      "for tests: how many K-concatenated GEMMs this process launched on each configuration");
  m.def("lora_kconcat_forward",
        [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& h, const at::Tensor& bs,
           const std::optional<at::Tensor>& bias, const std::string& gemm) {
          const auto choice = tmf::cuda::lora_kconcat_gemm_named(gemm);
          py::gil_scoped_release release;
          return tmf::cuda::lora_kconcat_forward(x, w, h, bs, bias, choice);
        },
        py::arg("x"), py::arg("weight"), py::arg("h"), py::arg("bs"), py::arg("bias"), py::arg("gemm") = "auto",
        "for tests: y = x·weightᵀ + h·bsᵀ by the K-concatenated GEMM on configuration gemm ('auto': the one in "
        "effect)");
  m.def("lora_kconcat_dx",
        [](const at::Tensor& dy, const at::Tensor& w, const at::Tensor& dh, const at::Tensor& a,
           const std::string& gemm) {
          const auto choice = tmf::cuda::lora_kconcat_gemm_named(gemm);
          py::gil_scoped_release release;
          return tmf::cuda::lora_kconcat_dx(dy, w, dh, a, choice);
        },
        py::arg("dy"), py::arg("weight"), py::arg("dh"), py::arg("lora_a"), py::arg("gemm") = "auto",
        "for tests: dx = dy·weight + dh·lora_a by the K-concatenated GEMM on configuration gemm");
#else
  m.attr("HAS_CUDA") = false;
#endif
  // The kernels touch no Python object: the GIL is released while they wait for the stream or compile a library.
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.def("softmax_forward", &tmf::softmax_forward, release_gil());
  m.def("softmax_backward", &tmf::softmax_backward, release_gil());
  m.def("rms_norm_forward", &tmf::rms_norm_forward, release_gil());
  m.def("rms_norm_backward", &tmf::rms_norm_backward, release_gil());
  m.def("rms_norm_add_forward", &tmf::rms_norm_add_forward, release_gil());
  m.def("rms_norm_add_backward", &tmf::rms_norm_add_backward, release_gil());
  m.def("lora_forward", &tmf::lora_forward, release_gil());
  m.def("lora_backward", &tmf::lora_backward, release_gil());
  m.def("cross_entropy_rows", &tmf::cross_entropy_rows, release_gil());
  m.def("glu_forward", &tmf::glu_forward, release_gil());
  m.def("glu_backward", &tmf::glu_backward, release_gil());
  m.def("rope_apply", &tmf::rope_apply, release_gil());
}
