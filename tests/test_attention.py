"""tmf.attention, the contract: forward and dq, dk, dv against a float64 formula written here, differentiated by float64
autograd — softmax(q·kᵀ·scale, soft-capped as c·tanh(x/c), + additive mask, invisible keys dropped)·v; rows with no
visible key give zeros (and zero gradients); grouped-query / multi-query heads by repeat_interleave of the kv heads;
causal aligned bottom-right (key j visible to query i iff j <= i + Sk - S), a window W also drops j <= i + Sk - S - W.
Every head dim the Metal kernels take (32, 64, 80, 96, 128, 256), every dtype, sequence lengths from 1 to 257 that are
no multiple of the kernels' blocks, S < Sk and S > Sk (causal rows with no key), boolean, additive (Hugging Face's
4-D finfo.min masks, -inf entries) and key-padding masks, huge logits, views of a fused qkv projection, strided
incoming gradients, NaN in a query row, empty tensors; memory linear in the sequence length (no batch x heads x S x Sk
tensor, nothing saved beyond q, k, v, out and the log-sum-exp); the CUDA route (PyTorch's SDPA) has the same
semantics; bad input raises a clear error.

Harness cost: every case is small (batch x heads <= 4, S x Sk x D bounded) because the Metal-on-CPU harness executes
the kernels' threadgroups on the CPU; the checked harness build (metal-emulated-checked) runs only the cases listed in
CHECKED_CASES (and the other tests' `checked` sets): one per kernel path, every dtype among them. The whole file takes
~20 s on metal-emulated and metal-emulated-checked together on a 2-core Linux machine (2026-12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import _backend_params
from helpers import DTYPES, AutogradCase, draws, randn
from nan_inf import INF, NAN, check_rows, nan_inf_contract
from torch.utils._python_dispatch import TorchDispatchMode

import torch_metal_fused as tmf
from torch_metal_fused import reference
from torch_metal_fused.ops import attention as attention_op
from torch_metal_fused.testing import assert_matches, rel_error

NEG_INF = float("-inf")
HEAD_DIMS = (32, 64, 80, 96, 128, 256)  # every head dim the Metal kernels take

# ---- backends: the checked harness build only on a few representative cases ----------------------------------------
BACKENDS = _backend_params()
CHECKED = "metal-emulated-checked"


def _on_backends(cases: list, checked: set[str] = frozenset()) -> list:
    """pytest params crossing the backends (conftest's, marks and all) with `cases` (pytest.param each), for
    parametrize(("backend", ...), indirect=["backend"]): the checked harness build only for the case ids in
    `checked`."""
    params = []
    for b in BACKENDS:
        for c in cases:
            if b.id == CHECKED and c.id not in checked:
                continue
            params.append(pytest.param(b.values[0], *c.values, marks=[*b.marks, *c.marks], id=f"{b.id}-{c.id}"))
    return params


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- the float64 formula ----------------------------------------------------------------------------------------
def _visible(q_len: int, kv_len: int, causal: bool, window: int) -> torch.Tensor | None:
    """(S, Sk) bool, bottom-right causal: key j visible to query i iff j <= i + Sk - S (and j > i + Sk - S - W)."""
    if not causal:
        return None
    i = torch.arange(q_len)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len)[None, :]
    visible = j <= i
    if window:
        visible = visible & (j > i - window)
    return visible


def _logits(q, k, bias, causal, window, scale, softcap):
    """(logits, tanh of the soft-capped logits or None) of q (B, H, S, D) against k (B, H, Sk, D): scaled,
    soft-capped, the mask added, invisible keys at -inf; in q's precision, differentiable."""
    s = (q @ k.transpose(-1, -2)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if bias is not None:
        s = s + bias
    visible = _visible(q.shape[2], k.shape[2], causal, window)
    if visible is not None:
        s = s.masked_fill(~visible, NEG_INF)
    return s, t


def _probabilities(q, k, bias, causal, window, scale, softcap):
    """(p, tanh of the soft-capped logits or None, dropped): the attention probabilities of q (B, H, S, D) against k
    (B, H, Sk, D), in q's precision, differentiable."""
    s, t = _logits(q, k, bias, causal, window, scale, softcap)
    dropped = s.detach() == NEG_INF
    m = s.detach().amax(-1, keepdim=True)
    m = m.masked_fill(m == NEG_INF, 0.0)  # a NaN row keeps its NaN
    e = torch.exp(s.masked_fill(dropped, 0.0) - m).masked_fill(dropped, 0.0)
    denom = e.sum(-1, keepdim=True)
    # masked_fill, not 0 · x: a NaN row's dropped keys get p = 0 (not 0 / NaN) and, backward, exactly no gradient
    return (e / denom.masked_fill(denom == 0, 1.0)).masked_fill(dropped, 0.0), t, dropped


def attention64(q, k, v, bias=None, causal=False, window=0, scale=None, softcap=0.0):
    """The contract in float64 torch ops, q (B, Hq, S, D), k and v (B, Hkv, Sk, D). An invisible key (causal/window,
    or a -inf in the additive mask) contributes exactly nothing to its row, forward or backward (a select, not a
    multiplication by 0, so a NaN elsewhere in the row does not reach it); a row with no visible key is 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    p, _, _ = _probabilities(q, k, bias, causal, window, scale, softcap)
    return p @ v


def _flash_float32(q, k, v, dout, dtype, bias, causal, window, scale, softcap, log2=False):
    """(out, dq, dk, dv) by FlashAttention-2's algorithm in float32, rounded to dtype: forward saves the log-sum-exp,
    backward recomputes P = exp(S - lse), delta = rowsum(dout·out) of the rounded output, dS = P·(dP - delta);
    log2: in base 2 (S·log2(e), exp2, lse in log2 units), as kernels often compute it. The baseline error of any
    kernel computing that in float32 where the result is ill-conditioned (huge logits: an lse of ~2e3 rounds to
    ~1e-4, so P does; P one-hot makes dS a difference of nearly equal numbers)."""
    q, k, v, dout = (t.detach().float().cpu() for t in (q, k, v, dout))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s, t = _logits(q, kr, None if bias is None else bias.float(), causal, window, scale, softcap)
    exp, log = (torch.exp2, torch.log2) if log2 else (torch.exp, torch.log)
    if log2:
        s = s * math.log2(math.e)
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(m == NEG_INF, 0.0)
    e = exp(s - m)
    denom = e.sum(-1, keepdim=True)
    out = (e @ vr) / denom.masked_fill(denom == 0, 1.0)
    lse = m + log(denom)
    dropped = (s == NEG_INF) | (lse == NEG_INF)
    p = exp(s - lse.masked_fill(lse == NEG_INF, 0.0)).masked_fill(dropped, 0.0)
    delta = (dout * out.to(dtype).float()).sum(-1, keepdim=True)
    ds = (p * (dout @ vr.transpose(-1, -2) - delta)).masked_fill(dropped, 0.0)
    if t is not None:
        ds = ds * (1 - t * t)
    ds = ds * scale

    def per_kv_head(x):
        return x.unflatten(1, (k.shape[1], groups)).sum(2)

    dv = per_kv_head(p.transpose(-1, -2) @ dout)
    dk = per_kv_head(ds.transpose(-1, -2) @ q)
    return tuple(x.to(dtype) for x in (out, ds @ kr, dk, dv))


# ---- masks ------------------------------------------------------------------------------------------------------
def _masks(kind: str | None, b: int, hq: int, s: int, sk: int, dtype, device, seed: int = 0):
    """(attn_mask, key_padding_mask, the additive float64 bias the formula adds) of a mask kind."""
    g = torch.Generator().manual_seed(100 + seed)
    if kind is None:
        return None, None, None
    if kind in ("bool", "bool_2d", "bool_heads"):
        shape = {"bool": (b, 1, s, sk), "bool_2d": (s, sk), "bool_heads": (b, hq, s, sk)}[kind]
        keep = torch.rand(shape, generator=g) < 0.7
        keep[..., s // 2, :] = False  # a row with no visible key: zeros
        bias = torch.zeros(shape, dtype=torch.float64).masked_fill(~keep, NEG_INF)
        return keep.to(device), None, bias
    if kind == "hf":
        # Hugging Face's 4-D additive mask (B, 1, S, Sk): finfo.min above the (bottom-right) causal diagonal and on
        # left padding; with causal=False, as HF calls SDPA with a mask. Rows that see only padding are finfo.min
        # everywhere: uniform weights, finite (HF's semantics), not zeros.
        min_value = torch.finfo(dtype).min
        pad = [0, min(sk - 1, 5)][:b] + [3] * max(0, b - 2)
        keep = (torch.arange(sk)[None, :] <= torch.arange(s)[:, None] + sk - s).expand(b, 1, s, sk).clone()
        for i, p in enumerate(pad):
            keep[i, :, :, :p] = False
        mask = torch.zeros((b, 1, s, sk), dtype=dtype).masked_fill(~keep, min_value)
        return mask.to(device), None, mask.double()
    if kind == "additive":
        # an additive float mask (1, Hq, S, Sk) in q's dtype: values of the logits' size, -inf entries, a -inf row
        mask = (torch.randn((1, hq, s, sk), generator=g, dtype=torch.float64) * 2.0).to(dtype)
        mask[torch.rand(mask.shape, generator=g) < 0.15] = NEG_INF
        mask[:, :, s // 3, :] = NEG_INF
        return mask.to(device), None, mask.double()
    if kind == "key_padding":
        # (B, Sk) True for real tokens: batch 0 right-padded, batch 1 all padding (zeros), others left-padded
        kpm = torch.ones((b, sk), dtype=torch.bool)
        kpm[0, sk - sk // 4 :] = False
        if b > 1:
            kpm[1] = False
        for i in range(2, b):
            kpm[i, : sk // 3] = False
        bias = torch.zeros((b, 1, 1, sk), dtype=torch.float64).masked_fill(~kpm[:, None, None, :], NEG_INF)
        return None, kpm.to(device), bias
    if kind == "combined":
        # a boolean (S, Sk) mask, key padding and (in the case) causal together
        keep = torch.rand((s, sk), generator=g) < 0.8
        kpm = torch.ones((b, sk), dtype=torch.bool)
        kpm[-1, : sk // 2] = False
        bias = torch.zeros((b, 1, s, sk), dtype=torch.float64).masked_fill(~keep, NEG_INF)
        bias = bias.masked_fill(~kpm[:, None, None, :], NEG_INF)
        return keep.to(device), kpm.to(device), bias
    raise ValueError(kind)


# ---- the check --------------------------------------------------------------------------------------------------
def _to64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64).cpu()


def _check(
    q,
    k,
    v,
    dtype,
    *,
    attn_mask=None,
    key_padding_mask=None,
    bias64=None,
    causal=False,
    window=None,
    softcap=None,
    scale=None,
    layout="bhsd",
    dout=None,
    what="",
    baseline=False,
):
    """Run the op forward and backward on q, k, v (any strides, as given) and compare out, dq, dk and dv with the
    float64 formula. baseline: also allow twice the error of the same computed in float32 (rounded to dtype) by
    FlashAttention's algorithm (_flash_float32, in base e or base 2, whichever errs more), for ill-conditioned
    inputs (huge logits)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    kwargs = dict(causal=causal, window=window, softcap=softcap, scale=scale, layout=layout)
    out = tmf.attention(q, k, v, attn_mask, key_padding_mask=key_padding_mask, **kwargs)
    if dout is None:
        dout = randn(out.shape, dtype, out.device, seed=7)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    leaves = [_to64(t).requires_grad_(True) for t in (q, k, v)]
    heads = [t.transpose(1, 2) for t in leaves] if layout == "bshd" else leaves
    out64 = attention64(*heads, bias64, causal, window or 0, scale, softcap or 0.0)
    out64 = out64.transpose(1, 2) if layout == "bshd" else out64
    want = (out64, *torch.autograd.grad(out64, leaves, _to64(dout)))
    base = [None] * 4
    if baseline:
        heads = [t.transpose(1, 2) for t in (q, k, v, dout)] if layout == "bshd" else (q, k, v, dout)
        options = (dtype, bias64, causal, window or 0, scale, softcap or 0.0)
        variants = [_flash_float32(*heads, *options, log2=log2) for log2 in (False, True)]
        variants = [[t.transpose(1, 2) for t in ts] if layout == "bshd" else ts for ts in variants]
        base = [max(pair, key=lambda t, w=w: rel_error(t, w)) for pair, w in zip(zip(*variants), want)]
    b, hq, s, d = q.shape if layout == "bhsd" else q.transpose(1, 2).shape
    expected_shape = (b, s, hq, d) if layout == "bshd" else (b, hq, s, d)
    assert out.shape == expected_shape and out.dtype == dtype and out.device == q.device, what
    assert out.is_contiguous(), f"{what}: the output must be contiguous in its layout's order ({layout})"
    tag = f"attention {what} {_dtype_id(dtype)}"
    for name, got, ref, bl in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want, base):
        assert got.dtype == dtype, f"{tag}: {name} has dtype {got.dtype}"
        assert_matches(got, ref, dtype, f"{tag}: {name}", baseline=bl)
    return out, (dq, dk, dv)


@dataclass(frozen=True)
class Case:
    """One contract case: shapes (batch, q heads, kv heads, q_len, kv_len, head_dim) and options."""

    name: str
    b: int
    hq: int
    hkv: int
    s: int
    sk: int
    d: int = 64
    causal: bool = False
    window: int | None = None
    softcap: float | None = None
    mask: str | None = None
    scale: float | None = None
    q_scale: float = 1.0


def _run_case(backend, dtype, case: Case, layout: str = "bhsd"):
    dev = backend.device
    q = randn((case.b, case.hq, case.s, case.d), dtype, dev, scale=case.q_scale, seed=1)
    k = randn((case.b, case.hkv, case.sk, case.d), dtype, dev, seed=2)
    v = randn((case.b, case.hkv, case.sk, case.d), dtype, dev, seed=3)
    attn_mask, kpm, bias64 = _masks(case.mask, case.b, case.hq, case.s, case.sk, dtype, dev)
    return _check(
        q,
        k,
        v,
        dtype,
        attn_mask=attn_mask,
        key_padding_mask=kpm,
        bias64=bias64,
        causal=case.causal,
        window=case.window,
        softcap=case.softcap,
        scale=case.scale,
        layout=layout,
        what=case.name,
    )


# ---- every option, every dtype ----------------------------------------------------------------------------------
CASES = [
    Case("plain", 2, 2, 2, 65, 65),
    Case("causal", 2, 2, 2, 130, 130, causal=True),
    Case("causal_s_lt_sk", 1, 2, 2, 33, 130, causal=True),  # a prompt after a cache: rows see Sk - S more keys
    Case("causal_s_gt_sk", 1, 2, 1, 130, 33, causal=True),  # the first 97 rows see no key: zeros
    Case("s_lt_sk", 1, 2, 2, 7, 257),
    Case("s_gt_sk", 1, 2, 2, 257, 7),
    Case("decode", 2, 2, 1, 1, 257, causal=True),  # one query sees every key
    Case("one_by_one", 2, 2, 2, 1, 1, causal=True),
    Case("window", 1, 2, 2, 130, 130, causal=True, window=32),
    Case("window_s_lt_sk", 1, 2, 1, 65, 130, causal=True, window=7),
    Case("window_s_gt_sk", 1, 2, 2, 130, 65, causal=True, window=16),  # rows with no key, then windows
    Case("softcap", 1, 2, 2, 65, 65, softcap=2.0, q_scale=4.0),  # logits well past the cap
    Case("softcap_window_gqa", 1, 4, 2, 65, 65, causal=True, window=20, softcap=5.0, q_scale=3.0),
    Case("gqa", 1, 4, 2, 65, 65, causal=True),
    Case("mqa", 1, 4, 1, 33, 65),
    Case("bool_mask", 2, 2, 2, 33, 65, mask="bool"),
    Case("bool_mask_2d", 1, 4, 2, 33, 33, mask="bool_2d", causal=True),
    Case("bool_mask_per_head", 2, 2, 1, 17, 40, mask="bool_heads"),
    Case("hf_mask", 2, 2, 2, 33, 65, mask="hf"),
    Case("additive_mask", 1, 4, 2, 33, 65, mask="additive", causal=True),
    Case("key_padding", 2, 2, 2, 33, 65, mask="key_padding"),
    Case("masks_combined", 2, 2, 1, 40, 40, mask="combined", causal=True),
    Case("scale", 1, 2, 2, 33, 33, scale=0.3),
    Case("long_gqa_d128", 1, 4, 2, 257, 257, d=128, causal=True),  # many blocks of wide heads
    Case("long_window_d256", 1, 2, 1, 200, 257, d=256, causal=True, window=64),
]
CHECKED_CASES = {  # the checked harness build: one case per kernel path, every dtype among them
    "plain-float32",
    "causal_s_gt_sk-float16",
    "decode-bfloat16",
    "window_s_lt_sk-bfloat16",
    "softcap_window_gqa-float32",
    "mqa-float16",
    "hf_mask-float16",
    "additive_mask-float32",
    "key_padding-bfloat16",
}


@pytest.mark.parametrize(
    ("backend", "dtype", "case"),
    _on_backends([pytest.param(dt, c, id=f"{c.name}-{_dtype_id(dt)}") for c in CASES for dt in DTYPES], CHECKED_CASES),
    indirect=["backend"],
)
def test_contract(backend, dtype, case):
    _run_case(backend, dtype, case)


# ---- every head dim ---------------------------------------------------------------------------------------------
def _head_dim_cases(d: int) -> list[Case]:
    """Two calls per head dim: causal with S < Sk and non-causal S > Sk with key padding (Sk small for wide heads,
    whose key blocks are short)."""
    s, sk = (33, 47) if d <= 128 else (17, 23)
    return [
        Case(f"d{d}_causal", 1, 2, 1, s, sk, d=d, causal=True),
        Case(f"d{d}_padded", 2, 2, 2, sk, s, d=d, mask="key_padding"),
    ]


@pytest.mark.parametrize(
    ("backend", "dtype", "head_dim"),
    _on_backends(
        [pytest.param(dt, d, id=f"d{d}-{_dtype_id(dt)}") for d in HEAD_DIMS for dt in DTYPES],
        {"d80-float32", "d256-bfloat16"},
    ),
    indirect=["backend"],
)
def test_every_head_dim(backend, dtype, head_dim):
    for case in _head_dim_cases(head_dim):
        _run_case(backend, dtype, case)


@pytest.mark.parametrize(("backend",), _on_backends([pytest.param(id="window_sweep")], set()), indirect=["backend"])
def test_window_edges_at_every_block_boundary(backend):
    """Every window from 2 to 41 keys (a run longer than a staged block, so every residue), S = Sk and S < Sk: the
    kernels skip key blocks (forward, dQ) and query blocks (dK/dV) outside each group's window, and some window puts
    each edge exactly on a staged block's boundary, where a bound off by one drops a whole row's contribution (a
    dK/dV range ending one query early survived the fixed-window cases). Not 1: a row then sees only its own key, its
    probability is exactly 1 and dq is a cancellation residue."""
    for sk, s in ((100, 100), (100, 70)):
        for window in range(2, 42):
            case = Case(f"window{window}_{s}x{sk}", 1, 1, 1, s, sk, causal=True, window=window)
            _run_case(backend, torch.float32, case)


# ---- huge logits ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backend", "dtype", "q_scale", "offset"),
    _on_backends(
        [
            pytest.param(torch.float32, 1e2, False, id="q_x100-float32"),
            pytest.param(torch.float32, 1e3, False, id="q_x1000-float32"),
            pytest.param(torch.bfloat16, 1e2, False, id="q_x100-bfloat16"),
            pytest.param(torch.float32, 1.0, True, id="logits_near_1000-float32"),
        ],
        {"q_x1000-float32"},
    ),
    indirect=["backend"],
)
def test_huge_logits(backend, dtype, q_scale, offset):
    """Logits far beyond exp's range (float32 overflows at 88): the softmax must subtract the row maximum. q scaled
    by 1e2 / 1e3 (nearly one-hot rows), or logits of 1000 + O(1) through one shared large component (a true softmax
    over many keys at a large offset). float32 rounds logits that large to ~6e-5, and dS = P·(dP - delta) cancels
    where P is one-hot, so the tolerance also admits twice the error of FlashAttention's algorithm in float32."""
    b, hq, hkv, s, sk, d = 1, 2, 1, 33, 65, 64
    dev = backend.device
    q = randn((b, hq, s, d), torch.float64, "cpu", scale=q_scale, seed=1)
    k = randn((b, hkv, sk, d), torch.float64, "cpu", seed=2)
    if offset:
        q[..., 0], k[..., 0] = 8000.0, 1.0  # scale·q·k = 1000 + O(1)
    q, k = q.to(dtype).to(dev), k.to(dtype).to(dev)
    v = randn((b, hkv, sk, d), dtype, dev, seed=3)
    for causal in (False, True):
        _check(q, k, v, dtype, causal=causal, baseline=True, what=f"huge logits x{q_scale} causal={causal}")


