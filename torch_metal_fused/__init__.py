"""torch_metal_fused: fused attention, softmax, RMSNorm, LoRA linear, (linear) cross-entropy, SwiGLU/GeGLU and
RoPE for PyTorch training, forward and backward, on Apple GPUs (Metal), NVIDIA GPUs (CUDA) and a plain-PyTorch
reference elsewhere."""

from torch_metal_fused import _config, nn
from torch_metal_fused._backend import BACKENDS, backend_for
from torch_metal_fused.ops.attention import AttentionFunction, attention
from torch_metal_fused.ops.cross_entropy import cross_entropy, linear_cross_entropy
from torch_metal_fused.ops.glu import GluFunction, geglu, glu, swiglu
from torch_metal_fused.ops.lora_linear import LoRALinearFunction, lora_linear
from torch_metal_fused.ops.rms_norm import AddRMSNormFunction, RMSNormFunction, add_rms_norm, rms_norm
from torch_metal_fused.ops.rope import RopeFunction, rope
from torch_metal_fused.ops.softmax import SoftmaxFunction, softmax
from torch_metal_fused.patch import PatchReport, patch_model, unpatch_model

__version__ = "0.1.0"

# A TORCH_METAL_FUSED_* value that would do nothing is an error at import, not only at the call that reads it; a name
# no setting has (a typo) is a warning.
_config.check_environment()

__all__ = [
    "BACKENDS",
    "AddRMSNormFunction",
    "AttentionFunction",
    "GluFunction",
    "LoRALinearFunction",
    "PatchReport",
    "RMSNormFunction",
    "RopeFunction",
    "SoftmaxFunction",
    "__version__",
    "add_rms_norm",
    "attention",
    "backend_for",
    "cross_entropy",
    "geglu",
    "glu",
    "linear_cross_entropy",
    "lora_linear",
    "nn",
    "patch_model",
    "rms_norm",
    "rope",
    "softmax",
    "swiglu",
    "unpatch_model",
]
