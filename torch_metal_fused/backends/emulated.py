"""The "metal-emulated" backend: CPU tensors run through our Metal kernels on the Metal-on-CPU harness,
via the same launch code (csrc/include/tmf/launch) as the MPS dispatch. Native GEMMs (the LoRA base
products) run on torch's CPU matmul, as they run on MPS's native matmul on a Mac.
Opt in with TORCH_METAL_FUSED_BACKEND=metal-emulated."""

from __future__ import annotations

import torch

from torch_metal_fused import reference

_LORA_MAX_RANK = 256  # tmf::kLoraMaxRank (csrc/include/tmf/shader_args.h)


def available() -> tuple[bool, str]:
    try:
        from torch_metal_fused.emulator import runner

        runner.libraries()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _runner():
    from torch_metal_fused.emulator import runner

    return runner


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, cols) view of t with a unit inner stride (copying only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.ndim != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _output(shape, dtype: torch.dtype) -> torch.Tensor:
    """A kernel output, poisoned with NaN: an element a kernel never writes fails the contract instead of
    silently keeping what the allocator held (on a Mac it holds garbage)."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype)


# The native GEMMs in float16 run in float32 and round once to float16: torch's CPU float16 GEMM is a slow fallback
# (torch 2.13.0 here: 56 s for 512x4096 @ 4096x4096, against 0.06 s in bfloat16 and 0.15 s in float32), which made
# the emulated benchmark's float16 LoRA rows take a minute; a GPU's float16 GEMM accumulates in float32 too.
def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None and t.dtype == torch.float16 else t


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_wide(a) @ _wide(b)).to(a.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(_wide(x), _wide(weight), _wide(bias)).to(x.dtype)


def _merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W' = W + s·B·A, rounded once to W's dtype (as the native addmm gives it on MPS)."""
    return torch.addmm(_wide(weight), _wide(lora_b), _wide(lora_a), alpha=scale).to(weight.dtype)


def _row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def softmax_forward(x: torch.Tensor) -> torch.Tensor:
    y = _output(x.shape, x.dtype)
    if x.numel() == 0:
        return y
    x2 = _rows(x)
    _runner().launch("softmax_forward", x.dtype, x2, _row_stride(x2), y, x2.shape[0], x2.shape[1])
    return y


def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    dx = _output(y.shape, y.dtype)
    if y.numel() == 0:
        return dx
    y2, dy2 = _rows(y.contiguous()), _rows(dy)
    _runner().launch("softmax_backward", y.dtype, y2, dy2, _row_stride(dy2), dx, y2.shape[0], y2.shape[1])
    return dx


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0):
    if x.shape[-1] == 0:  # no kernel work: empty y, rstd = rsqrt(eps) as the reference defines it
        return reference.rms_norm_forward(x, weight, eps, offset)
    y = _output(x.shape, x.dtype)
    rstd = _output(x.shape[:-1], torch.float32)
    if x.numel() == 0:
        return y, rstd
    x2 = _rows(x)
    w = weight.contiguous() if weight is not None else None
    _runner().launch(
        "rms_norm_forward",
        x.dtype,
        x2,
        _row_stride(x2),
        w,
        y,
        rstd,
        x2.shape[0],
        x2.shape[1],
        float(eps),
        float(offset),
    )
    return y, rstd


def rms_norm_backward(dy, x, weight, rstd, needs_dx: bool, needs_dw: bool, offset: float = 0.0):
    cols = x.shape[-1]
    needs_dw = needs_dw and weight is not None
    dx = _output(x.shape, x.dtype) if needs_dx else None
    if x.numel() == 0 or not (needs_dx or needs_dw):
        return dx, (torch.zeros(cols, dtype=x.dtype, device=x.device) if needs_dw else None)
    dw = _output((cols,), x.dtype) if needs_dw else None  # as on MPS, not zero-filled: the reduce writes every column
    runner = _runner()
    x2, dy2 = _rows(x), _rows(dy)
    rows = x2.shape[0]
    partial = _output((runner.rms_norm_backward_groups(rows), cols), torch.float32) if needs_dw else None
    w = weight.contiguous() if weight is not None else None
    runner.launch(
        "rms_norm_backward",
        x.dtype,
        dy2,
        _row_stride(dy2),
        x2,
        _row_stride(x2),
        w,
        rstd.contiguous(),
        dx,
        partial,
        dw,
        rows,
        cols,
        float(offset),
    )
    return dx, dw


