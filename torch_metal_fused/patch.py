"""patch_model(): route a model's RMSNorm, PEFT LoRA and (optionally) Softmax modules through the fused ops.

Patching is per instance and by module type — no per-model code: each matching module gets a fused `forward`
as an instance attribute (its parameters, buffers and state-dict keys are untouched, so saving and loading,
PEFT's included, are unchanged); `unpatch_model()` removes it. Whatever the fused path cannot compute exactly
keeps the original forward, and the report says which modules and why. Conditions that can change while
training (adapters disabled or merged, mixed-batch `adapter_names`, dtype mismatches) are checked on every call,
and such a call runs the original forward.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

from torch_metal_fused.ops.lora_linear import lora_linear
from torch_metal_fused.ops.rms_norm import rms_norm
from torch_metal_fused.ops.softmax import softmax

_ORIGINAL = "_tmf_original_forward"

# Hugging Face RMSNorm classes, by the formula their forward implements.
# Llama style: weight * (x.float() * rsqrt(mean(x²) + variance_epsilon)).to(input dtype)
HF_LLAMA_STYLE = {
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm",
    "MixtralRMSNorm",
    "Phi3RMSNorm",
}
# Gemma style: (x.float() * rsqrt(mean(x²) + eps) * (1 + weight.float())).type_as(x)
HF_GEMMA_STYLE = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}


@dataclass
class PatchReport:
    patched: list[tuple[str, str]] = field(default_factory=list)  # (module name, what)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, why)

    def __str__(self) -> str:
        lines = [
            f"torch_metal_fused.patch_model: {len(self.patched)} module(s) patched, {len(self.skipped)} left alone"
        ]
        lines += [f"  patched  {name or '<root>'}: {what}" for name, what in self.patched]
        lines += [f"  left     {name or '<root>'}: {why}" for name, why in self.skipped]
        if any(what == "PEFT lora.Linear" for _, what in self.patched):
            lines.append(
                "  (a patched PEFT layer runs PEFT's own forward for calls with disabled or merged adapters, "
                "adapter_names, or mixed dtypes; active adapters after the first use PEFT's formula)"
            )
        return "\n".join(lines)


def _install(module: nn.Module, fused_forward) -> None:
    setattr(module, _ORIGINAL, module.forward)
    module.forward = types.MethodType(fused_forward, module)


# ---- RMSNorm ------------------------------------------------------------------------------------------
def _torch_rms_norm_forward(self: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if w is not None and w.dtype != x.dtype:
        return getattr(self, _ORIGINAL)(x)
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    return rms_norm(x, w, eps)


def _hf_llama_rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self.weight.dtype != x.dtype:  # HF would return the promoted dtype: keep its exact behaviour
        return getattr(self, _ORIGINAL)(x)
    return rms_norm(x, self.weight, self.variance_epsilon)


def _hf_gemma_rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self.weight.dtype != x.dtype:
        return getattr(self, _ORIGINAL)(x)
    # (1 + weight) and the normalisation in float32, one rounding to x's dtype: Gemma's formula exactly.
    return rms_norm(x, self.weight, self.eps, offset=1.0)


def _rms_norm_patch(module: nn.Module):
    cls = type(module).__name__
    if isinstance(module, nn.RMSNorm):
        if len(module.normalized_shape) != 1:
            return None, "torch.nn.RMSNorm over several trailing dimensions (the kernels normalise the last one)"
        return _torch_rms_norm_forward, "torch.nn.RMSNorm"
    if cls in HF_LLAMA_STYLE:
        if not (hasattr(module, "weight") and hasattr(module, "variance_epsilon")):
            return None, f"{cls} without weight/variance_epsilon: unknown layout"
        return _hf_llama_rms_norm_forward, f"{cls} (Llama formula)"
    if cls in HF_GEMMA_STYLE:
        if not (hasattr(module, "weight") and hasattr(module, "eps")) or getattr(module, "with_scale", True) is False:
            return None, f"{cls}: unknown layout"
        return _hf_gemma_rms_norm_forward, f"{cls} (Gemma formula, (1 + weight) in float32)"
    if cls.endswith("RMSNorm"):
        return None, f"{cls}: an RMSNorm class whose formula is not known to match; left as is"
    return None, None


# ---- PEFT LoRA -----------------------------------------------------------------------------------------
def _is_peft_lora_linear(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
    except ImportError:
        return False
    return isinstance(module, PeftLoraLinear)


def _lora_static_problem(module: nn.Module) -> str | None:
    """Why the fused path can never serve this PEFT layer (None: it can, at least for some calls)."""
    if not isinstance(module.base_layer, nn.Linear):
        return f"base layer is {type(module.base_layer).__name__}, not nn.Linear (e.g. quantised)"
    for name in module.lora_A:
        if module.use_dora.get(name, False) or name in getattr(module, "lora_variant", {}):
            return f"adapter {name!r} uses DoRA or another LoRA variant"
        if module.lora_B[name].bias is not None:
            return f"adapter {name!r} has a LoRA bias"
        if not isinstance(module.lora_A[name], nn.Linear):
            return f"adapter {name!r} is not a linear adapter"
    return None


def _dropout_p(dropout: nn.Module) -> float | None:
    if isinstance(dropout, nn.Identity):
        return 0.0
    if isinstance(dropout, nn.Dropout):
        return dropout.p if dropout.training else 0.0
    return None


def _peft_lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    original = getattr(self, _ORIGINAL)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or not active:
        return original(x, *args, **kwargs)  # mixed-batch adapter_names, disabled/merged adapters, extra args
    base = self.base_layer
    first = active[0]
    a_weight, b_weight = self.lora_A[first].weight, self.lora_B[first].weight
    p = _dropout_p(self.lora_dropout[first])
    dtypes = {x.dtype, base.weight.dtype, a_weight.dtype, b_weight.dtype}
    if base.bias is not None:
        dtypes.add(base.bias.dtype)
    if p is None or len(dtypes) != 1:
        return original(x)  # casts between dtypes or an unknown dropout module: PEFT's code does them exactly
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    result = lora_linear(x, weight, a_weight, b_weight, self.scaling[first], base.bias, p, self.training)
    for name in active[1:]:  # further active adapters: PEFT's own formula, added on top
        result = result + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
    return result


# ---- softmax -------------------------------------------------------------------------------------------
def _softmax_forward(self: nn.Softmax, x: torch.Tensor) -> torch.Tensor:
    dim = self.dim if self.dim is not None else -1
    return softmax(x, dim)


def patch_model(model: nn.Module, rms_norm: bool = True, lora: bool = True, softmax: bool = False) -> PatchReport:
    """Route `model`'s modules through the fused ops, in place; returns what was patched and what was left.

    rms_norm: torch.nn.RMSNorm and Hugging Face's Llama/Mistral/Qwen2/Qwen3 (Llama formula) and Gemma
    (Gemma formula) RMSNorm classes. lora: PEFT's lora.Linear. softmax: nn.Softmax modules (attention code
    usually calls a softmax function, not a module; such calls are not patched).
    """
    report = PatchReport()
    for name, module in model.named_modules():
        if hasattr(module, _ORIGINAL):
            report.skipped.append((name, "already patched"))
            continue
        if rms_norm:
            fwd, what = _rms_norm_patch(module)
            if fwd is not None:
                _install(module, fwd)
                report.patched.append((name, what))
                continue
            if what is not None:
                report.skipped.append((name, what))
                continue
        if lora and _is_peft_lora_linear(module):
            problem = _lora_static_problem(module)
            if problem:
                report.skipped.append((name, f"PEFT lora.Linear kept on PEFT's forward: {problem}"))
            else:
                _install(module, _peft_lora_forward)
                report.patched.append((name, "PEFT lora.Linear"))
            continue
        if softmax and isinstance(module, nn.Softmax):
            _install(module, _softmax_forward)
            report.patched.append((name, "nn.Softmax"))
    return report


def unpatch_model(model: nn.Module) -> int:
    """Restore every module patch_model() patched; returns how many."""
    n = 0
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            del module.forward  # the instance attribute; the class's forward shows through again
            delattr(module, _ORIGINAL)
            n += 1
    return n
