// Python module torch_metal_fused._C: the compiled backend's kernel entry points (see csrc/ops.h).
#include "ops.h"

#ifdef TMF_WITH_METAL
namespace tmf::mps {
bool supports_bfloat16();
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_metal_fused compiled kernels";
#ifdef TMF_WITH_METAL
  m.attr("HAS_METAL") = true;
  m.def("metal_supports_bfloat16", &tmf::mps::supports_bfloat16,
        "whether this system's Metal compiler built the bfloat kernels (Metal 3.1, macOS 14+)");
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