def lora_forward(x, weight, bias, lora_a, lora_b, scale: float, dropout_mask):
    tokens, in_features = x.shape
    rank = lora_a.shape[0]
    if rank > _LORA_MAX_RANK:  # the kernels' tiles take rank <= kLoraMaxRank
        return reference.lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_mask)
    if _runner().lora_use_merged_weight(tokens, in_features, dropout_mask is not None):
        merged = _merged_weight(weight, lora_a, lora_b, scale)  # W + s·B·A on the native matmul
        return _linear(x, merged, bias), _mm(x, lora_a.t())
    y = _linear(x, weight, bias).contiguous()  # the native GEMM
    h = _output((tokens, rank), x.dtype)
    if tokens == 0:
        return y, h
    x2 = _rows(x)
    mask = dropout_mask.contiguous() if dropout_mask is not None else None
    _runner().launch(
        "lora_forward_lowrank",
        x.dtype,
        x2,
        _row_stride(x2),
        lora_a.contiguous(),
        lora_b.contiguous(),
        mask,
        y,
        h,
        tokens,
        in_features,
        weight.shape[0],
        rank,
        float(scale),
    )
    return y, h


def lora_backward(dy, x, weight, lora_a, lora_b, h, scale: float, dropout_mask, needs):
    needs_dx, needs_dw, needs_db, needs_da, needs_dlb = needs
    rank = lora_a.shape[0]
    tokens = x.shape[0]
    if rank > _LORA_MAX_RANK:
        return reference.lora_backward(dy, x, weight, lora_a, lora_b, h, scale, dropout_mask, needs)
    dy2 = _rows(dy)
    dx = dw = dbias = da = dlb = None
    if _runner().lora_use_merged_weight(tokens, x.shape[1], dropout_mask is not None):
        if needs_dx:
            dx = _mm(dy2, _merged_weight(weight, lora_a, lora_b, scale))  # dy·W' = dy·W + dh·A
        if needs_da:
            da = _mm((_mm(dy2, lora_b) * scale).t(), x)
    elif needs_dx or needs_da:
        if needs_dx:
            dx = _mm(dy2, weight).contiguous()  # native GEMM; the kernel adds (dh·A)·mask in place
        dh = _output((tokens, rank), x.dtype)
        if tokens:
            mask = dropout_mask.contiguous() if dropout_mask is not None else None
            _runner().launch(
                "lora_backward_lowrank",
                x.dtype,
                dy2,
                _row_stride(dy2),
                lora_a.contiguous(),
                lora_b.contiguous(),
                mask,
                dh,
                dx,
                tokens,
                x.shape[1],
                weight.shape[0],
                rank,
                float(scale),
            )
        if needs_da:
            x_lora = x if dropout_mask is None else x * dropout_mask
            da = _mm(dh.t(), x_lora)
    if needs_dlb:
        dlb = _mm(dy2.t(), h) * scale
    if needs_dw:
        dw = _mm(dy2.t(), x)
    if needs_db:
        dbias = dy2.sum(0)
    return dx, dw, dbias, da, dlb


def cross_entropy_rows(logits, target, ignore_index: int, label_smoothing: float, softcap: float, row_scale, in_place):
    """shaders/cross_entropy.metal: per-row losses and, with row_scale, the gradient (over logits when in_place)."""
    rows, vocab = logits.shape
    loss = _output((rows,), torch.float32)
    if rows == 0:
        return loss, (logits if in_place else torch.empty_like(logits)) if row_scale is not None else None
    runner = _runner()
    logits2 = _rows(logits)
    grad = None
    if row_scale is not None:
        grad = logits if in_place else _output(logits.shape, logits.dtype)
        if in_place and not (logits.is_contiguous()):
            raise ValueError("in_place needs contiguous logits")
    runner.launch(
        "cross_entropy_rows",
        logits.dtype,
        logits2,
        _row_stride(logits2),
        target.to(torch.int32).contiguous(),
        row_scale.to(torch.float32).contiguous() if row_scale is not None else None,
        loss,
        grad,
        rows,
        vocab,
        runner.SignedInt(ignore_index),
        float(label_smoothing),
        float(softcap),
    )
    return loss, grad


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    """shaders/glu.metal: act(gate) · up."""
    out = _output(gate.shape, gate.dtype)
    if gate.numel() == 0:
        return out
    g2, u2 = _rows(gate), _rows(up)
    _runner().launch("glu_forward", gate.dtype, activation, g2, _row_stride(g2), u2, _row_stride(u2), out, *g2.shape)
    return out