# ---- rows with no visible key -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backend", "dtype"),
    _on_backends([pytest.param(dt, id=_dtype_id(dt)) for dt in DTYPES], {"float32"}),
    indirect=["backend"],
)
def test_rows_with_no_visible_key_are_zero_with_zero_gradients(backend, dtype):
    """An all-False key_padding_mask row (a sequence of padding alone), an all-False boolean mask row, an all -inf
    additive row, and causal rows before the first key (S > Sk): out exactly 0, dq exactly 0, every gradient
    finite; keys that no query sees get dk = dv = 0 exactly."""
    b, hq, hkv, s, sk, d = 2, 2, 1, 24, 10, 32
    dev = backend.device
    q = randn((b, hq, s, d), dtype, dev, seed=1)
    k = randn((b, hkv, sk, d), dtype, dev, seed=2)
    v = randn((b, hkv, sk, d), dtype, dev, seed=3)
    kpm = torch.ones((b, sk), dtype=torch.bool)
    kpm[1] = False  # batch 1: padding only
    kpm[0, 7:] = False  # batch 0: keys 7.. are padding, seen by no query
    keep = torch.ones((s, sk), dtype=torch.bool)
    keep[5] = False  # row 5: no key
    additive = torch.zeros((b, 1, s, sk), dtype=dtype)
    additive[:, :, 20] = NEG_INF  # row 20: no key
    calls = [
        ("key padding", dict(key_padding_mask=kpm.to(dev)), kpm[:, None, None, :].expand(b, hq, s, sk)),
        ("boolean row", dict(attn_mask=keep.to(dev)), keep.expand(b, hq, s, sk)),
        ("additive row", dict(attn_mask=additive.to(dev)), (additive != NEG_INF).expand(b, hq, s, sk)),
        ("causal S > Sk", dict(causal=True), _visible(s, sk, True, 0).expand(b, hq, s, sk)),
    ]
    for what, kwargs, visible in calls:
        bias = torch.zeros((b, hq, s, sk), dtype=torch.float64).masked_fill(~visible, NEG_INF)
        if kwargs.get("causal"):
            bias = None
        out, (dq, dk, dv) = _check(q, k, v, dtype, bias64=bias, what=f"no visible key: {what}", **kwargs)
        empty_rows = ~visible.any(-1)  # (b, hq, s)
        seen = visible.any(2).any(1)  # (b, sk): keys some query sees
        assert empty_rows.any(), what
        assert (out.detach().cpu()[empty_rows] == 0).all(), f"{what}: rows with no visible key must be exactly 0"
        assert (dq.cpu()[empty_rows] == 0).all(), f"{what}: their dq must be exactly 0"
        for name, g in (("dk", dk), ("dv", dv)):
            assert torch.isfinite(g).all(), f"{what}: {name} not finite"
            assert (g.cpu().transpose(1, 2)[~seen] == 0).all(), f"{what}: {name} of keys no query sees must be 0"


