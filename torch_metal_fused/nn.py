"""Drop-in layers backed by the fused ops."""

from __future__ import annotations

import math

import torch
from torch import nn

from torch_metal_fused._validation import check_dropout, check_eps
from torch_metal_fused.ops.cross_entropy import linear_cross_entropy
from torch_metal_fused.ops.glu import ACTIVATIONS, down_of_glu
from torch_metal_fused.ops.lora_linear import lora_linear
from torch_metal_fused.ops.rms_norm import add_rms_norm, rms_norm
from torch_metal_fused.ops.softmax import softmax


def _check_hidden_size(hidden_size: object) -> None:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension. State-dict compatible with `torch.nn.RMSNorm` and Hugging Face
    `LlamaRMSNorm` (one parameter, `weight`, initialised to ones)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_hidden_size(hidden_size)
        self.hidden_size = hidden_size
        self.eps = check_eps(eps)
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class Softmax(nn.Module):
    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LoRALinear(nn.Module):
    """A frozen linear base (`weight`, `bias`) plus a trainable low-rank adapter (`lora_a` (r, in),
    `lora_b` (out, r)), scaled by alpha / r. Initialised like PEFT: lora_a Kaiming-uniform, lora_b zeros,
    so a fresh layer computes exactly its base."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from_base(base.weight, base.bias, r, alpha, dropout)

    def _init_from_base(self, weight, bias, r, alpha, dropout) -> None:
        self.out_features, self.in_features = weight.shape
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        self.dropout = check_dropout(dropout)
        self.merged = False
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> LoRALinear:
        """Wrap `linear` as the frozen base; its parameters are shared, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from_base(linear.weight, linear.bias, r, alpha, dropout)
        return layer

    def _delta_weight(self) -> torch.Tensor:
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight for inference: forward becomes one plain linear."""
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self._delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self._delta_weight()).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.lora_a, self.lora_b, self.scaling, self.bias, self.dropout, self.training
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, bias={self.bias is not None}, dropout={self.dropout}, merged={self.merged}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """`loss(hidden, weight, target, bias=None)` = cross-entropy of `hidden @ weight.T + bias` against `target`,
    computed in chunks of tokens so the full logits never exist (torch_metal_fused.linear_cross_entropy)."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.softcap, self.chunk_size = softcap, chunk_size

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"softcap={self.softcap}, chunk_size={self.chunk_size}"
        )


class SwiGLUMLP(nn.Module):
    """`down_proj(act(gate_proj(x)) * up_proj(x))` with the gated activation fused (torch_metal_fused.glu).
    State-dict compatible with Hugging Face's LlamaMLP (and Mistral/Qwen2/Qwen3's; `activation="gelu_tanh"`:
    Gemma's MLP): parameters gate_proj, up_proj, down_proj."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        activation: str = "silu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
        self.activation = activation
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return down_of_glu(self.down_proj, self.gate_proj(x), self.up_proj(x), self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class AddRMSNorm(nn.Module):
    """`forward(x, residual) -> (rms_norm(x + residual), x + residual)`: a pre-norm decoder layer's residual add fused
    with the RMSNorm after it (torch_metal_fused.add_rms_norm). One parameter, `weight`, as torch.nn.RMSNorm /
    LlamaRMSNorm (initialised to ones; to zeros with `offset=1.0`, Gemma's `(1 + weight)`)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_hidden_size(hidden_size)
        self.hidden_size, self.eps, self.offset = hidden_size, check_eps(eps), float(offset)
        init = torch.zeros if offset == 1.0 else torch.ones
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps, self.offset)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, offset={self.offset}"


__all__ = ["AddRMSNorm", "LinearCrossEntropyLoss", "LoRALinear", "RMSNorm", "Softmax", "SwiGLUMLP"]
