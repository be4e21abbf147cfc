"""patch_model(): route a model's RMSNorm, PEFT LoRA, (optionally) Softmax modules, gated MLPs, rotary embeddings,
attention and causal-LM loss through the fused ops.

Patching is per instance and by module type — no per-model code: each matching module gets a fused `forward`
as an instance attribute (its parameters, buffers and state-dict keys are untouched, so saving and loading,
PEFT's included, are unchanged); `unpatch_model()` removes it. Whatever the fused path cannot compute exactly
keeps the original forward, and the report says which modules and why. Conditions that can change while
training (adapters disabled or merged, mixed-batch `adapter_names`, dtype mismatches) are checked on every call,
and such a call runs the original forward.

The causal-LM loss patch (`cross_entropy=True`) replaces the forward of Hugging Face `*ForCausalLM` models of the
families listed in HF_CAUSAL_LM: a training forward with `labels` runs the decoder (`self.model`) as the original
does, then `linear_cross_entropy` on the final hidden states and `lm_head`'s weight — the logits are never built
(the output's `logits` is None), under autocast too (the linear part in the autocast dtype, the loss in float32,
as the original computes them there). Everything else (no labels, eval mode, `logits_to_keep`, a custom loss
function, mismatched dtypes outside autocast) runs the original forward unchanged.

The attention patch (`attention=True`) is not per module: it switches a Hugging Face model to the attention
implementation "tmf" that this module registers with transformers (`register_hf_attention`, done at import as soon as
transformers' modeling code is loaded; `hf_attention_forward` is the function), as
`from_pretrained(..., attn_implementation="tmf")` would; `unpatch_model()` restores the previous implementation.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.util
import inspect
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from torch_metal_fused._autocast import AUTOCAST_DTYPES, autocast_device, autocast_enabled, cast_like_linear
from torch_metal_fused.ops.attention import attention as fused_attention
from torch_metal_fused.ops.cross_entropy import linear_cross_entropy
from torch_metal_fused.ops.glu import down_of_glu
from torch_metal_fused.ops.lora_linear import lora_linear
from torch_metal_fused.ops.rms_norm import rms_norm
from torch_metal_fused.ops.rope import rope as fused_rope
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
# Hugging Face MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)); the activation is read
# from the module's act_fn (only the ones our kernels compute are patched).
HF_GATED_MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP"}
# Hugging Face attention classes whose forward calls their modeling module's apply_rotary_pos_emb(q, k, cos, sin)
# (HF's rotate_half convention, cos/sin (batch, seq, head_dim)).
HF_ROPE_ATTENTION = {
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "GemmaAttention",
    "Gemma2Attention",
    "Gemma3Attention",
}
# Hugging Face attention classes whose models patch_model(attention=True) switches to the "tmf" attention
# implementation (each family tested against sdpa/eager: tests/test_attention_hf.py); a model with any other attention
# class is left as it is (from_pretrained(..., attn_implementation="tmf") still selects it).
HF_ATTENTION = frozenset(HF_ROPE_ATTENTION)
# Hugging Face causal LMs whose forward is `decoder -> lm_head -> (Gemma-2/3: final-logit soft-capping) ->
# ForCausalLMLoss`, each tested against its original forward (tests/test_patch.py). MoE models (router aux loss)
# and multimodal wrappers are not in the list.
HF_CAUSAL_LM = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
}


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
        if any(what.endswith("(linear cross-entropy)") for _, what in self.patched):
            lines.append(
                "  (a patched causal LM computes the loss of training forwards with labels from the hidden states; "
                "their output's logits is None. Other forwards run the original code)"
            )
        if any(what.startswith("PEFT lora.Linear") for _, what in self.patched):
            lines.append(
                "  (a patched PEFT layer runs PEFT's own forward for calls with disabled or merged adapters, "
                "adapter_names, several active float32 adapters, or dtype mixes the op does not take; active adapters "
                "after the first use PEFT's formula)"
            )
        return "\n".join(lines)


def _is_patched(module: nn.Module) -> bool:
    """Whether patch_model() installed a forward on this module itself (not hasattr: PEFT's PeftModel and LoraModel
    forward unknown attributes to the model they wrap, so they would look patched when that model is)."""
    return _ORIGINAL in vars(module)


def _install(module: nn.Module, fused_forward) -> None:
    """Bind `fused_forward` as the module's forward, showing the original's signature: transformers' generate and
    Trainer read `inspect.signature(model.forward)` to decide what to pass (attention_mask, position_ids,
    logits_to_keep, the dataset's columns); a bare (*args, **kwargs) made generate re-feed the whole prompt on top of
    its cache and Trainer drop input_ids."""
    original = module.forward
    setattr(module, _ORIGINAL, original)
    # a copy of the function object (no extra call per forward) that can carry this module's signature
    forward = types.FunctionType(
        fused_forward.__code__,
        fused_forward.__globals__,
        fused_forward.__name__,
        fused_forward.__defaults__,
        fused_forward.__closure__,
    )
    forward.__kwdefaults__ = fused_forward.__kwdefaults__
    forward.__qualname__ = fused_forward.__qualname__
    try:
        shown = inspect.signature(original)
    except (TypeError, ValueError):
        shown = None
    if shown is not None:
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        forward.__signature__ = shown.replace(parameters=[self_param, *shown.parameters.values()])
    module.forward = types.MethodType(forward, module)


def _install_or_report(report: PatchReport, name: str, module: nn.Module, fused_forward, what: str) -> None:
    """Install `fused_forward` (what: what was patched), or, where it is None, report why not (what: the reason)."""
    if fused_forward is None:
        report.skipped.append((name, what))
    else:
        _install(module, fused_forward)
        report.patched.append((name, what))


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
        problem = _lora_adapter_problem(module, name)
        if problem:
            return problem
    return None


def _lora_adapter_problem(module: nn.Module, name: str) -> str | None:
    """Why the op cannot compute adapter `name` of this PEFT layer: checked at patch time for every adapter, and at
    call time for the active ones (an adapter added after patching: add_adapter(..., use_dora=True))."""
    if module.use_dora.get(name, False) or name in getattr(module, "lora_variant", {}):
        return f"adapter {name!r} uses DoRA or another LoRA variant"
    if module.lora_B[name].bias is not None:
        return f"adapter {name!r} has a LoRA bias"
    if not isinstance(module.lora_A[name], nn.Linear):
        return f"adapter {name!r} is not a linear adapter"
    return None


def _lora_dtypes_fused(activation: torch.dtype, adapters: set[torch.dtype]) -> bool:
    """Whether lora_linear takes adapters of these dtypes on a base of `activation` outside autocast: the base's
    dtype, or float32 on a float16/bfloat16 base (PEFT's default, autocast_adapter_dtype=True)."""
    return adapters <= {activation} or (adapters == {torch.float32} and activation in (torch.float16, torch.bfloat16))


def _lora_dtype_caveat(module: nn.Module) -> str:
    """ "" or why this layer's calls run PEFT's forward outside autocast: adapters in a dtype lora_linear does not
    take beside the base's."""
    base = module.base_layer.weight.dtype
    adapters = {p.dtype for name in module.lora_A for p in (module.lora_A[name].weight, module.lora_B[name].weight)}
    if _lora_dtypes_fused(base, adapters):
        return ""
    names = "/".join(sorted(str(d).removeprefix("torch.") for d in adapters))
    return (
        f" — fused only under torch.autocast: its adapters are {names} on a {str(base).removeprefix('torch.')} base "
        "(fused: adapters in the base's dtype, or float32 on a float16/bfloat16 base), so other calls run PEFT's own "
        "forward"
    )


_warned_lora_dtypes: set[tuple[torch.dtype, ...]] = set()


def _warn_lora_dtype_fallback(dtypes: set[torch.dtype]) -> None:
    """Once per dtype combination: a patched LoRA layer whose call runs PEFT's forward because of its dtypes."""
    key = tuple(sorted(dtypes, key=str))
    if key in _warned_lora_dtypes:
        return
    _warned_lora_dtypes.add(key)
    warnings.warn(
        "torch_metal_fused: a patched PEFT LoRA layer mixes dtypes ("
        + ", ".join(str(d).removeprefix("torch.") for d in key)
        + ") that the fused op does not take outside torch.autocast (x, the base weight and bias in one dtype; the "
        "adapters in it or in float32 on float16/bfloat16), so it runs PEFT's own (unfused) forward.",
        stacklevel=3,
    )


_LORA_PROBLEMS = "_tmf_lora_adapter_problems"


def _lora_adapter_problems(module: nn.Module) -> dict[str, str | None]:
    """Each adapter's _lora_adapter_problem, computed again only when the layer's adapters change (add_adapter after
    patching), not on every call: the check is a few microseconds, the layer's hot path."""
    names = tuple(module.lora_A)
    cached = vars(module).get(_LORA_PROBLEMS)
    if cached is None or cached[0] != names:
        cached = (names, {name: _lora_adapter_problem(module, name) for name in names})
        setattr(module, _LORA_PROBLEMS, cached)
    return cached[1]


_warned_lora_adapters: set[str] = set()


def _warn_lora_adapter_fallback(problem: str) -> None:
    """Once per reason: a patched LoRA layer runs PEFT's forward for an adapter added after patch_model."""
    if problem not in _warned_lora_adapters:
        _warned_lora_adapters.add(problem)
        warnings.warn(
            f"torch_metal_fused: a patched PEFT LoRA layer's {problem}, which the fused op does not compute (added "
            "after patch_model), so its calls run PEFT's own (unfused) forward.",
            stacklevel=3,
        )


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
    problems = _lora_adapter_problems(self)
    problem = next(filter(None, map(problems.get, active)), None)
    if problem is not None:  # an adapter added after patching that the op cannot compute (DoRA, a LoRA bias)
        _warn_lora_adapter_fallback(problem)
        return original(x)
    base = self.base_layer
    first = active[0]
    a_weight, b_weight = self.lora_A[first].weight, self.lora_B[first].weight
    p = _dropout_p(self.lora_dropout[first])
    base_dtypes = {x.dtype, base.weight.dtype} | ({base.bias.dtype} if base.bias is not None else set())
    adapter_dtypes = {a_weight.dtype, b_weight.dtype}
    dtypes = base_dtypes | adapter_dtypes
    # Under autocast lora_linear casts everything as F.linear does; outside it, it takes the base's dtype throughout
    # with adapters in that dtype or float32 (PEFT's default), computing as PEFT's forward does.
    fused = (autocast_enabled(x.device.type) and dtypes <= AUTOCAST_DTYPES) or (
        len(base_dtypes) == 1 and _lora_dtypes_fused(x.dtype, adapter_dtypes)
    )
    if p is None or not fused:
        if p is not None:
            _warn_lora_dtype_fallback(dtypes)
        return original(x)  # other dtype mixes or an unknown dropout module: PEFT's code handles them
    if len(active) > 1 and not autocast_enabled(x.device.type):
        others = {t.dtype for name in active for t in (self.lora_A[name].weight, self.lora_B[name].weight)}
        if others != {x.dtype}:
            # PEFT sums several float32 adapters onto the base output in float32 and rounds once; the fused op
            # rounds after the first, so such calls keep PEFT's forward (documented in docs/patching.md).
            return original(x)
    # The base is an nn.Linear (_lora_static_problem): its weight is (out, in) whatever fan_in_fan_out says (PEFT
    # reads that flag when merging; its forward calls the base layer as it is).
    result = lora_linear(x, base.weight, a_weight, b_weight, self.scaling[first], base.bias, p, self.training)
    for name in active[1:]:  # further active adapters (in x's dtype, or under autocast): PEFT's formula on top
        result = result + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
    return result


# ---- gated MLP (SwiGLU / GeGLU) ------------------------------------------------------------------------------
def _glu_activation_of(act_fn: nn.Module) -> str | None:
    name = type(act_fn).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name in ("GELUTanh", "PytorchGELUTanh") or (isinstance(act_fn, nn.GELU) and act_fn.approximate == "tanh"):
        return "gelu_tanh"
    return None


def _gated_mlp_patch(module: nn.Module):
    cls = type(module).__name__
    if not all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None, f"{cls} without gate_proj/up_proj/down_proj/act_fn: unknown layout"
    activation = _glu_activation_of(module.act_fn)
    if activation is None:
        return None, f"{cls}: activation {type(module.act_fn).__name__} has no fused kernel (silu, gelu tanh)"

    def fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # PEFT-wrapped projections keep their own forward
        if gate.dtype != up.dtype:
            return self.down_proj(self.act_fn(gate) * up)
        # gate and up exist for this call alone: the activation is recomputed from them for down_proj's backward
        # rather than kept, and their memory may take their gradients (ops.glu.down_of_glu)
        return down_of_glu(self.down_proj, gate, up, activation)

    return fused_forward, f"{cls} ({'SwiGLU' if activation == 'silu' else 'GeGLU'} fused)"


# ---- rotary embedding ----------------------------------------------------------------------------------------
# HF's attention code calls the function `apply_rotary_pos_emb` of its modeling module by name, so the fused one must
# be installed there (module-wide). It runs our kernel only while a patched attention module's forward is on this
# thread's stack (_ROPE_ACTIVE), so models that were not patched keep HF's formula; the module's original function is
# restored when the last patched attention of that module is unpatched.
_ROPE_ACTIVE = threading.local()
# modeling module name -> the patched attention modules using its replacement. Weak, and joined at call time by a
# deepcopy of a patched model (a DPO reference or EMA copy), whose modules carry the patch but were never counted.
_ROPE_USERS: dict[str, weakref.WeakSet] = {}
_ROPE_MODULE = "_tmf_rope_module"


def _rope_call_supported(q, k, cos, sin, unsqueeze_dim) -> bool:
    return (
        unsqueeze_dim in (1, 2)
        and q.ndim == k.ndim == 4
        and cos.shape == sin.shape
        and cos.ndim == 3
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and not (cos.requires_grad or sin.requires_grad)
        and cos.shape[-1] == q.shape[-1]
        and cos.shape[-1] % 2 == 0
    )


def _fused_apply_rotary_pos_emb(original):
    signature = inspect.signature(original)

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # Older transformers pass a (deprecated, unused) position_ids before unsqueeze_dim: cos/sin are already per
        # position, so only unsqueeze_dim matters, wherever it was passed.
        if getattr(_ROPE_ACTIVE, "depth", 0) > 0:
            unsqueeze_dim = signature.bind(q, k, cos, sin, *args, **kwargs).arguments.get("unsqueeze_dim", 1)
            if _rope_call_supported(q, k, cos, sin, unsqueeze_dim):
                return fused_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._tmf_original = original
    return apply_rotary_pos_emb


def rope_users(name: str) -> int:
    """How many patched attention modules use the fused apply_rotary_pos_emb of modeling module `name`."""
    return len(_ROPE_USERS.get(name, ()))


def _rope_register(module: nn.Module, hf_module) -> None:
    """Count `module` as a user of `hf_module`'s fused apply_rotary_pos_emb, installing it where it is not."""
    fn = hf_module.apply_rotary_pos_emb
    if not hasattr(fn, "_tmf_original"):
        hf_module.apply_rotary_pos_emb = _fused_apply_rotary_pos_emb(fn)
    _ROPE_USERS.setdefault(hf_module.__name__, weakref.WeakSet()).add(module)


def _attention_with_fused_rope(self: nn.Module, *args, **kwargs):
    name = vars(self).get(_ROPE_MODULE)
    if name is not None and self not in _ROPE_USERS.get(name, ()):  # a deepcopy of a patched model's module
        hf_module = sys.modules.get(name)
        if hf_module is not None:
            _rope_register(self, hf_module)
    _ROPE_ACTIVE.depth = getattr(_ROPE_ACTIVE, "depth", 0) + 1
    try:
        return getattr(self, _ORIGINAL)(*args, **kwargs)
    finally:
        _ROPE_ACTIVE.depth -= 1


def _rope_patch(module: nn.Module):
    cls = type(module).__name__
    hf_module = sys.modules.get(type(module).__module__)
    fn = getattr(hf_module, "apply_rotary_pos_emb", None)
    if fn is None:
        return None, f"{cls}: its module has no apply_rotary_pos_emb"
    _rope_register(module, hf_module)
    setattr(module, _ROPE_MODULE, hf_module.__name__)
    return _attention_with_fused_rope, f"{cls} (rotary embedding fused)"


def _rope_unpatch(module: nn.Module) -> None:
    name = getattr(module, _ROPE_MODULE, None)
    if name is None:
        return
    delattr(module, _ROPE_MODULE)
    users = _ROPE_USERS.get(name)
    if users is not None:
        users.discard(module)  # a deepcopy never called while patched was never counted
    hf_module = sys.modules.get(name)
    if not users and hf_module is not None:
        _ROPE_USERS.pop(name, None)
        fn = hf_module.apply_rotary_pos_emb
        hf_module.apply_rotary_pos_emb = getattr(fn, "_tmf_original", fn)


# ---- attention (Hugging Face's attention interface) ---------------------------------------------------------------
HF_ATTENTION_IMPLEMENTATION = "tmf"
# Keyword arguments of the attention interface that change the result and that the fused op does not take (attention
# sinks, T5-style position bias, head masks): a call that passes one runs the model's eager attention instead.
_HF_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias", "head_mask")
_HF_MODELING_UTILS = "transformers.modeling_utils"  # AttentionInterface (4.50+; a dict in 4.48 and 4.49)
_HF_MASKING_UTILS = "transformers.masking_utils"  # AttentionMaskInterface (transformers 4.53+)
_ATTN_SAVED = "_tmf_saved_attn_implementation"
_warned_attention: set[str] = set()


def _warn_attention_once(message: str) -> None:
    if message in _warned_attention:
        return
    _warned_attention.add(message)
    warnings.warn(f"torch_metal_fused attention (attn_implementation='tmf'): {message}", stacklevel=3)


def hf_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Hugging Face's attention-interface function for attn_implementation "tmf", with the contract of transformers'
    `sdpa_attention_forward`: query (B, Hq, S, D), key and value (B, Hkv, Sk, D) (grouped heads are not repeated: the
    op takes Hq a multiple of Hkv); returns (attn_output (B, S, Hq, D), None).

    The 4-D mask transformers builds (boolean from sdpa's mask function, registered for "tmf"; additive where a model
    builds its own) already holds causality, the sliding window and padding: it is passed as it is (sliced to the key
    length, an additive one cast to the query's dtype), never combined with causal=True. Without a mask the call is
    causal as sdpa's is (`is_causal`, else `module.is_causal`, and more than one query), aligned top-left as sdpa's
    (keys past the query length, an empty static cache's, are dropped as sdpa drops them), with `sliding_window` as
    the op's window. `softcap` (Gemma 2's attn_logit_softcapping) and `scaling` go to the op. Under torch.autocast q,
    k and v are cast to the autocast dtype first, as autocast casts sdpa's inputs.

    What the op cannot compute — attention dropout (dropout > 0: Hugging Face passes it in training only), attention
    sinks (s_aux/sinks), a position_bias or head_mask, value heads of another size than the keys' — runs the model's
    own eager attention (its modeling module's eager_attention_forward, with the mask it expects), with one warning
    per reason. Attention weights are never returned (output_attentions: one warning, as sdpa)."""
    why = _hf_attention_fallback_reason(key, value, dropout, kwargs)
    if why is not None:
        return _hf_eager_attention(why, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if kwargs.get("output_attentions", False):
        _warn_attention_once("output_attentions=True is not supported; attention weights are returned as None")
    device_type = autocast_device(query)
    if device_type is not None:  # autocast runs sdpa in its lower-precision dtype
        query, key, value = cast_like_linear(device_type, query, key, value)
    q_len, kv_len = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    mask, causal, window, key_padding = attention_mask, False, None, None
    if mask is not None:
        if mask.ndim != 4:
            raise ValueError(
                f"attn_implementation='tmf' takes the 4-D attention masks transformers builds for sdpa, got shape "
                f"{tuple(mask.shape)}"
            )
        if mask.shape[-1] > kv_len:  # a static cache's mask may be longer than the keys given
            mask = mask[..., :kv_len]
        factored = _causal_padding_factors(mask, kwargs.get("sliding_window")) if q_len == kv_len > 1 else None
        if factored is not None:  # causal ∧ window ∧ key padding: the op skips blocks, no (B, S, Sk) bias is built
            mask, causal, window, key_padding = None, True, factored[1], factored[0]
        elif mask.dtype not in (torch.bool, query.dtype):
            mask = mask.to(query.dtype)
    elif is_causal and q_len > 1:
        if kv_len > q_len:  # sdpa's is_causal is aligned top-left: the keys past the queries are never seen
            key, value = key[:, :, :q_len], value[:, :, :q_len]
            kv_len = q_len
        sliding_window = kwargs.get("sliding_window")
        if kv_len == q_len:  # top-left and the op's bottom-right alignment coincide
            causal = True
            if sliding_window is not None and sliding_window < kv_len:
                window = int(sliding_window)
        else:  # more queries than keys: sdpa's top-left causal pattern, explicitly
            mask = _top_left_causal(q_len, kv_len, sliding_window, query.device)
    out = fused_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        mask,
        causal=causal,
        scale=scaling,
        window=window,
        softcap=kwargs.get("softcap"),
        key_padding_mask=key_padding,
        layout="bshd",
    )
    return out, None


# A training batch with padding gets from transformers a boolean (B, 1, S, S) mask that is causality (and the sliding
# window) and key padding combined. Handed to the op as it is, it becomes an additive (B, S, S) bias per call and no
# key block can be skipped; as causal=True, window and a (B, S) key-padding mask it costs neither. The factors are
# verified against the mask itself (one comparison, a device sync), once per mask tensor: transformers builds it once
# per forward and hands the same tensor to every layer. Entries hold a weak reference and the tensor's version, so a
# freed mask (whose address may be reused) or one changed in place is never served from here.
_MASK_FACTORS: dict[int, tuple] = {}
_MASK_FACTORS_MAX = 8


def _causal_padding_factors(mask: torch.Tensor, sliding_window) -> tuple[torch.Tensor, int | None] | None:
    """(key_padding (B, S) bool, window or None) when the boolean (B, 1, S, S) `mask` is exactly causal (within
    `sliding_window`, HF's kv_idx > q_idx - sliding_window) and key padding, else None."""
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    window = int(sliding_window) if sliding_window is not None and sliding_window < mask.shape[3] else None
    # An inference tensor (torch.inference_mode) has no version counter: its factors are computed per call, never
    # cached, since an in-place change would go unseen.
    version = None if mask.is_inference() else mask._version
    entry = _MASK_FACTORS.get(id(mask)) if version is not None else None
    if entry is not None:
        ref, cached_version, cached_window, factors = entry
        if ref() is mask and cached_version == version and cached_window == window:
            return factors
    rows = mask[:, 0]
    key_padding = rows.any(dim=1)  # a real key is seen at least by its own query (the diagonal)
    band = _top_left_causal(rows.shape[-1], rows.shape[-1], window, mask.device)[0]
    factors = (key_padding, window) if torch.equal(rows, band & key_padding[:, None, :]) else None
    if version is not None:
        if len(_MASK_FACTORS) >= _MASK_FACTORS_MAX:
            _MASK_FACTORS.clear()
        _MASK_FACTORS[id(mask)] = (weakref.ref(mask), version, window, factors)
    return factors


def _top_left_causal(q_len: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """(1, 1, q_len, kv_len) bool: query i sees keys j <= i (and j > i - sliding_window), sdpa's is_causal pattern
    with Hugging Face's sliding window (kv_idx > q_idx - sliding_window)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    visible = j <= i
    if sliding_window is not None:
        visible = visible & (j > i - sliding_window)
    return visible[None, None]


def _hf_attention_fallback_reason(key: torch.Tensor, value: torch.Tensor, dropout, kwargs: dict) -> str | None:
    if dropout:
        return f"attention dropout (p={dropout}) is not supported by the fused op"
    given = [name for name in _HF_UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if given:
        return f"{'/'.join(given)} is not supported by the fused op"
    if value.shape[-1] != key.shape[-1]:
        return f"value head_dim {value.shape[-1]} differs from the keys' {key.shape[-1]}"
    return None


def _hf_eager_attention(why, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """The model's own eager attention for a call the fused op cannot serve, with the additive mask eager expects
    (sdpa's boolean mask converted; without a mask, sdpa's causal pattern made explicit)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"torch_metal_fused attention (attn_implementation='tmf'): {why}, and {type(module).__name__}'s module "
            "has no eager_attention_forward to run instead; use attn_implementation='eager' or 'sdpa' for this model"
        )
    _warn_attention_once(f"{why}: such calls run the model's eager attention")
    q_len, kv_len = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None and is_causal and q_len > 1:
        mask = _top_left_causal(q_len, kv_len, kwargs.get("sliding_window"), query.device)
    if mask is not None:
        mask = mask[..., :kv_len]
        if mask.dtype == torch.bool:
            filled = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            mask = filled.masked_fill_(~mask, torch.finfo(query.dtype).min)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out, _ = eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return out, None


def _register_loaded() -> bool:
    """Register "tmf" with whichever of transformers' attention and mask interfaces are loaded (imports nothing);
    whether the attention interface was there."""
    modeling_utils = sys.modules.get(_HF_MODELING_UTILS)
    interface = getattr(modeling_utils, "AttentionInterface", None)
    functions = getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)
    if interface is not None:
        interface.register(HF_ATTENTION_IMPLEMENTATION, hf_attention_forward)
    elif isinstance(functions, dict):  # transformers 4.48 and 4.49: a plain dict
        functions[HF_ATTENTION_IMPLEMENTATION] = hf_attention_forward
    else:
        return False
    masks = getattr(sys.modules.get(_HF_MASKING_UTILS), "AttentionMaskInterface", None)
    if masks is not None:
        # sdpa's: 4-D boolean masks, None where the pattern is plainly causal (the op's causal=True serves those)
        masks.register(HF_ATTENTION_IMPLEMENTATION, masks._global_mapping["sdpa"])
    return True


def register_hf_attention() -> bool:
    """Register torch_metal_fused's attention with Hugging Face transformers as attn_implementation "tmf"
    (`hf_attention_forward` in AttentionInterface, and sdpa's mask function under the same name in
    AttentionMaskInterface, without which transformers 4.53+ builds no mask, padding included, for a name it does
    not know). Idempotent. Returns False where transformers is not installed or has no AttentionInterface.

    `import torch_metal_fused` does this by itself as soon as transformers' modeling code is imported (before or
    after it), without importing transformers (which takes seconds); patch_model(attention=True) calls it too."""
    for name in (_HF_MODELING_UTILS, _HF_MASKING_UTILS):  # masking_utils: transformers 4.53+ (before, models
        try:  # build their own masks)
            importlib.import_module(name)
        except ImportError:
            if name == _HF_MODELING_UTILS:
                return False
    return _register_loaded()


class _RegisteringLoader(importlib.abc.Loader):
    """The loader of transformers' modeling_utils or masking_utils, which registers "tmf" once the module has run."""

    def __init__(self, loader, hook: _RegisterOnImport) -> None:
        self.loader, self.hook = loader, hook

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if not self.hook.names and self.hook in sys.meta_path:  # both seen: the hook has done its work
            sys.meta_path.remove(self.hook)
        try:
            _register_loaded()
        except Exception as exc:  # never break the user's import of transformers
            warnings.warn(
                f"torch_metal_fused could not register attn_implementation='tmf' with transformers ({exc!r}); "
                "call torch_metal_fused.patch.register_hf_attention() to see why",
                stacklevel=2,
            )


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers "tmf" right after transformers' modeling_utils / masking_utils are imported, whether
    torch_metal_fused was imported before or after transformers, at no import cost (it imports nothing itself)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        for finder in list(sys.meta_path):  # the spec the other finders give, its loader wrapped
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None


def _install_registration() -> None:
    loaded = [n for n in (_HF_MODELING_UTILS, _HF_MASKING_UTILS) if n in sys.modules]
    if loaded:
        _register_loaded()
    missing = {_HF_MODELING_UTILS, _HF_MASKING_UTILS} - set(loaded)
    if missing and importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _RegisterOnImport(missing))


def _hf_pretrained_model_class():
    return getattr(sys.modules.get(_HF_MODELING_UTILS), "PreTrainedModel", None)


def _configs_of(model: nn.Module) -> list:
    """The model's config, its sub-configs (at any depth) and those of its PreTrainedModel submodules, each once."""
    pretrained = _hf_pretrained_model_class()
    pending = [model.config] + [m.config for m in model.modules() if pretrained and isinstance(m, pretrained)]
    seen: dict[int, object] = {}
    while pending:
        config = pending.pop(0)
        if config is None or id(config) in seen:
            continue
        seen[id(config)] = config
        pending += [getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {}]
    return list(seen.values())


def _attention_patch(report: PatchReport, name: str, model: nn.Module) -> set[int]:
    """Switch a Hugging Face model (and its submodels) to attn_implementation "tmf", or report why not; the ids of
    the configs it covers (so that its submodels are not switched again)."""
    cls = type(model).__name__
    configs = _configs_of(model)
    handled = {id(c) for c in configs}
    current = getattr(model.config, "_attn_implementation", None)
    if _ATTN_SAVED in vars(model) or current == HF_ATTENTION_IMPLEMENTATION:
        report.skipped.append((name, f"{cls}: attention already runs attn_implementation 'tmf'"))
        return handled
    classes = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")})
    if not classes:
        return handled
    unknown = [c for c in classes if c not in HF_ATTENTION]
    if unknown:
        report.skipped.append(
            (
                name,
                f"{cls}: attention left on {current!r}: {', '.join(unknown)} not among the attention classes tested "
                "with the fused op (patch.HF_ATTENTION); attn_implementation='tmf' at from_pretrained still selects it",
            )
        )
        return handled
    if not register_hf_attention():
        report.skipped.append((name, f"{cls}: attention left on {current!r}: transformers has no AttentionInterface"))
        return handled
    saved = [(c, getattr(c, "_attn_implementation_internal", None)) for c in configs]
    if hasattr(model, "set_attn_implementation"):  # transformers 4.54+: checks, and sets the submodels' too
        model.set_attn_implementation(HF_ATTENTION_IMPLEMENTATION)
    else:
        for config in configs:
            config._attn_implementation = HF_ATTENTION_IMPLEMENTATION
    if model.config._attn_implementation != HF_ATTENTION_IMPLEMENTATION:
        _restore_attention(saved)
        report.skipped.append((name, f"{cls}: transformers refused to switch its attention implementation"))
        return handled
    setattr(model, _ATTN_SAVED, saved)
    modules = sum(type(m).__name__ in HF_ATTENTION for m in model.modules())
    what = f"{cls} attention: attn_implementation {current!r} -> 'tmf' ({modules} {'/'.join(classes)} modules)"
    dropout = {getattr(c, "attention_dropout", 0.0) for c in configs} - {0, None}
    if dropout:
        what += (
            f" — training forwards run eager attention: attention_dropout {'/'.join(map(str, sorted(dropout)))} "
            "(the fused op has no dropout)"
        )
    report.patched.append((name, what))
    return handled


def _restore_attention(saved) -> None:
    for config, implementation in saved:
        config._attn_implementation_internal = implementation


def _attention_unpatch(module: nn.Module) -> bool:
    saved = vars(module).get(_ATTN_SAVED)  # not getattr: PEFT's wrappers forward it from the model they wrap
    if saved is None:
        return False
    _restore_attention(saved)
    delattr(module, _ATTN_SAVED)
    return True


# ---- softmax -------------------------------------------------------------------------------------------
def _softmax_forward(self: nn.Softmax, x: torch.Tensor) -> torch.Tensor:
    # nn.Softmax() without a dim: torch's legacy implicit choice (dim 0 for 0-, 1- and 3-D input, else 1)
    dim = self.dim if self.dim is not None else 0 if x.ndim in (0, 1, 3) else 1
    return softmax(x, dim)


# ---- causal-LM loss -------------------------------------------------------------------------------------
# Keyword arguments that Hugging Face's ForCausalLMLoss reads (the rest of **kwargs goes to the decoder).
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _hf_causal_lm_loss():
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return None
    return ForCausalLMLoss


def _causal_lm_static_problem(module: nn.Module) -> str | None:
    cls = type(module).__name__
    if cls not in HF_CAUSAL_LM:
        return f"{cls} is not among the causal LMs whose forward is known ({', '.join(sorted(HF_CAUSAL_LM))})"
    decoder, head = getattr(module, "model", None), getattr(module, "lm_head", None)
    if not isinstance(decoder, nn.Module) or type(head) is not nn.Linear:
        return f"{cls}: lm_head is not a plain nn.Linear (adapted or quantised) or no decoder at .model"
    loss_fn = _hf_causal_lm_loss()
    if loss_fn is None or getattr(module, "loss_function", None) is not loss_fn:
        return f"{cls}: its loss function is not transformers' ForCausalLMLoss"
    return None


def _causal_lm_patch(module: nn.Module):
    problem = _causal_lm_static_problem(module)
    if problem:
        return None, f"loss not patched: {problem}"
    return _causal_lm_forward, f"{type(module).__name__} loss (linear cross-entropy)"


def _causal_lm_forward(self: nn.Module, *args, **kwargs):
    original = getattr(self, _ORIGINAL)
    signature = inspect.signature(original)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return original(*args, **kwargs)  # let the original raise its own error
    given = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            given.update(given.pop(name, {}))
    labels = given.pop("labels", None)
    logits_to_keep = given.pop("logits_to_keep", 0)
    if labels is None or not self.training or logits_to_keep not in (0, None) or _causal_lm_static_problem(self):
        return original(*args, **kwargs)
    loss_kwargs = {k: given.pop(k) for k in _LOSS_KWARGS if k in given}
    return_dict = given.pop("return_dict", None)
    outputs = self.model(**given)
    hidden = outputs[0]
    head = self.lm_head
    head_dtypes = {hidden.dtype, head.weight.dtype} | ({head.bias.dtype} if head.bias is not None else set())
    if autocast_enabled(hidden.device.type):  # linear_cross_entropy casts as nn.Linear does under autocast
        use_original = not head_dtypes <= AUTOCAST_DTYPES
    else:
        use_original = head.weight.dtype != hidden.dtype
    if use_original:
        # What nn.Linear would do with mixed dtypes (float64 among them under autocast): the original tail, exactly.
        logits = head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = self.loss_function(logits, labels, self.config.vocab_size, **loss_kwargs)
    else:
        ignore_index = loss_kwargs.get("ignore_index", -100)
        shift_labels = loss_kwargs.get("shift_labels")
        if shift_labels is None:  # position t predicts token t + 1; the last position predicts nothing
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        n_items = loss_kwargs.get("num_items_in_batch")
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            shift_labels.reshape(-1).to(hidden.device),
            bias=head.bias,
            ignore_index=ignore_index,
            reduction="mean" if n_items is None else "sum",
            softcap=getattr(self.config, "final_logit_softcapping", None),
            out_dtype=torch.float32,  # HF upcasts the logits: its loss is float32
        )
        if n_items is not None:  # gradient accumulation: sum over the step's tokens / their count (HF's rule)
            loss = loss / (n_items.to(loss.device) if torch.is_tensor(n_items) else n_items)
        logits = None
    from transformers.modeling_outputs import CausalLMOutputWithPast

    rest = {f.name: getattr(outputs, f.name, None) for f in dataclasses.fields(CausalLMOutputWithPast)}
    rest.update(loss=loss, logits=logits)
    result = CausalLMOutputWithPast(**rest)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


def patch_model(
    model: nn.Module,
    rms_norm: bool = True,
    lora: bool = True,
    softmax: bool = False,
    cross_entropy: bool = False,
    swiglu: bool = False,
    rope: bool = False,
    attention: bool = False,
) -> PatchReport:
    """Route `model`'s modules through the fused ops, in place; returns what was patched and what was left.

    rms_norm: torch.nn.RMSNorm and Hugging Face's Llama/Mistral/Qwen2/Qwen3 (Llama formula) and Gemma
    (Gemma formula) RMSNorm classes. lora: PEFT's lora.Linear. softmax: nn.Softmax modules (attention code
    usually calls a softmax function, not a module; such calls are not patched). cross_entropy: the loss of
    Hugging Face causal LMs (HF_CAUSAL_LM) in training forwards with labels, by linear_cross_entropy from the final
    hidden states, never building the logits. swiglu: the gated activation of Hugging Face MLPs (HF_GATED_MLP:
    SwiGLU, and GeGLU for Gemma) by the fused glu op; their projections (PEFT-wrapped or not) are untouched.
    rope: the rotary embedding of q and k in Hugging Face attention modules (HF_ROPE_ATTENTION) by the fused rope op
    (see _fused_apply_rotary_pos_emb: installed in the family's modeling module, active only in patched models).
    attention: Hugging Face models whose attention classes are in HF_ATTENTION (Llama, Mistral, Qwen2/3, Gemma 1/2/3
    text; PEFT-wrapped too) switched to attn_implementation "tmf" (see register_hf_attention and
    hf_attention_forward: masks, causality, GQA, sliding windows and Gemma 2's soft-capping as sdpa/eager compute them;
    attention dropout runs the model's eager attention, with a warning); composes with rope (which wraps the same
    modules' forward). Off by default, as every option added after rms_norm and lora; unpatch_model restores the
    previous implementation.
    """
    report = PatchReport()
    pretrained = _hf_pretrained_model_class() if attention else None
    attention_done: set[int] = set()
    for name, module in model.named_modules():
        if pretrained is not None and isinstance(module, pretrained) and id(module.config) not in attention_done:
            attention_done |= _attention_patch(report, name, module)
        if _is_patched(module):
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
                report.patched.append((name, "PEFT lora.Linear" + _lora_dtype_caveat(module)))
            continue
        if softmax and isinstance(module, nn.Softmax):
            _install(module, _softmax_forward)
            report.patched.append((name, "nn.Softmax"))
            continue
        if swiglu and type(module).__name__ in HF_GATED_MLP:
            _install_or_report(report, name, module, *_gated_mlp_patch(module))
            continue
        if rope and type(module).__name__ in HF_ROPE_ATTENTION:
            _install_or_report(report, name, module, *_rope_patch(module))
            continue
        if cross_entropy and type(module).__name__.endswith("ForCausalLM"):
            _install_or_report(report, name, module, *_causal_lm_patch(module))
    return report


def unpatch_model(model: nn.Module) -> int:
    """Restore every module patch_model() patched, and the attention implementation of every model it switched;
    returns how many patches it undid."""
    n = 0
    for module in model.modules():
        n += _attention_unpatch(module)
        if _is_patched(module):
            del module.forward  # the instance attribute; the class's forward shows through again
            delattr(module, _ORIGINAL)
            vars(module).pop(_LORA_PROBLEMS, None)
            _rope_unpatch(module)
            n += 1
    return n


_install_registration()
