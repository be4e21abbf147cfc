"""One setup per kernel, shared by the speed and memory runs: for an (op, provider, shape, dtype, mode) it builds
the inputs and returns a callable that runs the op once, plus the minimal bytes and FLOPs of that work.

Providers: "fused" is torch_metal_fused (whatever backend serves the device); the others are the baselines the
issue names — native torch ops, Hugging Face-style eager code, and Liger-Kernel / PEFT where installed.

cross_entropy is the chunked linear cross-entropy (`tmf.linear_cross_entropy`), shape (tokens, hidden, vocab), against
the unfused `F.cross_entropy(hidden @ weight.T, target)` ("torch") and Liger-Kernel's fused linear cross-entropy
("liger", CUDA). Its fused and Liger forward already compute the gradients of hidden and weight (both require grad),
so their "forward" rows include that work and their "backward" rows only scale the saved gradients; compare
forward_backward across providers.

swiglu (tokens, intermediate), rope (batch, seq, q_heads, kv_heads, head_dim) and add_rms_norm (rows, hidden) compare
the fused ops with the unfused formulas Hugging Face's models run ("torch"/"hf_eager") and Liger-Kernel's SwiGLU and
RoPE ("liger", CUDA).

attention (batch, seq, q_heads, kv_heads, head_dim), causal self-attention with grouped-query heads, q, k and v made
as Hugging Face's attention makes them ((batch, seq, heads, head_dim) projections transposed to (batch, heads, seq,
head_dim) views): `tmf.attention` ("fused"), `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`
("sdpa": on MPS under autograd the composite math path, which keeps the batch x heads x seq² probabilities for
backward; on CUDA PyTorch's fused flash / memory-efficient kernels, which our op also routes to there, so on CUDA the
two rows differ only by our wrapper) and transformers' eager attention ("hf_eager": repeat_kv, q·kᵀ·scale plus an
additive causal mask, softmax in float32, ·v). Every provider returns (batch, heads, seq, head_dim); Hugging Face's
final transpose to (batch, seq, heads, head_dim) is left out of all of them. FLOPs (the FlashAttention papers'
convention): forward 4 x batch x q_heads x seq x kv_seq x head_dim, halved for causal; backward 2.5 x the forward
(five matmuls against two); forward_backward 3.5 x.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

import torch_metal_fused as tmf

MODES = ("forward", "backward", "forward_backward")
OPS = ("softmax", "rms_norm", "lora", "cross_entropy", "swiglu", "rope", "add_rms_norm", "attention")
# Ops whose inputs are a few same-shaped activations (no weights but RMSNorm's): prepared by _prepare_activation.
ACTIVATION_OPS = ("swiglu", "rope", "add_rms_norm")


@dataclass(frozen=True)
class Case:
    op: str
    # softmax/rms_norm: (rows, cols); lora: (tokens, in, out, r); cross_entropy: (tokens, hidden, vocab);
    # rope/attention: (batch, seq, q_heads, kv_heads, head_dim)
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))


@dataclass
class Prepared:
    run: Callable[[], object]
    min_bytes: int  # each input read once, each output written once (weights of LoRA included)
    flops: int
    sets: int  # input sets rotated between calls


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def providers(op: str, device: torch.device) -> list[str]:
    names = {
        "softmax": ["fused", "torch"],
        "rms_norm": ["fused", "torch", "hf_eager"],
        "lora": ["fused", "eager", "matmul"],
        "cross_entropy": ["fused", "torch"],
        "swiglu": ["fused", "torch"],
        "rope": ["fused", "hf_eager"],
        "add_rms_norm": ["fused", "torch", "hf_eager"],
        "attention": ["fused", "sdpa", "hf_eager"],
    }[op]
    liger_ops = ("softmax", "rms_norm", "cross_entropy", "swiglu", "rope", "add_rms_norm")
    if device.type == "cuda" and _has("liger_kernel") and op in liger_ops:
        names.append("liger")
    if op == "lora" and _has("peft"):
        names.append("peft")
    return names


def _rotate(sets: list) -> Callable[[], object]:
    """Cycle through several input sets so that repeated calls don't time a warm cache."""
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]

    return nxt


def _n_sets(nbytes: int) -> int:
    # Enough distinct inputs to exceed a large last-level cache (~64 MB on GPUs, far less on M-series).
    return max(1, min(8, (256 << 20) // max(nbytes, 1)))


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # What Hugging Face's LlamaRMSNorm does: float32 statistics, cast back, then the weight.
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def _row_op(case: Case, provider: str) -> Callable:
    cols = case.shape[1]
    if case.op == "softmax":
        if provider == "fused":
            return lambda x, w: tmf.softmax(x, -1)
        if provider == "torch":
            return lambda x, w: torch.softmax(x, -1)
        if provider == "liger":
            from liger_kernel.ops.softmax import LigerSoftmaxFunction

            return lambda x, w: LigerSoftmaxFunction.apply(x)
    else:
        if provider == "fused":
            return lambda x, w: tmf.rms_norm(x, w, 1e-6)
        if provider == "torch":
            return lambda x, w: torch.nn.functional.rms_norm(x, (cols,), w, 1e-6)
        if provider == "hf_eager":
            return _hf_rms_norm
        if provider == "liger":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6)
    raise ValueError(f"unknown provider {provider} for {case.op}")


def _grads(y: torch.Tensor, dy: torch.Tensor, *inputs: torch.Tensor, retain_graph: bool = False) -> None:
    """The gradients of every input that requires one, returned, not accumulated into `.grad`: accumulating
    would add a read-add-write of x's size to every rep (what do_bench's grad_to_none avoids in Liger's
    benchmarks)."""
    torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy, retain_graph=retain_graph)