@pytest.mark.parametrize(
    ("backend", "dtype", "mask_dtype"),
    _on_backends(
        [
            pytest.param(torch.bfloat16, torch.float32, id="bfloat16_q-float32_mask"),
            pytest.param(torch.float32, torch.float16, id="float32_q-float16_mask"),
        ]
    ),
    indirect=["backend"],
)
def test_a_float_mask_of_another_dtype_is_added_in_qs_dtype(backend, dtype, mask_dtype):
    """As SDPA on CPU: an additive mask in another floating dtype (not float64) is rounded to q's dtype and added."""
    b, h, s, sk, d = 1, 2, 33, 40, 64
    dev = backend.device
    q, k, v = (randn(shape, dtype, dev, seed=i) for i, shape in enumerate([(b, h, s, d), (b, h, sk, d), (b, h, sk, d)]))
    mask = randn((b, 1, s, sk), mask_dtype, "cpu", scale=3.0, seed=5)
    mask[..., ::3] = NEG_INF
    _check(q, k, v, dtype, attn_mask=mask.to(dev), bias64=mask.to(dtype).double(), what=f"{mask_dtype} mask")


@pytest.mark.parametrize("grad_layout", ["bhsd", "bshd", "last_dim_strided", "offset"])
def test_the_sdpa_route_hands_its_backward_a_gradient_laid_out_as_its_output(grad_layout):
    """CUDA's route (_sdpa): SDPA's float16/bfloat16 backward gave a wrong dq for an incoming gradient laid out
    otherwise than its output (a (B, S, H, D) memory layout when q is a transposed view), so the gradient reaching
    it is copied into the output's strides, 16-byte aligned. Checked on CPU with an output in (B, S, H, D) memory."""
    base = torch.randn(2, 5, 3, 8, requires_grad=True)
    out = base.transpose(1, 2)  # (B, H, S, D) logical, (B, S, H, D) in memory: SDPA's output from transposed q
    seen = []
    out.register_hook(seen.append)
    g = torch.Generator().manual_seed(1)
    dout = {
        "bhsd": lambda: torch.randn(2, 3, 5, 8, generator=g),
        "bshd": lambda: torch.randn(2, 5, 3, 8, generator=g).transpose(1, 2),
        "last_dim_strided": lambda: torch.randn(2, 3, 8, 5, generator=g).transpose(2, 3),
        "offset": lambda: torch.randn(241, generator=g)[1:].view(2, 5, 3, 8).transpose(1, 2),
    }[grad_layout]()
    attention_op._AlignedGradient.apply(out).backward(dout)
    assert torch.equal(seen[0], dout)
    assert seen[0].stride() == out.stride() and seen[0].data_ptr() % 16 == 0


