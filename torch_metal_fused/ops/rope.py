"""Rotary position embedding of q and k — Hugging Face's `apply_rotary_pos_emb` — in one kernel forward and one
backward (the transposed rotation of the incoming gradients; nothing is saved but cos and sin).

HF computes `q * cos + rotate_half(q) * sin` (and the same for k): per tensor a rotate_half temporary and four
elementwise kernels forward, more backward. Ours reads q, k and, once per position, cos and sin, and writes the two
outputs: the minimum traffic, float32 math with one rounding. Outputs are new contiguous tensors (batch, heads,
seq, head_dim) — transposed back to q's layout when `unsqueeze_dim=2`.

Kernel launch code: Metal `torch_metal_fused/backends/metal.py` (rope_apply) (shared with the Metal-on-CPU
harness), shaders `shaders/rope.metal`; CUDA `csrc/cuda/rope.cu`; reference `reference.rope_apply`.
"""

from __future__ import annotations

import torch

from torch_metal_fused import reference
from torch_metal_fused._validation import check_same_device_dtype, check_tensor
from torch_metal_fused.ops._dispatch import call, create_graph_requested, run_kernel


def _rope_apply_impl(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel("rope_apply", q, k, cos, sin, interleaved, backward)


rope_apply = torch.library.custom_op("torch_metal_fused::rope_apply", _rope_apply_impl, mutates_args=())


@rope_apply.register_fake
def _(q, k, cos, sin, interleaved, backward):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
    )


class RopeFunction(torch.autograd.Function):
    """q, k: (batch, heads, seq, head_dim) views; cos, sin: contiguous (1 or batch, seq, rotary_dim). Backward is
    linear in the incoming gradients; with create_graph=True (double backward) it is the reference composition, so
    its own gradient is the forward rotation again."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved: bool):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return call(rope_apply, _rope_apply_impl, q, k, cos, sin, interleaved, False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        if create_graph_requested():
            dq, dk = reference.rope_apply(dq_out, dk_out, cos, sin, ctx.interleaved, True)
            return dq, dk, None, None, None
        dq, dk = call(rope_apply, _rope_apply_impl, dq_out, dk_out, cos, sin, ctx.interleaved, True)
        return dq, dk, None, None, None


def _cos_sin_tables(
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    batch: int,
    seq: int,
    head_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as the kernels take them: contiguous (1 or batch, seq, rotary_dim) in q's dtype."""
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin get no gradient here: pass tensors that do not require grad (e.g. .detach())")
    if position_ids is not None:
        integer = isinstance(position_ids, torch.Tensor) and position_ids.dtype in (torch.int32, torch.int64)
        if not integer or position_ids.ndim != 2:
            raise TypeError(
                f"position_ids must be an integer tensor (batch or 1, seq), got {position_ids.dtype} "
                f"with shape {tuple(position_ids.shape)}"
            )
        if cos.ndim != 2:
            raise ValueError(
                f"with position_ids, cos and sin must be tables (positions, rotary_dim), got shape {tuple(cos.shape)}"
            )
        if position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape ({batch} or 1, {seq}), got {tuple(position_ids.shape)}")
        if position_ids.numel() and (int(position_ids.min()) < 0 or int(position_ids.max()) >= cos.shape[0]):
            raise ValueError(f"position_ids must lie in [0, {cos.shape[0]}) (the rows of cos and sin)")
        cos, sin = cos[position_ids], sin[position_ids]
    elif cos.ndim == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.ndim != 3 or cos.shape[1] != seq or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"cos and sin must have shape (batch or 1, seq, rotary_dim) or (seq, rotary_dim) with seq = {seq}, batch "
            f"= {batch}, got {tuple(cos.shape)}"
        )
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(
            f"cos and sin's last dimension (rotary_dim) must be even and in [2, {head_dim}], got {rotary_dim}"
        )
    return cos.to(dtype).contiguous(), sin.to(dtype).contiguous()


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`: `(q * cos + rotate_half(q) * sin,
    k * cos + rotate_half(k) * sin)` with cos and sin broadcast over the heads, fused forward and backward.

    q (batch, q_heads, seq, head_dim) and k (batch, k_heads, seq, head_dim) — heads in dimension `unsqueeze_dim`
    (1, as HF's attention passes them, or 2: (batch, seq, heads, head_dim)); any strides with head_dim contiguous
    (the transposed projection outputs HF produces are read in place). cos, sin: (batch or 1, seq, rotary_dim) or
    (seq, rotary_dim), or with `position_ids` (batch or 1, seq) tables (positions, rotary_dim) indexed by them.
    rotary_dim < head_dim rotates the first rotary_dim elements of each head and keeps the rest (partial rotary).
    `interleaved`: pairs (2i, 2i + 1) (GPT-J style) instead of rotate_half's (i, i + rotary_dim / 2). cos and sin get
    no gradient. Returns new tensors of q's and k's shapes."""
    check_tensor("q", q)
    check_tensor("k", k)
    check_tensor("cos", cos)
    check_tensor("sin", sin)
    check_same_device_dtype("q", q, k=k)
    if cos.device != q.device or sin.device != q.device:
        raise ValueError(f"cos and sin must be on q's device ({q.device}), got {cos.device} and {sin.device}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"unsqueeze_dim must be 1 (q is (batch, heads, seq, head_dim)) or 2 ((batch, seq, heads, "
            f"head_dim)), got {unsqueeze_dim!r}"
        )
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be 4-D, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if unsqueeze_dim == 2:  # (batch, seq, heads, head_dim) -> the kernels' (batch, heads, seq, head_dim) view
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"q and k must agree in batch, seq and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    cos, sin = _cos_sin_tables(cos, sin, position_ids, batch, seq, head_dim, q.dtype)
    q_out, k_out = RopeFunction.apply(q, k, cos, sin, bool(interleaved))
    if unsqueeze_dim == 2:
        q_out, k_out = q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


__all__ = ["RopeFunction", "rope"]


def self_test_cases(dtype: torch.dtype, device: str) -> list:
    """The doctor's self-test: grouped k heads, against Hugging Face's apply_rotary_pos_emb (rotate_half)."""
    from torch_metal_fused.testing import SelfTestCase, sample

    angles = sample((1, 7, 32), torch.float64, "cpu", 13) * 10
    cos, sin = (f(torch.cat((angles, angles), -1)) for f in (torch.cos, torch.sin))

    def rotate_half(x):  # Hugging Face's own; not imported from bench/ (ops sit below the tools in the import graph)
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)

    c, s = cos.to(dtype).to(device), sin.to(dtype).to(device)
    c64, s64 = c.double().cpu().unsqueeze(1), s.double().cpu().unsqueeze(1)  # the tables the op is given

    def hf_rope(q, k):
        return q * c64 + rotate_half(q) * s64, k * c64 + rotate_half(k) * s64

    return [
        SelfTestCase(
            lambda t: torch.cat([o.flatten() for o in rope(t[0], t[1], c, s)]),
            lambda t: torch.cat([o.flatten() for o in hf_rope(t[0], t[1])]),
            [sample((2, 4, 7, 64), dtype, device, 11), sample((2, 2, 7, 64), dtype, device, 12)],
        )
    ]
