"""Plain-PyTorch reference implementations of every kernel entry point.

They serve tensors no kernel backend takes (CPU, float64, forced reference) and define the semantics the
Metal, CUDA and emulated kernels are tested against. Low-precision inputs are computed in float32 and
rounded once at the end, as the kernels do. Each function takes rows in the last dimension.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_forward(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.to(_compute_dtype(x.dtype)), dim=-1).to(x.dtype)


def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    ct = _compute_dtype(y.dtype)
    yf, dyf = y.to(ct), dy.to(ct)
    return (yf * (dyf - (dyf * yf).sum(-1, keepdim=True))).to(y.dtype)


def rms_norm_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x², -1) + eps) per row, in float32 (float64 for float64 x), shape x.shape[:-1]; differentiable."""
    ct = _compute_dtype(x.dtype)
    if x.shape[-1] > 0:
        return torch.rsqrt(x.to(ct).square().mean(-1) + eps)
    # empty rows: rsqrt(0 + eps), inf for eps = 0 (a Python eps ** -0.5 would raise)
    return torch.full(x.shape[:-1], eps, dtype=ct, device=x.device).rsqrt()


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns y = x * rstd * (weight + offset) and the per-row rstd (float32, or float64 for float64 input),
    shape x.shape[:-1]."""
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    rstd = rms_norm_rstd(x, eps)
    y = xf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * (weight.to(ct) + offset)
    return y.to(x.dtype), rstd


def _rms_norm_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    needs_dx: bool,
    needs_dw: bool,
    offset: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RMSNorm's dx and dw in the compute dtype (unrounded), shared by rms_norm_backward and rms_norm_add_backward."""
    ct = _compute_dtype(x.dtype)
    xf, dyf, r = x.to(ct), dy.to(ct), rstd.to(ct).unsqueeze(-1)
    g = dyf * (weight.to(ct) + offset) if weight is not None else dyf
    dx = dw = None
    if needs_dx:
        n = max(x.shape[-1], 1)
        dot = (g * xf).sum(-1, keepdim=True) / n
        dx = r * (g - xf * r.square() * dot)
    if needs_dw and weight is not None:
        per_row = dyf * xf * r
        cols = x.shape[-1]
        dw = per_row.reshape(-1, cols).sum(0) if cols else per_row.new_zeros(0)
    return dx, dw


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    needs_dx: bool,
    needs_dw: bool,
    offset: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    dx, dw = _rms_norm_grads(dy, x, weight, rstd, needs_dx, needs_dw, offset)
    return (dx.to(x.dtype) if dx is not None else None), (dw.to(weight.dtype) if dw is not None else None)


def rms_norm_add_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd): h = x + residual in x's dtype (as the unfused add rounds it), y = RMSNorm(h)."""
    h = (x + residual).contiguous()
    y, rstd = rms_norm_forward(h, weight, eps, offset)
    return y, h, rstd