# ---- strided inputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backend", "dtype"),
    _on_backends([pytest.param(dt, id=_dtype_id(dt)) for dt in DTYPES], {"bfloat16"}),
    indirect=["backend"],
)
def test_views_and_strided_gradients(backend, dtype):
    """layout="bshd" on q, k, v viewed from one (B, S, 3, H, D) qkv projection (read in place, output (B, S, H, D)),
    HF's transposed projections in the default layout, a storage offset, k and v with different strides, q with a
    non-contiguous last dimension, and incoming gradients transposed (non-unit inner stride) or with wide rows."""
    b, s, h, d = 2, 33, 2, 64
    dev = backend.device
    qkv = randn((b, s, 3, h, d), dtype, dev, seed=1)
    q, k, v = qkv.unbind(2)  # (B, S, H, D), row stride 3·H·D
    assert not q.is_contiguous() and k.storage_offset() == h * d
    _check(q, k, v, dtype, layout="bshd", what="bshd qkv views")
    _check(q, k, v, dtype, layout="bshd", causal=True, what="bshd qkv views, causal")
    dout_t = randn((b, h, d, s), dtype, dev, seed=8).permute(0, 3, 1, 2)  # (B, S, H, D), D not contiguous
    _check(q, k, v, dtype, layout="bshd", causal=True, dout=dout_t, what="bshd, transposed dout")
    # the default layout from HF's projections: (B, S, H·D) viewed (B, S, H, D) and transposed, GQA
    proj = randn((b, s + 3, (4 + 2 + 2) * 32 + 5), dtype, dev, seed=2)[:, 3:, 5:]  # storage offset, wide rows
    qh = proj[..., : 4 * 32].reshape(b, s, 4, 32).transpose(1, 2)
    kh = proj[..., 4 * 32 : 6 * 32].reshape(b, s, 2, 32).transpose(1, 2)
    vh = proj[..., 6 * 32 :].reshape(b, s, 2, 32).transpose(1, 2).contiguous()  # v contiguous, k not
    assert qh.storage_offset() > 0 and qh.stride(-1) == 1
    wide = randn((b, 4, s, 40), dtype, dev, seed=9)[..., 3:35]  # dout rows wider than head_dim
    _check(qh, kh, vh, dtype, causal=True, dout=wide, what="HF transposed projections, wide-row dout")
    # q with a non-unit inner stride (copied), k a storage-offset view
    qt = randn((1, 2, d, s), dtype, dev, seed=4).transpose(-1, -2)
    flat = randn((5 + 2 * 40 * d,), dtype, dev, seed=5)
    ko = flat[5:].view(1, 2, 40, d)
    vo = randn((1, 2, 40, d), dtype, dev, seed=6)
    _check(qt, ko, vo, dtype, what="transposed q, offset k")