def _prepare_rows(case: Case, provider: str, device: torch.device) -> Prepared:
    rows, cols = case.shape
    es = torch.finfo(case.dtype).bits // 8
    fn = _row_op(case, provider)
    n = _n_sets(3 * rows * cols * es)
    g = torch.Generator(device="cpu").manual_seed(0)

    def make():
        x = torch.randn(rows, cols, generator=g).to(device=device, dtype=case.dtype).requires_grad_(True)
        dy = torch.randn(rows, cols, generator=g).to(device=device, dtype=case.dtype)
        return x, dy

    w = (torch.rand(cols, generator=g) + 0.5).to(device=device, dtype=case.dtype)
    if case.op == "rms_norm":
        w.requires_grad_(True)
    sets = [make() for _ in range(n)]
    nxt = _rotate(sets)
    if case.mode == "forward":

        def run():
            x, _ = nxt()
            return fn(x, w)

    elif case.mode == "backward":
        outs = [(fn(x, w), dy, x) for x, dy in sets]
        nxt_out = _rotate(outs)

        def run():
            y, dy, x = nxt_out()
            _grads(y, dy, x, w, retain_graph=True)

    else:

        def run():
            x, dy = nxt()
            _grads(fn(x, w), dy, x, w)

    return Prepared(run, _rows_min_bytes(case), 0, n)


def _rows_min_bytes(case: Case) -> int:
    """Forward reads x and writes y; backward reads y (softmax) or x (RMSNorm) and dy and writes dx; the weight and
    RMSNorm's per-row statistics are not counted (a row's worth or one value per row)."""
    rows, cols = case.shape
    io = rows * cols * (torch.finfo(case.dtype).bits // 8)
    return {"forward": 2, "backward": 3, "forward_backward": 5}[case.mode] * io


def _prepare_lora(case: Case, provider: str, device: torch.device) -> Prepared:
    tokens, fin, fout, r = case.shape
    es = torch.finfo(case.dtype).bits // 8
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0, grad=False):
        t = (torch.randn(*s, generator=g) * scale).to(device=device, dtype=case.dtype)
        return t.requires_grad_(grad)

    weight, bias = rnd(fout, fin, scale=fin**-0.5), rnd(fout)
    a, b = rnd(r, fin, scale=fin**-0.5, grad=True), rnd(fout, r, scale=r**-0.5, grad=True)
    scale = 2.0
    if provider == "fused":
        fn = lambda x: tmf.lora_linear(x, weight, a, b, scale, bias)  # noqa: E731
    elif provider == "eager":
        fn = lambda x: torch.nn.functional.linear(x, weight, bias) + scale * ((x @ a.t()) @ b.t())  # noqa: E731
    elif provider == "matmul":
        fn = lambda x: x @ weight.t()  # noqa: E731
    elif provider == "peft":
        from peft import LoraConfig, get_peft_model

        holder = torch.nn.Module()
        holder.proj = torch.nn.Linear(fin, fout, device=device, dtype=case.dtype)
        with torch.no_grad():
            holder.proj.weight.copy_(weight)
            holder.proj.bias.copy_(bias)
        model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=int(scale * r), target_modules=["proj"]))
        model.to(device=device, dtype=case.dtype)
        fn = model.base_model.model.proj
        a, b = fn.lora_A["default"].weight, fn.lora_B["default"].weight  # the adapter weights PEFT trains
    else:
        raise ValueError(f"unknown provider {provider} for lora")
    n = _n_sets((tokens * (fin + fout)) * es)
    sets = [(rnd(tokens, fin, grad=True), rnd(tokens, fout)) for _ in range(n)]
    nxt = _rotate(sets)
    min_bytes, flops = _lora_min_bytes_flops(case)
    if case.mode == "forward":

        def run():
            x, _ = nxt()
            return fn(x)

    elif case.mode == "backward":
        outs = [(fn(x), dy, x) for x, dy in sets]
        nxt_out = _rotate(outs)

        def run():
            y, dy, x = nxt_out()
            _grads(y, dy, x, a, b, retain_graph=True)

    else:

        def run():
            x, dy = nxt()
            _grads(fn(x), dy, x, a, b)

    return Prepared(run, min_bytes, flops, n)