def rms_norm_add_backward(
    dy: torch.Tensor,
    dh: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    needs_dw: bool,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dw): dx = RMSNorm's dx (from dy, in float32) + dh, rounded once — the gradient of x and of the residual."""
    dx, dw = _rms_norm_grads(dy, h, weight, rstd, True, needs_dw, offset)
    dx = (dx + dh.to(dx.dtype)).to(h.dtype).contiguous()
    return dx, (dw.to(weight.dtype) if dw is not None else None)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x is 2-D (tokens, in). Returns y (tokens, out) and h = dropout(x) @ lora_aᵀ (tokens, r). Adapters in another
    dtype than x (PEFT's float32 adapters on a half-precision model) follow PEFT's forward: x cast to the adapters'
    dtype for the low-rank product, the base output cast to it for the sum, the sum cast back to x's dtype."""
    y = torch.nn.functional.linear(x, weight, bias)
    x_lora = x if dropout_mask is None else x * dropout_mask
    h = x_lora.to(lora_a.dtype) @ lora_a.t()
    if lora_a.dtype != y.dtype:
        return torch.addmm(y.to(lora_a.dtype), h, lora_b.t(), alpha=scale).to(y.dtype), h
    y.addmm_(h, lora_b.t(), alpha=scale)
    return y, h


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    scale: float,
    dropout_mask: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, dweight, dbias, dlora_a, dlora_b); entries not needed are None and not computed. dlora_a and
    dlora_b come in the adapters' dtype; with adapters in another dtype than x, the adapter path's part of dx is
    computed in theirs and cast to x's before the sum (as autograd does through PEFT's cast of x)."""
    needs_dx, needs_dw, needs_db, needs_da, needs_dlb = needs
    adapter_dtype = lora_a.dtype
    dx = dw = dbias = da = dlb = None
    dh = None
    if needs_dx or needs_da:
        dh = (dy.to(adapter_dtype) @ lora_b) * scale
    if needs_dlb:
        dlb = (dy.t().to(adapter_dtype) @ h) * scale
    if needs_da:
        x_lora = x if dropout_mask is None else x * dropout_mask
        da = dh.t() @ x_lora.to(adapter_dtype)
    if needs_dx:
        lora_dx = dh @ lora_a
        if dropout_mask is not None:
            lora_dx = lora_dx * dropout_mask
        dx = torch.addmm(lora_dx.to(dy.dtype), dy, weight)
    if needs_dw:
        dw = dy.t() @ x
    if needs_db:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, dlb


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    row_scale: torch.Tensor | None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of each row of `logits` (rows, vocab) against `target` (rows,), in float32 (float64 for
    float64), with Gemma-2's soft-capping z = softcap·tanh(logits / softcap) when softcap > 0 and torch's label
    smoothing: loss = logsumexp(z) - (1 - ε)·z[target] - ε·mean(z). Rows whose target is ignore_index have loss 0.

    With `row_scale` (rows,), also returns d(Σ row_scale·loss)/d(logits) in the logits' dtype (ignored rows: 0):
    row_scale·(softmax(z) - (1 - ε)·onehot(target) - ε / vocab), times 1 - tanh² under soft-capping; with
    `in_place`, written over `logits` (which is returned as the gradient)."""
    ct = _compute_dtype(logits.dtype)
    z = logits.to(ct)
    capped = None
    if softcap > 0:
        capped = torch.tanh(z / softcap)
        z = capped * softcap
    # log_softmax's composition, not torch.logsumexp: logsumexp returns +inf for a row holding +inf, where
    # F.cross_entropy's log_softmax gives NaN (inf - inf) for the loss and every gradient element; the kernels follow
    # F.cross_entropy.
    if z.numel():
        row_max = z.amax(-1, keepdim=True)  # NaN-propagating; exp(NaN) below makes the row NaN either way
        lse = (row_max + torch.exp(z - row_max).sum(-1, keepdim=True).log()).squeeze(-1)
    else:  # no rows (amax refuses an empty vocabulary)
        lse = z.sum(-1)
    valid = target != ignore_index
    z_target = z.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    loss = lse - (1.0 - label_smoothing) * z_target
    if label_smoothing > 0:
        loss = loss - label_smoothing * z.mean(-1)
    loss = torch.where(valid, loss, torch.zeros((), dtype=ct, device=loss.device))
    if row_scale is None:
        return loss, None
    grad = torch.exp(z - lse.unsqueeze(-1))  # softmax(z)
    if label_smoothing > 0:
        grad -= label_smoothing / z.shape[-1]
    grad.scatter_add_(
        -1,
        torch.where(valid, target, 0).unsqueeze(-1),
        torch.full((z.shape[0], 1), -(1.0 - label_smoothing), dtype=ct, device=z.device),
    )
    if capped is not None:
        grad *= 1.0 - capped * capped
    zero = torch.zeros((), dtype=ct, device=z.device)
    grad = torch.where(valid.unsqueeze(-1), grad * row_scale.to(ct).unsqueeze(-1), zero)
    if in_place:
        return loss, logits.copy_(grad)
    return loss, grad.to(logits.dtype)


GLU_SILU, GLU_GELU_TANH = 0, 1  # tmf::kGluSilu, tmf::kGluGeluTanh (csrc/include/tmf/shader_args.h)
_GELU_BETA, _GELU_KAPPA = 0.7978845608028654, 0.044715  # √(2/π); PyTorch's approximate="tanh"