# ---- NaN ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backend", "dtype"),
    _on_backends([pytest.param(dt, id=_dtype_id(dt)) for dt in DTYPES], {"float16"}),
    indirect=["backend"],
)
def test_nan_in_a_query_row(backend, dtype):
    """A NaN in a query row makes that output row NaN and leaves the other rows exact; its dq row is NaN, and the dk,
    dv of the kv head it reads are NaN (every key is visible to it: no mask here, so the float64 formula is
    well defined); other kv heads stay exact."""
    b, hq, hkv, s, sk, d = 1, 4, 2, 9, 12, 32
    dev = backend.device
    q = randn((b, hq, s, d), dtype, dev, seed=1)
    q[0, 0, 3, 5] = float("nan")
    q[0, 1, 0, d - 1] = float("nan")
    k = randn((b, hkv, sk, d), dtype, dev, seed=2)
    v = randn((b, hkv, sk, d), dtype, dev, seed=3)
    out, (dq, dk, dv) = _check(q, k, v, dtype, what="NaN in q")
    nan_rows = torch.zeros((b, hq, s), dtype=torch.bool)
    nan_rows[0, 0, 3] = nan_rows[0, 1, 0] = True
    o = out.detach().cpu()
    assert torch.isnan(o[nan_rows]).all() and torch.isfinite(o[~nan_rows]).all()
    assert torch.isnan(dq.cpu()[nan_rows]).all() and torch.isfinite(dq.cpu()[~nan_rows]).all()
    assert torch.isnan(dk[:, 0]).all() and torch.isnan(dv[:, 0]).all()
    assert torch.isfinite(dk[:, 1]).all() and torch.isfinite(dv[:, 1]).all()


# ---- empty tensors ----------------------------------------------------------------------------------------------
EMPTY = [
    pytest.param((0, 2, 5, 32), (0, 1, 7, 32), id="batch0"),
    pytest.param((1, 2, 0, 32), (1, 1, 7, 32), id="q_len0"),
    pytest.param((1, 2, 5, 32), (1, 1, 0, 32), id="kv_len0"),
    pytest.param((2, 4, 0, 64), (2, 2, 0, 64), id="both_len0"),
]


@pytest.mark.parametrize(
    ("backend", "q_shape", "k_shape"), _on_backends(EMPTY, {p.id for p in EMPTY}), indirect=["backend"]
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty(backend, q_shape, k_shape, causal):
    """Empty batches and sequences: the output and gradients have their shapes; with no keys the output is 0."""
    dev = backend.device
    q = torch.randn(q_shape, device=dev, requires_grad=True)
    k = torch.randn(k_shape, device=dev, requires_grad=True)
    v = torch.randn(k_shape, device=dev, requires_grad=True)
    kpm = torch.ones((q_shape[0], k_shape[2]), dtype=torch.bool, device=dev)
    for kwargs in ({}, {"key_padding_mask": kpm}):
        out = tmf.attention(q, k, v, causal=causal, **kwargs)
        assert out.shape == q_shape
        assert (out == 0).all()  # vacuous unless kv_len == 0 with queries: then rows with no key
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert not dq.any() and not dk.any() and not dv.any()
        out_t = tmf.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, layout="bshd")
        assert out_t.shape == q.transpose(1, 2).shape