def _lora_min_bytes_flops(case: Case) -> tuple[int, int]:
    """The whole LoRA linear (base GEMM included): forward reads x, W, A, B and writes y; backward (W frozen)
    computes dx = dy·W (+ the rank-r parts), dA and dB."""
    tokens, fin, fout, r = case.shape
    es = torch.finfo(case.dtype).bits // 8
    fwd_bytes = (tokens * fin + fout * fin + r * (fin + fout) + tokens * fout) * es
    fwd_flops = 2 * tokens * fin * fout + 2 * tokens * r * (fin + fout)
    bwd_bytes = (2 * tokens * fout + fout * fin + 2 * tokens * fin + 2 * r * (fin + fout)) * es
    bwd_flops = 2 * tokens * fin * fout + 6 * tokens * r * (fin + fout)
    per_mode = {
        "forward": (fwd_bytes, fwd_flops),
        "backward": (bwd_bytes, bwd_flops),
        "forward_backward": (fwd_bytes + bwd_bytes, fwd_flops + bwd_flops),
    }
    return per_mode[case.mode]


def _ce_fn(provider: str, weight: torch.Tensor) -> Callable:
    if provider == "fused":
        return lambda h, t: tmf.linear_cross_entropy(h, weight, t)
    if provider == "torch":  # the unfused path: tokens x vocab logits, then torch's cross-entropy
        return lambda h, t: torch.nn.functional.cross_entropy(h @ weight.t(), t)
    if provider == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()

        def liger(h, t):
            out = loss_fn(weight, h, t)
            return out[0] if isinstance(out, tuple) else out  # (loss, z_loss) with return_z_loss

        return liger
    raise ValueError(f"unknown provider {provider} for cross_entropy")


def _ce_inputs(case: Case, device: torch.device, g: torch.Generator):
    tokens, hidden, vocab = case.shape

    def make():
        h = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=case.dtype).requires_grad_(True)
        return h, torch.randint(0, vocab, (tokens,), generator=g).to(device)

    weight = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device=device, dtype=case.dtype)
    return make, weight.requires_grad_(True)


def _prepare_ce(case: Case, provider: str, device: torch.device) -> Prepared:
    tokens, hidden, vocab = case.shape
    es = torch.finfo(case.dtype).bits // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    make, weight = _ce_inputs(case, device, g)
    fn = _ce_fn(provider, weight)
    n = _n_sets((tokens * hidden + tokens * vocab) * es)  # the logits count: the unfused path materialises them
    sets = [make() for _ in range(n)]
    nxt = _rotate(sets)
    dy = torch.ones((), device=device, dtype=case.dtype)  # the loss is a scalar (reduction "mean")
    if case.mode == "forward":  # fused and liger: the gradients are computed here

        def run():
            h, t = nxt()
            return fn(h, t)

    elif case.mode == "backward":  # fused and liger: only scales the gradients their forward computed
        outs = [(fn(h, t), h) for h, t in sets]
        nxt_out = _rotate(outs)

        def run():
            y, h = nxt_out()
            _grads(y, dy, h, weight, retain_graph=True)

    else:

        def run():
            h, t = nxt()
            _grads(fn(h, t), dy, h, weight)

    min_bytes, flops = _ce_min_bytes_flops(case)
    return Prepared(run, min_bytes, flops, n)


def _ce_min_bytes_flops(case: Case) -> tuple[int, int]:
    """The whole linear cross-entropy (the logits GEMM included, the logits themselves never stored): forward reads
    hidden, weight and the targets (the loss is a scalar); backward reads them again and writes dhidden and dweight
    (the logits recomputed or kept are not counted). Per mode as the unfused path splits the work, although the fused
    and Liger forward already do the backward's work (their forward rows move and compute more than this)."""
    tokens, hidden, vocab = case.shape
    es = torch.finfo(case.dtype).bits // 8
    fwd_bytes = (tokens * hidden + vocab * hidden) * es + 4 * tokens
    fwd_flops = 2 * tokens * hidden * vocab
    bwd_bytes = 2 * (tokens * hidden + vocab * hidden) * es + 4 * tokens
    bwd_flops = 4 * tokens * hidden * vocab
    per_mode = {
        "forward": (fwd_bytes, fwd_flops),
        "backward": (bwd_bytes, bwd_flops),
        "forward_backward": (fwd_bytes + bwd_bytes, fwd_flops + bwd_flops),
    }
    return per_mode[case.mode]


def ce_rows_min_bytes(case: Case) -> int:
    """The minimum of the Metal row-pass kernels alone (the native GEMMs apart), as the harness counts them: per row
    pass the chunk's logits read once and their gradient written once (over them), plus 4 B per row each for the
    target read and the loss written. The fused forward runs the row pass (the gradients are computed there); its
    backward only scales them, with no Metal kernel (minimum 0)."""
    tokens, _, vocab = case.shape
    es = torch.finfo(case.dtype).bits // 8
    forward = 2 * tokens * vocab * es + 8 * tokens
    return {"forward": forward, "backward": 0, "forward_backward": forward}[case.mode]


