"""Fused attention, forward and backward, FlashAttention-2 style: out = softmax(q·kᵀ·scale + mask)·v without ever
materialising the (batch, heads, S, Sk) probabilities. Forward saves only out and the float32 log-sum-exp per query
row; backward recomputes the probabilities block by block (a delta = rowsum(dout·out) pass, then separate dQ and
dK/dV kernels, no atomics). Grouped-query and multi-query heads, causal (aligned bottom-right when S != Sk), sliding
window, logit soft-capping, boolean or additive masks; rows with no visible key give zeros.

Kernel launch code: Metal `torch_metal_fused/backends/metal.py` (attention_forward/backward), shaders
`shaders/attention.metal`; reference `reference.attention_forward/backward` (chunked over queries). CUDA tensors go to
`torch.nn.functional.scaled_dot_product_attention`, which is fused there (no CUDA kernel of ours); soft-capping,
which SDPA lacks, takes the reference there.
"""

from __future__ import annotations

import math

import torch

from torch_metal_fused import reference
from torch_metal_fused._autocast import autocast_enabled, cast_like_linear
from torch_metal_fused._backend import forced_backend
from torch_metal_fused._validation import check_finite_number, check_same_device_dtype, check_tensor
from torch_metal_fused.ops._dispatch import call, refuse_double_backward, run_kernel

LAYOUTS = ("bhsd", "bshd")


def _run(entry: str, lead: torch.Tensor, *args):
    # CUDA tensors reach the entry points only for what SDPA cannot do (soft-capping): the reference serves them.
    if lead.device.type == "cuda":
        return getattr(reference, entry)(lead, *args)
    return run_kernel(entry, lead, *args)


def _attention_forward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    softcap: float,
    heads_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("attention_forward", q, k, v, bias, causal, window, scale, softcap, heads_last)


attention_forward = torch.library.custom_op(
    "torch_metal_fused::attention_forward", _attention_forward_impl, mutates_args=()
)


@attention_forward.register_fake
def _(q, k, v, bias, causal, window, scale, softcap, heads_last):
    b, h, s, d = q.shape
    out = q.new_empty((b, s, h, d)).transpose(1, 2) if heads_last else q.new_empty((b, h, s, d))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, q.new_empty((b, h, s), dtype=lse_dtype)


def _attention_backward_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run("attention_backward", dout, q, k, v, out, lse, bias, causal, window, scale, softcap)