# ---- bad input --------------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match="does not support dropout"):
        tmf.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="window needs causal=True"):
        tmf.attention(q, k, v, window=4)
    for window in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="window must be a positive int"):
            tmf.attention(q, k, v, causal=True, window=window)
    with pytest.raises(ValueError, match=r"q's heads \(4\) must be a multiple of k's and v's heads \(3\)"):
        tmf.attention(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8))
    with pytest.raises(ValueError, match="must be a multiple"):
        tmf.attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="k must match q in batch and head_dim"):
        tmf.attention(q, torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16))
    with pytest.raises(ValueError, match="k must match q in batch and head_dim"):
        tmf.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        tmf.attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="head_dim must be positive"):
        tmf.attention(q[..., :0], k[..., :0], v[..., :0])
    with pytest.raises(ValueError, match="q must be 4-D"):
        tmf.attention(q[0], k, v)
    with pytest.raises(ValueError, match="layout must be"):
        tmf.attention(q, k, v, layout="bsdh")
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has dtype torch.float32"):
        tmf.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="v must be a floating-point tensor"):
        tmf.attention(q, k, v.long())
    for softcap in (0.0, -1.0):
        with pytest.raises(ValueError, match="softcap must be positive"):
            tmf.attention(q, k, v, softcap=softcap)
    with pytest.raises(ValueError, match="softcap must be finite"):
        tmf.attention(q, k, v, softcap=float("inf"))
    with pytest.raises(ValueError, match="scale must be finite"):
        tmf.attention(q, k, v, scale=float("nan"))
    # masks
    with pytest.raises(TypeError, match="attn_mask is float64 but q is torch.float32"):
        tmf.attention(q, k, v, torch.zeros(5, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="attn_mask must be a floating-point tensor"):
        tmf.attention(q, k, v, torch.zeros(5, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5, 7\) does not broadcast"):
        tmf.attention(q, k, v, torch.zeros(5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 1, 5, 6\) does not broadcast"):
        tmf.attention(q, k, v, torch.zeros(3, 1, 5, 6))
    with pytest.raises(ValueError, match="attn_mask must have at most 4 dimensions"):
        tmf.attention(q, k, v, torch.zeros(1, 2, 4, 5, 6))
    with pytest.raises(ValueError, match="attn_mask gets no gradient"):
        tmf.attention(q, k, v, torch.zeros(5, 6, requires_grad=True))
    with pytest.raises(TypeError, match="key_padding_mask must be a boolean tensor"):
        tmf.attention(q, k, v, key_padding_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 6\)"):
        tmf.attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))


# ---- memory -----------------------------------------------------------------------------------------------------
class _Allocations(TorchDispatchMode):
    """The element count of every new tensor (not a view, not in place) an op returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((t.numel(), f"{func}: {tuple(t.shape)}"))
        return out


def _saved_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (an expanded mask counts once, at its real size)."""
    storages = {}
    for t in tensors:
        if t.numel():
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize(
    "backend",
    [p for p in BACKENDS if p.id in ("reference", "metal-emulated")],
    indirect=True,
)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding"])
def test_memory_is_linear_in_the_sequence_length(backend, masked, monkeypatch):
    """One forward and backward at S = Sk = 512: no tensor of batch x heads x S x Sk elements (not even a quarter of
    one) is ever allocated, and what the op saves for backward is q, k, v, out, the float32 log-sum-exp and the
    (broadcast, never expanded) mask, nothing more. The reference's query chunks are made smaller for this test
    (reference.ATTENTION_CHUNK_SCORES = 2**15 scores: 32 query rows at a time), since its default budget of 2**22
    scores would hold this whole small problem at once."""
    monkeypatch.setattr(reference, "ATTENTION_CHUNK_SCORES", 2**15)
    b, h, s, d = 1, 2, 512, 64
    q = torch.randn(b, h, s, d, requires_grad=True)
    k = torch.randn(b, h, s, d, requires_grad=True)
    v = torch.randn(b, h, s, d, requires_grad=True)
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[:, -100:] = False
    dout = torch.randn(b, h, s, d)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with _Allocations() as allocs, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tmf.attention(q, k, v, causal=True, key_padding_mask=kpm if masked else None)
        out.backward(dout)
    largest, what = max(allocs.numels)
    assert largest < b * h * s * s // 4, f"allocated {what}: memory quadratic in the sequence length"
    assert q.grad is not None and torch.isfinite(q.grad).all()
    lse_bytes = b * h * s * 4
    mask_bytes = b * s * q.element_size() if masked else 0
    allowed = 4 * q.numel() * q.element_size() + lse_bytes + mask_bytes  # q, k, v, out (all the same size here)
    assert saved, "nothing saved for backward: the hook saw no tensor"
    assert _saved_bytes(saved) <= allowed, (
        f"saved for backward: {[(tuple(t.shape), t.dtype) for t in saved]}, {_saved_bytes(saved)} > {allowed} bytes"
    )
    # and the Function keeps no other tensor on its ctx
    out2 = tmf.attention(q, k, v, causal=True)
    node = out2.grad_fn
    while type(node).__name__ != "AttentionFunctionBackward":
        node = node.next_functions[0][0]
    held = [n for n, val in vars(node).items() if isinstance(val, torch.Tensor)]
    assert not held, f"AttentionFunction keeps tensors on ctx: {held}"


# ---- the CUDA route: PyTorch's SDPA with our semantics -----------------------------------------------------------
SDPA_CASES = [
    Case("causal_s_lt_sk", 1, 2, 2, 33, 65, d=32, causal=True),
    Case("causal_s_gt_sk", 1, 2, 1, 65, 33, d=32, causal=True),
    Case("causal_square_gqa", 1, 4, 2, 33, 33, d=32, causal=True),
    Case("window", 1, 2, 2, 65, 65, d=32, causal=True, window=8),
    Case("bool_mask", 2, 2, 2, 17, 33, d=32, mask="bool"),
    Case("hf_mask", 2, 2, 1, 17, 33, d=32, mask="hf"),
    Case("key_padding_mqa", 2, 2, 1, 17, 33, d=32, mask="key_padding"),
    Case("combined", 2, 2, 2, 40, 40, d=32, mask="combined", causal=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: c.name)
def test_sdpa_route_has_the_contracts_semantics(dtype, case):
    """The function CUDA tensors take (ops/attention.py `_sdpa`: PyTorch's SDPA with bottom-right causal and windows
    as an explicit mask, grouped heads by enable_gqa, rows with no visible key zeroed), run here on CPU tensors
    (SDPA's CPU kernels): forward and backward equal the float64 formula. test_cuda_route_uses_sdpa checks that
    CUDA tensors take it; the contract tests above run on the cuda backend too."""
    q = randn((case.b, case.hq, case.s, case.d), dtype, "cpu", seed=1).requires_grad_(True)
    k = randn((case.b, case.hkv, case.sk, case.d), dtype, "cpu", seed=2).requires_grad_(True)
    v = randn((case.b, case.hkv, case.sk, case.d), dtype, "cpu", seed=3).requires_grad_(True)
    attn_mask, kpm, bias64 = _masks(case.mask, case.b, case.hq, case.s, case.sk, dtype, "cpu")
    bias = attention_op._mask_bias(attn_mask, kpm, (case.b, case.hq, case.s, case.sk), dtype, q.device)
    scale = case.d**-0.5
    out = attention_op._sdpa(q, k, v, bias, case.causal, case.window or 0, scale)
    dout = randn(out.shape, dtype, "cpu", seed=7)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [_to64(t).requires_grad_(True) for t in (q, k, v)]
    out64 = attention64(*leaves, bias64, case.causal, case.window or 0, scale)
    refs = torch.autograd.grad(out64, leaves, _to64(dout))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out64, *refs)):
        assert_matches(got, want, dtype, f"SDPA route {case.name}: {name}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_route_uses_sdpa(monkeypatch):
    """CUDA tensors: SDPA serves every call without soft-capping (our Function is not used), the reference (through
    AttentionFunction) serves soft-capping, and TORCH_METAL_FUSED_BACKEND=reference forces the reference; all three
    give the same result as the reference on the same inputs."""
    monkeypatch.delenv("TORCH_METAL_FUSED_BACKEND", raising=False)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    apply = tmf.AttentionFunction.apply

    def counting_sdpa(*args, **kwargs):
        calls.append("sdpa")
        return sdpa(*args, **kwargs)

    def counting_apply(*args):
        calls.append("function")
        return apply(*args)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(tmf.AttentionFunction, "apply", counting_apply)
    q = randn((2, 4, 33, 64), torch.bfloat16, "cuda", seed=1)
    k = randn((2, 2, 65, 64), torch.bfloat16, "cuda", seed=2)
    v = randn((2, 2, 65, 64), torch.bfloat16, "cuda", seed=3)
    kpm = torch.ones((2, 65), dtype=torch.bool, device="cuda")
    kpm[1, :9] = False
    for kwargs in (
        {},
        {"causal": True},
        {"causal": True, "window": 16},
        {"key_padding_mask": kpm, "causal": True},
    ):
        calls.clear()
        out = tmf.attention(q, k, v, **kwargs)
        assert calls == ["sdpa"], (kwargs, calls)
        monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "reference")
        calls.clear()
        ref = tmf.attention(q, k, v, **kwargs)
        monkeypatch.delenv("TORCH_METAL_FUSED_BACKEND")
        assert calls == ["function"], (kwargs, calls)
        assert_matches(out, ref.double(), torch.bfloat16, f"SDPA route against the reference {kwargs}")
    calls.clear()
    tmf.attention(q, k, v, softcap=20.0)
    assert calls == ["function"]