def lora_lowrank_min_bytes(case: Case) -> int:
    """The minimum of the Metal low-rank kernels alone (the native GEMMs apart), as the harness counts them:
    forward reads x, A, B and y (the base output) and writes y and h; backward (trainable x) reads dy, A, B and
    dx (holding dy·W) and writes dx and dh."""
    tokens, fin, fout, r = case.shape
    es = torch.finfo(case.dtype).bits // 8
    forward = tokens * fin + r * (fin + fout) + 2 * tokens * fout + tokens * r
    backward = tokens * fout + r * (fin + fout) + 2 * tokens * fin + tokens * r
    per_mode = {"forward": forward, "backward": backward, "forward_backward": forward + backward}
    return per_mode[case.mode] * es


# ---- SwiGLU, RoPE, residual add + RMSNorm ------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)


def _activation_fn(op: str, provider: str) -> Callable:
    """provider -> fn(*inputs, *constants) returning the op's output (a tensor or a tuple of tensors)."""
    if op == "swiglu":
        if provider == "fused":
            return tmf.swiglu
        if provider == "torch":  # what LlamaMLP does: act_fn(gate) * up
            return lambda g, u: torch.nn.functional.silu(g) * u
        if provider == "liger":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply
    if op == "rope":
        if provider == "fused":
            return tmf.rope
        if provider == "hf_eager":  # transformers' apply_rotary_pos_emb

            def hf(q, k, cos, sin):
                c, s = cos.unsqueeze(1), sin.unsqueeze(1)
                return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s

            return hf
        if provider == "liger":
            from liger_kernel.ops.rope import LigerRopeFunction

            return LigerRopeFunction.apply
    if op == "add_rms_norm":
        if provider == "fused":
            return lambda x, r, w: tmf.add_rms_norm(x, r, w, 1e-6)
        if provider == "torch":

            def unfused(x, r, w):
                h = x + r
                return torch.nn.functional.rms_norm(h, (h.shape[-1],), w, 1e-6), h

            return unfused
        if provider == "hf_eager":  # the decoder layer's `residual + hidden_states`, then LlamaRMSNorm
            return lambda x, r, w: (_hf_rms_norm(x + r, w), x + r)
        if provider == "liger":  # Liger-Kernel's fused add + RMSNorm (LigerFusedAddRMSNorm's function)
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

            return lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, 1e-6)
    raise ValueError(f"unknown provider {provider} for {op}")


def _activation_inputs(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, g):
    """(make() -> (differentiable inputs, incoming gradients), constants appended to the call, min bytes per mode)."""
    es = torch.finfo(dtype).bits // 8

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    if op == "swiglu":
        tokens, inter = shape

        def make():
            return (rnd(tokens, inter).requires_grad_(), rnd(tokens, inter).requires_grad_()), (rnd(tokens, inter),)

        n = tokens * inter * es  # forward: gate, up in, out; backward: gate, up, dout in, two gradients out
        return make, (), {"forward": 3 * n, "backward": 5 * n, "forward_backward": 8 * n}
    if op == "rope":
        batch, seq, heads, kv, d = shape
        angles = torch.rand(1, seq, d // 2, generator=g) * 100
        emb = torch.cat((angles, angles), -1)
        cos, sin = emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)

        def make():  # q and k as HF's attention makes them: (batch, seq, heads, d) projections, transposed
            q = rnd(batch, seq, heads, d).transpose(1, 2).requires_grad_()
            k = rnd(batch, seq, kv, d).transpose(1, 2).requires_grad_()
            return (q, k), (rnd(batch, heads, seq, d), rnd(batch, kv, seq, d))

        n = batch * seq * (heads + kv) * d * es  # q and k read, both written
        cs = 2 * seq * d * es  # cos and sin, read once (shared by the batch)
        return make, (cos, sin), {"forward": 2 * n + cs, "backward": 2 * n + cs, "forward_backward": 4 * n + 2 * cs}
    rows, cols = shape  # add_rms_norm
    w = (torch.rand(cols, generator=g) + 0.5).to(device=device, dtype=dtype).requires_grad_()

    def make():
        return (rnd(rows, cols).requires_grad_(), rnd(rows, cols).requires_grad_()), (rnd(rows, cols), rnd(rows, cols))

    n = rows * cols * es  # forward: x, residual in, y, h out; backward: dy, dh, h in, dx out
    return make, (w,), {"forward": 4 * n, "backward": 4 * n, "forward_backward": 8 * n}


def _as_tuple(y) -> tuple:
    return y if isinstance(y, tuple) else (y,)


def _activation_grads(y, dys, inputs, retain_graph: bool = False) -> None:
    wanted = [t for t in inputs if t.requires_grad]
    torch.autograd.grad(_as_tuple(y), wanted, dys, retain_graph=retain_graph)