def _glu_act(g: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == GLU_SILU:
        return torch.nn.functional.silu(g)
    return 0.5 * g * (1.0 + torch.tanh(_GELU_BETA * (g + _GELU_KAPPA * g * g * g)))


def _glu_act_derivative(g: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == GLU_SILU:
        s = torch.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    t = torch.tanh(_GELU_BETA * (g + _GELU_KAPPA * g * g * g))
    sech2 = 1.0 - t * t
    slope = 0.5 * g * sech2 * _GELU_BETA * (1.0 + 3.0 * _GELU_KAPPA * g * g)
    # where tanh² rounds to 1 for a finite g the slope is ~0 (not 0 · inf once g² overflows), as the kernels compute it
    slope = torch.where((sech2 == 0) & torch.isfinite(g), torch.zeros((), dtype=g.dtype, device=g.device), slope)
    return 0.5 * (1.0 + t) + slope


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    """act(gate) · up, act = silu (SwiGLU) or gelu with the tanh approximation (GeGLU)."""
    ct = _compute_dtype(gate.dtype)
    return (_glu_act(gate.to(ct), activation) * up.to(ct)).to(gate.dtype).contiguous()


def glu_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dout · up · act'(gate), dout · act(gate)), act recomputed from gate; `in_place`: written over gate and up
    (contiguous), which are returned."""
    ct = _compute_dtype(gate.dtype)
    g, u, d = gate.to(ct), up.to(ct), dout.to(ct)
    dgate = d * u * _glu_act_derivative(g, activation)
    dup = d * _glu_act(g, activation)
    if in_place:
        return gate.copy_(dgate), up.copy_(dup)
    return dgate.to(gate.dtype).contiguous(), dup.to(gate.dtype).contiguous()


def rope_apply(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (batch, q_heads, seq, head_dim) and k (batch, k_heads, seq, head_dim) with cos/sin
    (1 or batch, seq, rotary_dim): per pair (a, b) — (i, i + rotary_dim/2), or (2i, 2i + 1) interleaved —
    out_a = x_a·cos_a - x_b·sin_a, out_b = x_b·cos_b + x_a·sin_b; with `backward`, the transpose (x: the incoming
    gradients): out_a = x_a·cos_a + x_b·sin_b, out_b = x_b·cos_b - x_a·sin_a. Elements past rotary_dim are copied.
    Outputs contiguous."""
    ct = _compute_dtype(q.dtype)
    r = cos.shape[-1]
    c, s = cos.to(ct).unsqueeze(1), sin.to(ct).unsqueeze(1)  # broadcast over heads
    first, second = (slice(0, r, 2), slice(1, r, 2)) if interleaved else (slice(0, r // 2), slice(r // 2, r))
    ca, cb, sa, sb = c[..., first], c[..., second], s[..., first], s[..., second]
    sin_for_a, sin_for_b = (-sb, -sa) if backward else (sa, sb)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.to(ct)
        a, b = xf[..., first], xf[..., second]
        out_a, out_b = a * ca - b * sin_for_a, b * cb + a * sin_for_b
        rotated = torch.stack((out_a, out_b), -1).flatten(-2) if interleaved else torch.cat((out_a, out_b), -1)
        return torch.cat((rotated, xf[..., r:]), -1).to(x.dtype).contiguous()

    return rotate(q), rotate(k)


# ---- attention ----------------------------------------------------------------------------------------------------
# Query rows per chunk: at most this many scores (chunk rows x keys x heads x batch) live at once, so the reference
# stays O(sequence) in memory like the kernels (never a batch x heads x S x Sk tensor for long sequences).
ATTENTION_CHUNK_SCORES = 2**22


def _attention_chunks(batch: int, heads: int, q_len: int, kv_len: int) -> int:
    return max(1, min(q_len, ATTENTION_CHUNK_SCORES // max(1, batch * heads * kv_len)))


def attention_visible(rows: torch.Tensor, kv_len: int, q_len: int, causal: bool, window: int) -> torch.Tensor | None:
    """(len(rows), kv_len) bool: which keys query rows `rows` may see. Causal is aligned bottom-right (query i sees
    keys j <= i + kv_len - q_len, as FlashAttention); a window W (causal only) also drops keys j <= i + offset - W.
    None when every key is visible."""
    if not causal:
        return None
    offset = kv_len - q_len
    i = rows.unsqueeze(-1) + offset
    j = torch.arange(kv_len, device=rows.device)
    visible = j <= i
    if window > 0:
        visible = visible & (j > i - window)
    return visible


def _attention_scores(qc, k, bias_c, rows, q_len, causal, window, scale, softcap):
    """Scores of a chunk of query rows, grouped by kv head: qc (B, Hkv, G, C, D), k (B, Hkv, 1, Sk, D) ->
    (scores (B, Hkv, G, C, Sk) with invisible keys at -inf, tanh of the soft-capped logits or None)."""
    s = (qc @ k.transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if bias_c is not None:
        s = s + bias_c
    visible = attention_visible(rows, k.shape[-2], q_len, causal, window)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return s, t


def _grouped(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, ...) -> (B, Hkv, G, ...): query heads grouped by the kv head they share."""
    return t.unflatten(1, (kv_heads, t.shape[1] // kv_heads))


def _bias_chunk(bias, batch, heads, kv_heads, lo, hi, ct):
    if bias is None:
        return None
    b = bias[:, :, lo:hi] if bias.shape[2] > 1 else bias
    return _grouped(b.to(ct).expand(batch, heads, -1, -1), kv_heads)


def attention_forward(q, k, v, bias, causal: bool, window: int, scale: float, softcap: float, heads_last: bool):
    """(out, lse): softmax(q·kᵀ·scale (soft-capped: softcap·tanh(·/softcap)) + bias, invisible keys dropped)·v per
    query head, kv head h // (Hq / Hkv). q (B, Hq, S, D), k and v (B, Hkv, Sk, D); bias None or (B|1, Hq|1, S|1, Sk)
    additive (-inf drops a key); rows with no visible key give zeros and lse = -inf. lse (B, Hq, S) in float32
    (float64 for float64 input); out (B, Hq, S, D), laid out (B, S, Hq, D) in memory when heads_last."""
    ct = _compute_dtype(q.dtype)
    batch, heads, q_len, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = torch.zeros(batch, heads, q_len, d, dtype=ct, device=q.device)
    lse = torch.full((batch, heads, q_len), float("-inf"), dtype=ct, device=q.device)
    kf, vf = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)
    chunk = _attention_chunks(batch, heads, q_len, kv_len)
    for lo in range(0, q_len if kv_len else 0, chunk):
        hi = min(q_len, lo + chunk)
        rows = torch.arange(lo, hi, device=q.device)
        qc = _grouped(q[:, :, lo:hi].to(ct), kv_heads)
        s, _ = _attention_scores(
            qc, kf, _bias_chunk(bias, batch, heads, kv_heads, lo, hi, ct), rows, q_len, causal, window, scale, softcap
        )
        m = s.amax(-1, keepdim=True)
        m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        p = torch.exp(s - m_safe)
        denom = p.sum(-1, keepdim=True)
        o = (p @ vf) / torch.where(denom == 0, torch.ones_like(denom), denom)
        out[:, :, lo:hi] = o.flatten(1, 2)
        lse[:, :, lo:hi] = (m_safe + torch.log(denom)).squeeze(-1).flatten(1, 2)
    out = out.to(q.dtype)
    if heads_last:
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, bias, causal: bool, window: int, scale: float, softcap: float):
    """(dq, dk, dv) of attention_forward, probabilities recomputed per query chunk from lse; delta = rowsum(dout·out)
    of the rounded output, as the kernels compute it. Gradients in q's, k's and v's shapes (contiguous)."""
    ct = _compute_dtype(q.dtype)
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    kf, vf = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros((batch, kv_heads, kv_len, q.shape[3]), dtype=ct, device=q.device)
    dv = torch.zeros_like(dk)
    delta = (dout.to(ct) * out.to(ct)).sum(-1)
    chunk = _attention_chunks(batch, heads, q_len, kv_len)
    for lo in range(0, q_len if kv_len else 0, chunk):
        hi = min(q_len, lo + chunk)
        rows = torch.arange(lo, hi, device=q.device)
        qc = _grouped(q[:, :, lo:hi].to(ct), kv_heads)
        doc = _grouped(dout[:, :, lo:hi].to(ct), kv_heads)
        s, t = _attention_scores(
            qc, kf, _bias_chunk(bias, batch, heads, kv_heads, lo, hi, ct), rows, q_len, causal, window, scale, softcap
        )
        lse_c = _grouped(lse[:, :, lo:hi].to(ct), kv_heads).unsqueeze(-1)
        dropped = (s == float("-inf")) | (lse_c == float("-inf"))
        p = torch.exp(s - torch.where(lse_c == float("-inf"), torch.zeros_like(lse_c), lse_c)).masked_fill(dropped, 0)
        dv += (p.transpose(-1, -2) @ doc).sum(2)
        dp = doc @ vf.transpose(-1, -2)
        ds = (p * (dp - _grouped(delta[:, :, lo:hi], kv_heads).unsqueeze(-1))).masked_fill(dropped, 0)
        if t is not None:
            ds = ds * (1 - t * t)
        ds = ds * scale
        dq[:, :, lo:hi] = (ds @ kf).flatten(1, 2)
        dk += (ds.transpose(-1, -2) @ qc).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