def test_sdpa_route_hands_sdpa_aligned_operands_and_gradients():
    """SDPA's CUDA kernels read 16-byte vectors: a view with a storage offset or odd-width rows (HF's projections
    sliced from a wider buffer) failed on an H100 with "misaligned address", a sticky error that took down the process,
    and an incoming gradient with a strided last dimension gave a wrong float16 dq on an H200. The route copies such
    operands and incoming gradients into contiguous storage; aligned ones pass untouched."""
    from torch_metal_fused.ops import attention as op

    aligned = torch.randn(2, 4, 16, 32)
    assert op._aligned(aligned) is aligned
    for t in (
        torch.randn(3 + 2 * 4 * 16 * 32)[3:].view(2, 4, 16, 32),  # storage offset of 3 elements
        torch.randn(2, 16, 4 * 32 + 5)[..., 5:].reshape(2, 16, 4, 32).transpose(1, 2),  # odd row width
        torch.randn(2, 4, 16, 33)[..., :32],  # rows of 33 elements
        torch.randn(2, 4, 32, 16).transpose(2, 3),  # a strided last dimension (SDPA's float16 backward, dq wrong)
    ):
        got = op._aligned(t)
        assert got is not t and torch.equal(got, t) and got.is_contiguous() and got.data_ptr() % 16 == 0
    g = torch.randn(2, 4, 16, 33)[..., 1:]
    x = torch.randn(2, 4, 16, 32, requires_grad=True)
    y = op._AlignedGradient.apply(x)
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(dx, g) and dx.data_ptr() % 16 == 0 and dx.is_contiguous()


def test_sdpa_route_never_hands_sdpa_a_row_without_keys(monkeypatch):
    """SDPA's CUDA kernels need not give zeros for a row whose keys are all masked (exp(-inf - -inf) is NaN, forward
    and backward). With an SDPA that does exactly that (a naive softmax), the route still gives zero rows and zero,
    finite gradients: such rows attend to every key inside SDPA, and are zeroed after it."""
    from torch_metal_fused.ops import attention as op

    def naive_sdpa(q, k, v, attn_mask=None, scale=None, enable_gqa=False, **_):
        if enable_gqa:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) * scale + attn_mask
        assert not (scores == float("-inf")).all(-1).any(), "a row without keys reached SDPA"
        return torch.softmax(scores, -1) @ v

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", naive_sdpa)
    q = torch.randn(2, 4, 9, 32, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 32, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pad = torch.tensor([[True] * 5, [False] * 5])  # the second sequence has no key at all
    bias = op._mask_bias(None, pad, (2, 4, 9, 5), torch.float64, q.device)
    out = op._sdpa(q, k, v, bias, True, 0, 0.2)  # causal with S > Sk: the first 4 queries see no key either
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dk[1], torch.zeros_like(dk[1]))
    assert torch.equal(dv[1], torch.zeros_like(dv[1])) and torch.equal(dq[0, :, :4], torch.zeros_like(dq[0, :, :4]))
    want = reference.attention_forward(q.detach(), k.detach(), v.detach(), bias, True, 0, 0.2, 0.0, False)[0]
    assert torch.allclose(out, want)


# ---- the autograd contract's case (tests/test_autograd_contract.py) --------------------------------------------
def autograd_case(name, device, dtype, reduction) -> AutogradCase:
    """Grouped heads, causal with S < Sk (bottom-right), key padding; double backward refused."""
    kpm = torch.ones((2, 6), dtype=torch.bool, device=device)
    kpm[1, :2] = False
    bias = torch.zeros((2, 1, 1, 6), dtype=dtype, device=device).masked_fill(~kpm[:, None, None, :], -math.inf)
    # head dim 32, the smallest the kernels take; 8 in float64, which the reference serves (a quick gradcheck)
    d = 8 if dtype == torch.float64 else 32
    ins = [randn((2, 2, 5, d), dtype, device, seed=1)]
    ins += [randn((2, 1, 6, d), dtype, device, seed=s) for s in (2, 3)]
    return AutogradCase(
        lambda q, k, v: tmf.attention(q, k, v, causal=True, key_padding_mask=kpm),
        lambda q, k, v: attention64(q, k, v, bias.to(q.device, q.dtype), causal=True),
        ins,
        double_backward=False,
    )


# ---- every kernel of the family, for tests/test_emulator_kernels.py's drive -------------------------------------
def every_kernel(dtype):
    """Zero-argument calls that dispatch every attention kernel in `dtype`: every head dim, causal grouped heads,
    9 > 8 query rows; forward, delta, dQ and dK/dV."""
    for d in HEAD_DIMS:
        q = randn((1, 2, 9, d), dtype, "cpu").requires_grad_(True)
        k, v = (randn((1, 1, 9, d), dtype, "cpu", seed=s).requires_grad_(True) for s in (1, 2))
        yield lambda q=q, k=k, v=v: tmf.attention(q, k, v, causal=True).sum().backward()