def _prepare_activation(case: Case, provider: str, device: torch.device) -> Prepared:
    g = torch.Generator(device="cpu").manual_seed(0)
    make, constants, bytes_per_mode = _activation_inputs(case.op, case.shape, case.dtype, device, g)
    fn = _activation_fn(case.op, provider)
    weights = [c for c in constants if c.requires_grad]
    n = _n_sets(bytes_per_mode["forward_backward"] // 2)
    sets = [make() for _ in range(n)]
    nxt = _rotate(sets)
    if case.mode == "forward":

        def run():
            inputs, _ = nxt()
            return fn(*inputs, *constants)

    elif case.mode == "backward":
        outs = [(fn(*inputs, *constants), dys, inputs) for inputs, dys in sets]
        nxt_out = _rotate(outs)

        def run():
            y, dys, inputs = nxt_out()
            _activation_grads(y, dys, (*inputs, *weights), retain_graph=True)

    else:

        def run():
            inputs, dys = nxt()
            _activation_grads(fn(*inputs, *constants), dys, (*inputs, *weights))

    return Prepared(run, bytes_per_mode[case.mode], 0, n)


# ---- attention ----------------------------------------------------------------------------------------------------
def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """transformers' repeat_kv: (batch, kv_heads, seq, d) -> (batch, kv_heads x groups, seq, d)."""
    if groups == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)


def _attention_fn(provider: str, seq: int, dtype: torch.dtype, device: torch.device) -> Callable:
    """provider -> fn(q, k, v) -> out (batch, q_heads, seq, head_dim), causal, scale 1/sqrt(head_dim)."""
    if provider == "fused":
        return lambda q, k, v: tmf.attention(q, k, v, causal=True)
    if provider == "sdpa":  # what transformers' sdpa_attention_forward calls for a causal batch without padding
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
        )
    if provider == "hf_eager":  # transformers' eager_attention_forward with its 4-D additive causal mask
        mask = torch.full((seq, seq), torch.finfo(dtype).min, device=device, dtype=dtype).triu_(1)[None, None]

        def eager(q, k, v):
            groups = q.shape[1] // k.shape[1]
            weights = torch.matmul(q, _repeat_kv(k, groups).transpose(2, 3)) * q.shape[-1] ** -0.5
            weights = torch.softmax(weights + mask, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(weights, _repeat_kv(v, groups))

        return eager
    raise ValueError(f"unknown provider {provider} for attention")


def _attention_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, g: torch.Generator):
    """make() -> ((q, k, v) requiring grad, (dout,)): q, k, v as transposed (batch, seq, heads, d) projections."""
    batch, seq, heads, kv, d = shape

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    def make():
        q = rnd(batch, seq, heads, d).transpose(1, 2).requires_grad_()
        k = rnd(batch, seq, kv, d).transpose(1, 2).requires_grad_()
        v = rnd(batch, seq, kv, d).transpose(1, 2).requires_grad_()
        return (q, k, v), (rnd(batch, heads, seq, d),)

    return make


