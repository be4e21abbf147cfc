"""Our ops under `torch.autocast`: what the matching PyTorch op does there, and nothing re-cast inside.

Autocast re-casts some torch ops one call at a time (matmuls to the autocast dtype, softmax and losses to
float32). Our implementations are built from torch ops too (the reference, the chunked GEMMs of
linear_cross_entropy, the CUDA backend's cuBLAS calls), so under autocast their pieces would meet in different
dtypes ("self and mat2 must have the same dtype"). So every op's implementation runs with autocast off
(ops/_dispatch.call), and the public functions apply autocast's rule for the op they replace first:
- lora_linear, like F.linear: its floating inputs cast to the autocast dtype (so the result is in that dtype,
  and inputs may arrive in different dtypes, as autocast allows);
- attention, like F.scaled_dot_product_attention: q, k, v and a float mask cast to the autocast dtype;
- linear_cross_entropy, like F.cross_entropy(F.linear(...)): the linear part in the autocast dtype, the loss in
  float32 unless out_dtype says otherwise, and a float32 weight's gradient summed over the chunks in float32 and
  rounded to the autocast dtype once, as F.linear's backward rounds it;
- cross_entropy on given logits: the loss in float32 unless out_dtype says otherwise, as F.cross_entropy's (float64
  logits keep float64);
- the row ops (softmax, RMSNorm, add-RMSNorm, GLU, RoPE) keep their inputs' dtype. They reduce in float32 anyway;
  torch's softmax under CUDA autocast would return float32 (CPU autocast leaves it alone), which for a bfloat16
  input doubles the bytes written, the cost these kernels exist to avoid (Hugging Face's eager attention asks for a
  float32 softmax explicitly).
"""

from __future__ import annotations

import torch

# Autocast casts these; float64 stays float64 (as it does for torch's own ops).
AUTOCAST_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for `device_type` (False for device types autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_device(*args: object) -> str | None:
    """The device type of the first tensor among `args` when autocast is on for it, else None."""
    for a in args:
        if isinstance(a, torch.Tensor):
            device = a.device.type
            return device if autocast_enabled(device) else None
    return None


def float32_loss_under_autocast(t: torch.Tensor) -> bool:
    """Whether F.cross_entropy would return a float32 loss for logits like `t` here: autocast on for its device and
    its dtype one autocast casts (float64 stays float64)."""
    return t.dtype in AUTOCAST_DTYPES and autocast_enabled(t.device.type)


def cast_like_linear(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors as F.linear receives them under autocast on `device_type`: float32/float16/bfloat16 ones in the
    autocast dtype (a differentiable cast: gradients reach the originals in their own dtype), anything else as is
    (None, float64, non-tensors: the argument checks that follow report those)."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in AUTOCAST_DTYPES and t.dtype != dtype else t
        for t in tensors
    )