# ---- calls that differ in one thing a launch plan depends on (tests/test_compile_shader.py's plan-cache test) -----
def plan_cache_calls() -> list:
    """(backend entry point, arguments): back to back, each must get its own plan."""
    r = draws()

    q, k, v = r(1, 2, 20, 32), r(1, 1, 20, 32), r(1, 1, 20, 32)
    bias = r(1, 1, 20, 20).expand(1, 2, 20, 20)
    out, lse = reference.attention_forward(q, k, v, None, True, 0, 0.3, 0.0, False)
    return [
        ("attention_forward", (q, k, v, None, False, 0, 0.3, 0.0, False)),
        ("attention_forward", (q, k, v, None, True, 0, 0.3, 0.0, False)),  # causal
        ("attention_forward", (q, k, v, None, True, 5, 0.3, 0.0, False)),  # window
        ("attention_forward", (q, k, v, None, True, 5, 0.2, 0.0, False)),  # scale
        ("attention_forward", (q, k, v, None, True, 5, 0.2, 2.0, False)),  # softcap
        ("attention_forward", (q, k, v, bias, True, 5, 0.2, 2.0, False)),  # mask
        ("attention_backward", (q, q, k, v, out, lse, None, True, 0, 0.3, 0.0)),
        ("attention_backward", (q, q, k, v, out, lse, None, True, 0, 0.3, 2.0)),  # softcap
    ]


# ---- NaN and ±inf as torch (tests/nan_inf.py: the contract and its helpers) ------------------------------------------
def _attention_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B·H·S, D): one row per (batch, head, position), as _check_rows takes them."""
    return t.detach().cpu().flatten(0, 2)


@nan_inf_contract("attention")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf(backend, dtype):
    """Two calls, against the float64 formula of tests/test_attention.py (attention64). (1) NaN/±inf placements in
    the query rows of head 0 (no mask, so every key is visible to them and the formula is well defined), a NaN in
    the incoming gradient of a head-1 row: those output rows (and dq rows) are NaN, every other row exact; the kv
    head they read gets NaN dk/dv, the other kv head (query heads 2, 3) stays exact. (2) Causal, with an additive
    mask holding -inf (a key dropped; a row with no key: zeros; a row with one key), +inf and NaN at visible keys
    (that row NaN, and dk/dv of the keys it sees) and NaN and +inf at causally invisible keys (dropped: the row
    stays exact)."""
    dev = backend.device
    d, kv_len = 32, 20
    # (1) query placements: head 0 holds one per row
    names = ["clean", "nan_first", "nan_middle", "nan_last", "all_nan", "pos_inf", "neg_inf", "pos_and_neg_inf",
             "clean_last"]  # fmt: skip
    s = len(names)
    q = randn((1, 4, s, d), dtype, dev, seed=1)
    placements = {
        "nan_first": (0, NAN),
        "nan_middle": (d // 2, NAN),
        "nan_last": (d - 1, NAN),
        "pos_inf": (d // 3, INF),
        "neg_inf": (d // 3, -INF),
        "pos_and_neg_inf": (1, INF),
    }
    for name, (col, value) in placements.items():
        q[0, 0, names.index(name), col] = value
    q[0, 0, names.index("all_nan")] = NAN
    q[0, 0, names.index("pos_and_neg_inf"), d - 2] = -INF
    k = randn((1, 2, kv_len, d), dtype, dev, seed=2)
    v = randn((1, 2, kv_len, d), dtype, dev, seed=3)
    dout = randn((1, 4, s, d), dtype, dev, seed=4)
    dout[0, 1, 2, d // 2] = NAN
    placed = [names.index(n) for n in names if not n.startswith("clean")]
    clean_out = [h * s + i for h in range(4) for i in range(s) if h > 0 or i not in placed]
    clean_dq = [r for r in clean_out if r != 1 * s + 2]
    calls = [("query placements", q, k, v, dout, None, False, clean_out, clean_dq, [kv_len + j for j in range(kv_len)])]
    # (2) mask placements, causal, S = Sk
    n = 13
    mask = torch.zeros((1, 1, n, n), dtype=torch.float64)
    mask[0, 0, 2, 1] = -INF  # a visible key dropped
    mask[0, 0, 4, :] = -INF  # no key: zeros
    mask[0, 0, 5, :6] = -INF
    mask[0, 0, 5, 3] = 0.0  # one key
    mask[0, 0, 6, 2] = INF  # NaN row
    mask[0, 0, 7, 7] = NAN  # NaN row
    mask[0, 0, 8, 10] = NAN  # invisible (causal): dropped, row exact
    mask[0, 0, 9, 12] = INF  # invisible: dropped
    mask[0, 0, 10, 0], mask[0, 0, 10, 9] = -INF, 3.0
    q2 = randn((1, 2, n, d), dtype, dev, seed=5)
    k2 = randn((1, 1, n, d), dtype, dev, seed=6)
    v2 = randn((1, 1, n, d), dtype, dev, seed=7)
    dout2 = randn((1, 2, n, d), dtype, dev, seed=8)
    clean2 = [h * n + i for h in range(2) for i in range(n) if i not in (6, 7)]
    calls.append(
        ("mask placements", q2, k2, v2, dout2, mask.to(dtype).to(dev), True, clean2, clean2, [8, 9, 10, 11, 12])
    )
    for what, q_, k_, v_, dy, m, causal, clean_out_rows, clean_dq_rows, clean_kv_rows in calls:
        leaves = [t.detach().clone().requires_grad_(True) for t in (q_, k_, v_)]
        out = tmf.attention(*leaves, m, causal=causal)
        grads = torch.autograd.grad(out, leaves, dy)
        leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
        bias64 = None if m is None else m.double().cpu()
        out64 = attention64(*leaves64, bias64, causal)
        refs = torch.autograd.grad(out64, leaves64, dy.double().cpu())
        tag = f"attention {what}"
        check_rows(_attention_rows(out), _attention_rows(out64), dtype, f"{tag} out", clean_out_rows)
        check_rows(_attention_rows(grads[0]), _attention_rows(refs[0]), dtype, f"{tag} dq", clean_dq_rows)
        for name, g, ref in zip(("dk", "dv"), grads[1:], refs[1:]):
            check_rows(_attention_rows(g), _attention_rows(ref), dtype, f"{tag} {name}", clean_kv_rows)
    assert torch.isnan(out[0, :, 6:8]).all() and (out[0, :, 4] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_on_the_sdpa_route(monkeypatch, dtype):
    """The NaN/inf contract on CUDA's route (PyTorch's SDPA), taken here with CPU tensors: a mask holding NaN or +inf
    (on a visible key: a NaN row; on a key the causal window hides: nothing) must not reach SDPA's kernels, which do
    not propagate them as the formula does."""
    from conftest import Backend

    from torch_metal_fused.ops import attention as attention_module

    monkeypatch.delenv("TORCH_METAL_FUSED_BACKEND", raising=False)
    monkeypatch.setattr(attention_module, "_sdpa_route", lambda q: True)
    test_nan_inf(Backend("sdpa route", "cpu"), dtype)