attention_backward = torch.library.custom_op(
    "torch_metal_fused::attention_backward", _attention_backward_impl, mutates_args=()
)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, bias, causal, window, scale, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class AttentionFunction(torch.autograd.Function):
    """q (B, Hq, S, D), k and v (B, Hkv, Sk, D) views with a unit inner stride; bias None or an additive mask in q's
    dtype broadcast to (B, Hq, S, Sk) (stride 0 where broadcast). Saves q, k, v, bias, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, bias, causal: bool, window: int, scale: float, softcap: float, heads_last: bool):
        out, lse = call(
            attention_forward, _attention_forward_impl, q, k, v, bias, causal, window, scale, softcap, heads_last
        )
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.options = (causal, window, scale, softcap)
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward("attention")
        q, k, v, bias, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = call(attention_backward, _attention_backward_impl, dout, q, k, v, out, lse, bias, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None


def _unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive one in `dtype`: 0 where kept, -inf where dropped."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def _mask_bias(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """One additive mask in q's dtype (-inf drops a key), broadcast to (B, Hq, S, Sk) without copies where the
    masks allow; None without masks."""
    batch, kv_len = shape[0], shape[3]
    bias = None
    if attn_mask is not None:
        if not (isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool):
            check_tensor("attn_mask", attn_mask)
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")
        if attn_mask.requires_grad:
            raise ValueError("attn_mask gets no gradient here: pass a tensor that does not require grad")
        if attn_mask.dtype == torch.float64 and dtype != torch.float64:
            raise TypeError(f"attn_mask is float64 but q is {dtype}: pass a boolean mask or one in q's dtype")
        if attn_mask.ndim > 4:
            raise ValueError(f"attn_mask must have at most 4 dimensions, got shape {tuple(attn_mask.shape)}")
        m = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
        if any(have not in (1, want) for have, want in zip(m.shape, shape)):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, q_heads, q_len, kv_len) = "
                f"{shape}"
            )
        # an additive mask is added in q's dtype, as SDPA does
        bias = _additive(m, dtype) if m.dtype == torch.bool else m.to(dtype)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a boolean tensor (batch, kv_len), True for keys to attend")
        if key_padding_mask.shape != (batch, kv_len):
            raise ValueError(f"key_padding_mask must have shape {(batch, kv_len)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {device}")
        pad = _additive(key_padding_mask[:, None, None, :], dtype)
        bias = pad if bias is None else bias + pad
    if bias is None:
        return None
    return _unit_inner_stride(bias).expand(shape)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy where its last dimension is strided or its start or a row stride is not 16-byte
    aligned: SDPA's CUDA kernels read 16-byte vectors and fail with "misaligned address" on such views (a storage
    offset, odd-width rows), and its float16 backward gave a wrong dq for an incoming gradient whose last dimension
    was strided (torch 2.11, H200)."""
    es = t.element_size()
    rows_aligned = all(st * es % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    if t.data_ptr() % 16 == 0 and rows_aligned and (t.shape[-1] <= 1 or t.stride(-1) == 1):
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _AlignedGradient(torch.autograd.Function):
    """Identity whose backward hands SDPA's backward an aligned incoming gradient laid out as SDPA's output (its
    strides: a (B, S, H, D) memory layout when q was a transposed view). SDPA's float16/bfloat16 backward on CUDA
    gave a wrong dq for an incoming gradient whose layout differed from its output's (torch 2.11, H100 and H200)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.out_strides = t.stride()
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == ctx.out_strides and _aligned(grad) is grad:
            return grad
        laid_out = torch.empty_strided(grad.shape, ctx.out_strides, dtype=grad.dtype, device=grad.device)
        return laid_out.copy_(grad)


def _stored_entries(t: torch.Tensor) -> torch.Tensor:
    """t without its broadcast dimensions (stride 0, as expand() makes them): every distinct entry once."""
    for dim in range(t.ndim):
        if t.stride(dim) == 0:
            t = t.narrow(dim, 0, min(1, t.shape[dim]))
    return t


def _sdpa_route(q: torch.Tensor) -> bool:
    """Whether the op runs PyTorch's SDPA (CUDA, where it is fused) rather than our kernels or the reference. A
    function so that CPU tests can take the route too (torch's SDPA runs on CPU tensors)."""
    return q.device.type == "cuda"


def _sdpa(q, k, v, bias, causal: bool, window: int, scale: float) -> torch.Tensor | None:
    """CUDA: PyTorch's fused SDPA (flash or memory-efficient kernels) with our semantics: bottom-right causal and
    windows as an explicit mask (SDPA's is_causal is aligned top-left), grouped heads expanded by SDPA itself, and rows
    with no visible key zeroed (as our kernels give them). None for a mask holding NaN or +inf: SDPA's kernels do not
    propagate those as the formula does (a NaN or +inf on a visible key makes its row NaN; on a key the causal window
    hides, nothing), so such calls take the reference composite."""
    if bias is not None:
        stored = _stored_entries(bias)  # not the (B, Hq, S, Sk) the broadcast dims would make of a comparison
        if bool((stored.isnan() | (stored == float("inf"))).any()):
            return None
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    q_len, kv_len = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    kwargs = {"enable_gqa": True} if groups > 1 else {}
    if bias is None and (not causal or (q_len == kv_len and window == 0)):  # no (S, Sk) mask built
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kwargs)
        return _AlignedGradient.apply(out)
    visible = reference.attention_visible(torch.arange(q_len, device=q.device), kv_len, q_len, causal, window)
    causal_mask = torch.zeros((q_len, kv_len), dtype=q.dtype, device=q.device)
    if visible is not None:
        causal_mask = _additive(visible, q.dtype)
    mask = causal_mask if bias is None else bias + causal_mask
    # Rows with no visible key: SDPA's kernels may give NaN there, forward or backward (exp(-inf - -inf)). Such rows
    # attend to every key instead (as Hugging Face's _unmask_unattended does), then their outputs are zeroed, which
    # also zeroes their incoming gradient: their probabilities meet dP = 0 and delta = 0, so dq, dk and dv get 0.
    empty_rows = (mask == float("-inf")).all(-1, keepdim=True)
    has_empty_rows = bool(empty_rows.any())
    if has_empty_rows:
        mask = mask.masked_fill(empty_rows, 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_aligned(mask), scale=scale, **kwargs)
    out = _AlignedGradient.apply(out)
    return out.masked_fill(empty_rows, 0) if has_empty_rows else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    layout: str = "bhsd",
) -> torch.Tensor:
    """`softmax(q·kᵀ·scale + mask)·v` as `torch.nn.functional.scaled_dot_product_attention` computes it, fused forward
    and backward with memory linear in the sequence length.

    q (B, Hq, S, D), k and v (B, Hkv, Sk, D) with Hq a multiple of Hkv (grouped-query / multi-query heads); with
    `layout="bshd"` all three are (B, S, H, D), as Hugging Face's projections give them (read in place; the output is
    (B, S, Hq, D) too). Any strides with the last dimension contiguous are read without copies.
    `causal`: query i sees keys j <= i + Sk - S (aligned bottom-right, as FlashAttention). `window` (causal only):
    also not keys j <= i + Sk - S - window (Mistral's and Gemma's sliding window). `softcap`: logits become
    softcap·tanh(logits / softcap) (Gemma 2) before the mask is added. `attn_mask`: boolean (True = attend) or
    additive (added in q's dtype), broadcastable to (B, Hq, S, Sk) (Hugging Face's 4-D masks); it gets no gradient.
    `key_padding_mask`: boolean (B, Sk), True for real tokens. `scale` defaults to 1/sqrt(D). Rows whose keys are
    all masked give zeros. Dropout is not supported (dropout_p must be 0). Metal and the reference run our kernels /
    our chunked composite; CUDA runs PyTorch's SDPA (the reference when softcap is set). Under torch.autocast q, k, v
    and a float mask are cast to the autocast dtype first, as SDPA's are."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D ({layout}), got shape {tuple(t.shape)}")
    if autocast_enabled(q.device.type):  # as SDPA under autocast: q, k, v and a float mask in the autocast dtype
        q, k, v = cast_like_linear(q.device.type, q, k, v)
        if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
            (attn_mask,) = cast_like_linear(q.device.type, attn_mask)
    check_same_device_dtype("q", q, k=k, v=v)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bhsd' (batch, heads, seq, head_dim) or 'bshd', got {layout!r}")
    if check_finite_number("dropout_p", dropout_p) != 0.0:
        raise ValueError(f"attention does not support dropout: dropout_p must be 0, got {dropout_p}")
    heads_last = layout == "bshd"
    if heads_last:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must match q in batch and head_dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if head_dim == 0:
        raise ValueError("head_dim must be positive")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's and v's heads ({kv_heads})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else check_finite_number("scale", scale)
    if softcap is None:
        softcap = 0.0
    elif check_finite_number("softcap", softcap) <= 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")
    softcap = float(softcap)
    if window is None:
        window = 0
    elif isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (keys per query, itself included), got {window!r}")
    elif not causal:
        raise ValueError("window needs causal=True: the sliding window is the causal window of the last `window` keys")
    causal = bool(causal)
    bias = _mask_bias(attn_mask, key_padding_mask, (batch, heads, q_len, kv_len), q.dtype, q.device)
    q, k, v = _unit_inner_stride(q), _unit_inner_stride(k), _unit_inner_stride(v)
    empty = q.numel() == 0 or kv_len == 0
    if _sdpa_route(q) and softcap == 0 and not empty and forced_backend() != "reference":
        out = _sdpa(q, k, v, bias, causal, window, scale)  # laid out as SDPA's kernel chose: made contiguous
        if out is not None:
            return out.transpose(1, 2).contiguous() if heads_last else out.contiguous()
    out = AttentionFunction.apply(q, k, v, bias, causal, window, scale, softcap, heads_last)
    return out.transpose(1, 2) if heads_last else out


__all__ = ["AttentionFunction", "attention"]


def self_test_cases(dtype: torch.dtype, device: str) -> list:
    """The doctor's self-test: causal grouped-query attention, 45 tokens (not a multiple of the blocks), head dim
    64, against PyTorch's scaled_dot_product_attention."""
    from torch_metal_fused.testing import SelfTestCase, sample

    return [
        SelfTestCase(
            lambda t: attention(t[0], t[1], t[2], causal=True),
            lambda t: torch.nn.functional.scaled_dot_product_attention(
                t[0], t[1].repeat_interleave(2, 1), t[2].repeat_interleave(2, 1), is_causal=True
            ),
            [sample((1, 4, 45, 64), dtype, device, 14), *(sample((1, 2, 45, 64), dtype, device, s) for s in (15, 16))],
        )
    ]