def attention_min_bytes_flops(case: Case) -> tuple[int, int]:
    """Forward reads q, k, v and writes out and the float32 log-sum-exp (one per query row and head); backward reads
    q, k, v, out, dout and the log-sum-exp and writes dq, dk, dv and the float32 delta = rowsum(dout·out). FLOPs as
    the FlashAttention papers count them: forward 4·B·Hq·S·Sk·D (q·kᵀ and p·v), halved for causal; backward 2.5x the
    forward (q·kᵀ recomputed, dout·vᵀ, dq, dk, dv)."""
    batch, seq, heads, kv, d = case.shape
    es = torch.finfo(case.dtype).bits // 8
    q = out = batch * heads * seq * d * es
    k = v = batch * kv * seq * d * es
    stats = batch * heads * seq * 4  # lse, delta: float32 per (batch, head, query)
    fwd_bytes = q + k + v + out + stats
    bwd_bytes = q + k + v + 2 * out + stats + q + k + v + stats
    fwd_flops = 4 * batch * heads * seq * seq * d // 2  # causal: half the (S x Sk) products
    per_mode = {
        "forward": (fwd_bytes, fwd_flops),
        "backward": (bwd_bytes, fwd_flops * 5 // 2),
        "forward_backward": (fwd_bytes + bwd_bytes, fwd_flops * 7 // 2),
    }
    return per_mode[case.mode]


def attention_saved_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    """(ours, the composite path's): what the forward keeps for backward besides q, k and v (which every
    implementation keeps). Ours: out (B·Hq·S·D elements) and the float32 log-sum-exp (B·Hq·S). The composite math
    path (SDPA on MPS under autograd, Hugging Face's eager attention): at least the probabilities, B·Hq·S·Sk
    elements."""
    batch, seq, heads, _, d = shape
    es = torch.finfo(dtype).bits // 8
    return batch * heads * seq * (d * es + 4), batch * heads * seq * seq * es


def _prepare_attention(case: Case, provider: str, device: torch.device) -> Prepared:
    g = torch.Generator(device="cpu").manual_seed(0)
    make = _attention_inputs(case.shape, case.dtype, device, g)
    fn = _attention_fn(provider, case.shape[1], case.dtype, device)
    min_bytes, flops = attention_min_bytes_flops(case)
    # Input sets by the op's own tensors; the composite paths' probabilities come on top of them.
    n = _n_sets(attention_min_bytes_flops(Case(case.op, case.shape, case.dtype, "forward_backward"))[0] // 2)
    sets = [make() for _ in range(n)]
    nxt = _rotate(sets)
    if case.mode == "forward":

        def run():
            inputs, _ = nxt()
            return fn(*inputs)

    elif case.mode == "backward":
        outs = [(fn(*inputs), dys, inputs) for inputs, dys in sets]
        nxt_out = _rotate(outs)

        def run():
            y, dys, inputs = nxt_out()
            _activation_grads(y, dys, inputs, retain_graph=True)

    else:

        def run():
            inputs, dys = nxt()
            _activation_grads(fn(*inputs), dys, inputs)

    return Prepared(run, min_bytes, flops, n)


@dataclass(frozen=True)
class AttentionPlan:
    """The launch plan of the attention kernels as backends/metal.py makes it (no window, no mask), for the traffic
    and product model: query rows per threadgroup (forward, dQ), key rows per threadgroup (dK/dV), rows per staged
    block."""

    query_rows: int
    key_rows: int
    block_rows: int

    @classmethod
    def of(cls, shape: tuple[int, ...]) -> AttentionPlan:
        """8 rows per SIMD-group, ATTENTION_SIMD_GROUPS of them or fewer where the rows are fewer; assumes the
        pipeline allows ATTENTION_SIMD_GROUPS x 32 threads (the harness does; a register-heavy kernel on a Mac may
        allow fewer, and then K and V are read more often)."""
        from torch_metal_fused.backends import metal

        _, seq, _, _, d = shape
        tile = metal.SIMDGROUP_MATRIX

        def rows(n: int) -> int:
            return min(metal.ATTENTION_SIMD_GROUPS, -(-n // tile)) * tile

        return cls(rows(seq), rows(seq), metal.attention_block_rows(d))


def _causal_key_end(q1: int, seq: int) -> int:
    return min(seq, q1)  # causal, S == Sk: the last query of [q0, q1) sees keys [0, q1)


def attention_model(shape: tuple[int, ...], dtype: torch.dtype, mode: str) -> dict:
    """What our Metal kernels do for a causal (batch, seq, q_heads, kv_heads, head_dim) call, from their launch plan
    (`AttentionPlan`), a model checked against the harness's counts at the emulated shapes (tests/test_bench.py):

    - kv_reads: bytes of K and V read ÷ their size. The forward and dQ kernels stage K and V once per threadgroup of
      query rows and per query head, up to the group's last visible key (whole blocks, causal blocks skipped); the
      dK/dV kernel reads its own key rows once.
    - q_reads: likewise for q (and dout): once by the forward and the dQ kernel, once per threadgroup of key rows
      (from its first visible query on) by the dK/dV kernel.
    - device_bytes: every byte those kernels read or write, with the small per-row statistics (lse, delta) at one
      read per use: in dK/dV by each SIMD-group holding key rows (the dQ kernel's lanes load their row's once
      each, which the harness counts per lane: a few % more in backward).
    - matrix_flops: the products the kernels issue on 8x8 simdgroup matrices (whole staged blocks, zero-filled
      rows included): forward 2 per staged block, dQ 3, dK/dV 4, against the FLOPs convention's 2 and 5.
    """
    batch, seq, heads, kv, d = shape
    es = torch.finfo(dtype).bits // 8
    plan = AttentionPlan.of(shape)
    bk = plan.block_rows
    tile = 8
    # forward and dQ: per (batch, q head) and query group [q0, q1), keys staged up to the group's last visible one
    staged_keys = padded_keys = products_q = 0
    for q0 in range(0, seq, plan.query_rows):
        q1 = min(seq, q0 + plan.query_rows)
        end = _causal_key_end(q1, seq)
        blocks = -(-end // bk)
        staged_keys += min(blocks * bk, seq)
        padded_keys += blocks * bk
        products_q += -(-(q1 - q0) // tile) * tile * blocks * bk
    # dK/dV: per (batch, kv head) and key group [k0, k1), for each q head of the group: queries from k0 on
    staged_queries = products_k = stat_loads = 0
    for k0 in range(0, seq, plan.key_rows):
        k1 = min(seq, k0 + plan.key_rows)
        blocks = -(-(seq - k0) // bk)
        staged_queries += seq - k0
        products_k += -(-(k1 - k0) // tile) * tile * blocks * bk
        stat_loads += (seq - k0) * -(-(k1 - k0) // tile)  # each SIMD-group holding key rows loads lse and delta
    kv_reads_fwd = heads / kv * staged_keys / seq
    q_reads_dkdv = staged_queries / seq
    row = batch * heads * seq * d * es  # q, out, dout, dq
    kv_bytes = 2 * batch * kv * seq * d * es  # k and v together
    stats = batch * heads * seq * 4
    forward = {
        "kv_reads": kv_reads_fwd,
        "q_reads": 1.0,
        "device_bytes": row + kv_reads_fwd * kv_bytes + row + stats,
        "matrix_flops": batch * heads * products_q * d * 2 * 2,
    }
    delta_pass = 2 * row + stats
    dq = 2 * row + kv_reads_fwd * kv_bytes + 2 * stats + row
    dkdv = kv_bytes + q_reads_dkdv * 2 * row + batch * heads * stat_loads * 2 * 4 + kv_bytes
    backward = {
        "kv_reads": kv_reads_fwd + 1,
        "q_reads": 1 + q_reads_dkdv,
        "device_bytes": delta_pass + dq + dkdv,
        "matrix_flops": batch * heads * (products_q * 3 + products_k * 4) * d * 2,
    }
    per_mode = {"forward": forward, "backward": backward}
    out = per_mode.get(mode) or {key: forward[key] + backward[key] for key in forward}
    return {**out, "device_bytes": round(out["device_bytes"]), "matrix_flops": round(out["matrix_flops"])}


def min_bytes(case: Case) -> int:
    """The minimum bytes of the op's work (the timed cases' `Prepared.min_bytes`)."""
    if case.op == "lora":
        return _lora_min_bytes_flops(case)[0]
    if case.op == "cross_entropy":
        return _ce_min_bytes_flops(case)[0]
    if case.op == "attention":
        return attention_min_bytes_flops(case)[0]
    if case.op in ACTIVATION_OPS:
        g = torch.Generator(device="cpu").manual_seed(0)
        return _activation_inputs(case.op, case.shape, case.dtype, torch.device("meta"), g)[2][case.mode]
    return _rows_min_bytes(case)


@dataclass
class TrainingStep:
    """One input set of the fused op: `forward()` returns y; `backward(y)` computes the gradients of every trainable
    input (x, RMSNorm's weight, LoRA's A and B; cross-entropy's hidden and weight), as the timed cases' backward mode
    does."""

    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], None]


def training_step(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> TrainingStep:
    """The fused op's forward and backward on one input set, for the emulated report: its forward is the timed
    cases' forward (same trainable inputs, so the same kernels), and its backward their backward, so one forward and
    one backward give the forward, backward and forward_backward rows."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0, grad=False):
        t = (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    if op == "lora":
        tokens, fin, fout, r = shape
        weight, bias = rnd(fout, fin, scale=fin**-0.5), rnd(fout)
        a, b = rnd(r, fin, scale=fin**-0.5, grad=True), rnd(fout, r, scale=r**-0.5, grad=True)
        x, dy = rnd(tokens, fin, grad=True), rnd(tokens, fout)
        return TrainingStep(
            lambda: tmf.lora_linear(x, weight, a, b, 2.0, bias), lambda y: _grads(y, dy, x, a, b, retain_graph=True)
        )
    if op == "cross_entropy":
        make, weight = _ce_inputs(Case(op, shape, dtype, "forward"), device, g)
        hidden, target = make()
        dy = torch.ones((), device=device, dtype=dtype)
        return TrainingStep(
            lambda: tmf.linear_cross_entropy(hidden, weight, target),
            lambda y: _grads(y, dy, hidden, weight, retain_graph=True),
        )
    if op == "attention":
        (q, k, v), dys = _attention_inputs(shape, dtype, device, g)()
        return TrainingStep(
            lambda: tmf.attention(q, k, v, causal=True),
            lambda y: _activation_grads(y, dys, (q, k, v), retain_graph=True),
        )
    if op in ACTIVATION_OPS:
        make, constants, _ = _activation_inputs(op, shape, dtype, device, g)
        inputs, dys = make()
        fn = _activation_fn(op, "fused")
        weights = tuple(c for c in constants if c.requires_grad)
        return TrainingStep(
            lambda: fn(*inputs, *constants),
            lambda y: _activation_grads(y, dys, (*inputs, *weights), retain_graph=True),
        )
    rows, cols = shape
    fn = _row_op(Case(op, shape, dtype, "forward"), "fused")
    x, dy = rnd(rows, cols, grad=True), rnd(rows, cols)
    w = (torch.rand(cols, generator=g) + 0.5).to(device=device, dtype=dtype).requires_grad_(op == "rms_norm")
    return TrainingStep(lambda: fn(x, w), lambda y: _grads(y, dy, x, w, retain_graph=True))


def prepare(case: Case, provider: str, device: torch.device) -> Prepared:
    if case.op == "lora":
        if case.mode != "forward" and provider == "matmul":
            raise ValueError("the base matmul alone is a forward baseline")
        return _prepare_lora(case, provider, device)
    if case.op == "cross_entropy":
        return _prepare_ce(case, provider, device)
    if case.op == "attention":
        return _prepare_attention(case, provider, device)
    if case.op in ACTIVATION_OPS:
        return _prepare_activation(case, provider, device)
    return _prepare_rows(case, provider, device)


# ---- shapes -------------------------------------------------------------------------------------------
SEED_SHAPES = {
    "softmax": [(128, 1024)],
    "rms_norm": [(128, 1024)],
    "lora": [(128, 512, 512, 8)],
    "cross_entropy": [(64, 64, 32000)],
    "swiglu": [(128, 1024)],
    "rope": [(1, 128, 8, 2, 64)],
    "add_rms_norm": [(128, 1024)],
    "attention": [(1, 128, 8, 2, 64)],
}
# MLP activations (tokens x intermediate: Llama-2-7B's 11008, Llama-3-8B's 14336), attention heads (batch, seq,
# q heads, kv heads, head_dim: Llama-3-8B's 32/8 x 128), the residual stream (rows x hidden).
LLM_ACTIVATIONS = {
    "swiglu": [(4096, 11008), (8192, 14336)],
    "rope": [(4, 4096, 32, 8, 128), (8, 2048, 32, 8, 128)],
    "add_rms_norm": [(8192, 4096), (4096, 8192)],
}
# Causal self-attention (batch, seq, q heads, kv heads, head_dim): Llama-3-8B's 32 query and 8 kv heads of 128, at
# 4096 tokens, a batch of 2048-token sequences, and 8192 tokens.
LLM_ATTENTION = [(1, 4096, 32, 8, 128), (4, 2048, 32, 8, 128), (1, 8192, 32, 8, 128)]
LLM_ROWS = [(r, h) for r in (2048, 8192, 16384) for h in (1024, 4096, 8192)]
LLM_LORA = [(4096, 4096, 4096, r) for r in (8, 16, 64)] + [(4096, 4096, 11008, r) for r in (8, 16, 64)]
# tokens x hidden x vocab: a Llama-2-sized vocabulary (32000) and Llama-3's (128256)
LLM_CE = [(4096, 2048, 32000), (8192, 4096, 128256)]
QUICK_SHAPES = {
    "softmax": [(128, 1024), (1024, 4096)],
    "rms_norm": [(128, 1024), (1024, 4096)],
    "lora": [(128, 512, 512, 8), (512, 1024, 1024, 16)],
    "cross_entropy": [(64, 64, 32000)],
    "swiglu": [(128, 1024), (1024, 4096)],
    "rope": [(1, 128, 8, 2, 64)],
    "add_rms_norm": [(128, 1024), (1024, 4096)],
    "attention": [(1, 128, 8, 2, 64)],
}
# The CUDA issue's comparison shapes (rows x hidden; tokens, in, out, r).
CUDA_ROWS = [(8192, 4096), (4096, 8192), (32768, 1024), (512, 512), (65536, 256)]
# Vocabulary-sized softmax rows (longer than the kernels keep in registers); Liger's softmax stops at 65536 columns.
CUDA_SOFTMAX_WIDE = [(2048, 32768), (256, 262144)]
CUDA_LORA = [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (2048, 4096, 11008, 16), (2048, 4096, 11008, 64)]
CUDA_LORA += [(512, 512, 512, 8)]
CUDA_CE = [*LLM_CE, (16384, 4096, 128256)]


# The emulated report's default (the harness runs a kernel at about a microsecond per element and pass on a CPU core:
# ~50-65 s for these on 2 cores, attention ~10 s of it). Row widths from 256 to beyond the widest row a threadgroup
# caches in registers, so each launch variant of the row kernels is counted (simd_rows, single_row, looped:
# csrc/include/tmf/launch/common.h): LLM hidden sizes 4096, 8192 and 16384 (RMSNorm) and vocabulary-sized logits
# (softmax, 32768). LoRA: a small adapter and a 4096 x 4096 projection at rank 16 with 512 tokens (with 1024 tokens or
# more, and more tokens than in_features, the merged-weight route runs instead: native GEMMs only, no Metal kernel to
# count). Cross-entropy: few tokens (the row pass costs tokens x vocab) at the two vocabulary sizes of the LLM suite.
# Attention: 4 query blocks of 64 rows, grouped-query heads, at head_dim 64 (32-row K/V blocks) and 128 (16-row blocks),
# about 3 s per dtype on the harness; the LLM shapes are projected from the launch plan's model (run.py), not emulated.
EMULATED_SHAPES = {
    "softmax": [(4096, 256), (1024, 4096), (512, 8192), (128, 32768)],
    "rms_norm": [(4096, 256), (1024, 4096), (512, 8192), (256, 16384)],
    "lora": [(128, 512, 512, 8), (512, 4096, 4096, 16)],
    "cross_entropy": [(8, 64, 32000), (8, 64, 128256)],
    "swiglu": [(32, 11008)],
    "rope": [(1, 64, 8, 2, 128)],
    "add_rms_norm": [(256, 4096)],
    "attention": [(1, 256, 4, 2, 64), (1, 256, 4, 1, 128)],
}
SUITES = ("full", "quick", "cuda", "emulated")


def shapes(op: str, suite: str) -> list[tuple[int, ...]]:
    if suite == "quick":
        return QUICK_SHAPES[op]
    if suite == "emulated":
        return EMULATED_SHAPES[op]
    if suite == "cuda":
        wide = CUDA_ROWS + CUDA_SOFTMAX_WIDE
        if op in ACTIVATION_OPS:
            return LLM_ACTIVATIONS[op]
        return {"lora": CUDA_LORA, "cross_entropy": CUDA_CE, "softmax": wide, "attention": LLM_ATTENTION}.get(
            op, CUDA_ROWS
        )
    full = {"lora": LLM_LORA, "cross_entropy": LLM_CE, "attention": LLM_ATTENTION, **LLM_ACTIVATIONS}
    return SEED_SHAPES[op] + full.get(op, LLM_ROWS)