def glu_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """shaders/glu.metal: (dout · up · act'(gate), dout · act(gate))."""
    dgate, dup = _output(gate.shape, gate.dtype), _output(gate.shape, gate.dtype)
    if gate.numel() == 0:
        return dgate, dup
    g2, u2, d2 = _rows(gate), _rows(up), _rows(dout)
    _runner().launch(
        "glu_backward",
        gate.dtype,
        activation,
        g2,
        _row_stride(g2),
        u2,
        _row_stride(u2),
        d2,
        _row_stride(d2),
        dgate,
        dup,
        *g2.shape,
    )
    return dgate, dup


def rope_apply(q, k, cos, sin, interleaved: bool, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """shaders/rope.metal: q and k (batch, heads, seq, head_dim; any strides with head_dim contiguous) rotated by
    cos/sin (contiguous (1 or batch, seq, rotary_dim)) in one dispatch; outputs contiguous."""
    q_out, k_out = _output(q.shape, q.dtype), _output(k.shape, k.dtype)
    if q.numel() + k.numel() == 0:
        return q_out, k_out
    q, k = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    batch, _, seq, head_dim = q.shape

    def operand(t):
        return (t, t.stride(0), t.stride(1), t.stride(2), t.shape[1])

    _runner().launch(
        "rope_apply",
        q.dtype,
        *operand(q),
        *operand(k),
        cos,
        sin,
        cos.shape[0],
        q_out,
        k_out,
        batch,
        seq,
        head_dim,
        cos.shape[-1],
        int(interleaved),
        int(backward),
    )
    return q_out, k_out


def rms_norm_add_forward(x, residual, weight, eps: float, offset: float):
    """shaders/rms_norm.metal, add variants: (y, h, rstd) with h = x + residual (contiguous) normalised in one pass."""
    if x.shape[-1] == 0 or x.numel() == 0:
        return reference.rms_norm_add_forward(x, residual, weight, eps, offset)
    y, h = _output(x.shape, x.dtype), _output(x.shape, x.dtype)
    rstd = _output(x.shape[:-1], torch.float32)
    x2, r2 = _rows(x), _rows(residual)
    _runner().launch(
        "rms_norm_add_forward",
        x.dtype,
        x2,
        _row_stride(x2),
        r2,
        _row_stride(r2),
        weight.contiguous(),
        y,
        h,
        rstd,
        x2.shape[0],
        x2.shape[1],
        float(eps),
        float(offset),
    )
    return y, h, rstd


def rms_norm_add_backward(dy, dh, h, weight, rstd, needs_dw: bool, offset: float):
    """(dx, dw): dx = RMSNorm's dx from dy plus dh (the gradient of both x and the residual)."""
    cols = h.shape[-1]
    if h.numel() == 0:
        return reference.rms_norm_add_backward(dy, dh, h, weight, rstd, needs_dw, offset)
    runner = _runner()
    dx = _output(h.shape, h.dtype)
    dw = _output((cols,), h.dtype) if needs_dw else None
    dy2, dh2 = _rows(dy), _rows(dh)
    rows = dy2.shape[0]
    partial = _output((runner.rms_norm_backward_groups(rows), cols), torch.float32) if needs_dw else None
    runner.launch(
        "rms_norm_add_backward",
        h.dtype,
        dy2,
        _row_stride(dy2),
        dh2,
        _row_stride(dh2),
        h.contiguous(),
        weight.contiguous(),
        rstd.contiguous(),
        dx,
        partial,
        dw,
        rows,
        cols,
        float(offset),
    )
    return dx, dw
