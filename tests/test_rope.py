"""tmf.rope against Hugging Face's apply_rotary_pos_emb formula (rotate_half; GPT-J's rotate-every-two when
interleaved) in float64 autograd: every dtype, odd head dims (partial rotary) and sequence lengths, GQA, cos/sin
shared by the batch or per sequence, position_ids with gaps, the transposed projection outputs HF passes, heads in
dimension 2, strided incoming gradients; the harness reads q, k and cos/sin once; the HF attention patch equals the
unpatched model and leaves other models alone; bad input raises a clear error."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, AutogradCase, draws, randn, record_kernel_calls
from nan_inf import INF, NAN, nan_inf_contract

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _reference(q, k, cos, sin, unsqueeze_dim, interleaved):
    """HF's formula (partial rotary as HF's Phi/NeoX code: rotate the first rotary_dim elements, pass the rest)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    r = cos.shape[-1]
    rot = _rotate_every_two if interleaved else _rotate_half

    def embed(x):
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos + rot(x_rot) * sin, x_pass), dim=-1)

    return embed(q), embed(k)


def _tables(batch, seq, rotary_dim, dtype, device, interleaved, seed=3):
    """cos/sin as HF's rotary embedding builds them: angles for rotary_dim / 2 frequencies, duplicated by halves
    (or interleaved), random positions so every element differs."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(batch, seq, rotary_dim // 2, generator=g, dtype=torch.float64) * 50.0
    emb = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def _check(q, k, cos, sin, dtype, unsqueeze_dim=1, interleaved=False, position_ids=None, grads=None, what=""):
    q = q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    q_out, k_out = tmf.rope(q, k, cos, sin, position_ids, unsqueeze_dim=unsqueeze_dim, interleaved=interleaved)
    if grads is None:
        grads = (randn(q_out.shape, dtype, q.device, seed=11), randn(k_out.shape, dtype, q.device, seed=12))
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), grads)
    q64 = q.detach().double().cpu().requires_grad_(True)
    k64 = k.detach().double().cpu().requires_grad_(True)
    c64, s64 = cos.double().cpu(), sin.double().cpu()
    if position_ids is not None:
        c64, s64 = c64[position_ids.cpu()], s64[position_ids.cpu()]
    elif c64.ndim == 2:  # (seq, rotary_dim): shared by the batch
        c64, s64 = c64.unsqueeze(0), s64.unsqueeze(0)
    rq, rk = _reference(q64, k64, c64, s64, unsqueeze_dim, interleaved)
    dq64, dk64 = torch.autograd.grad((rq, rk), (q64, k64), tuple(g.double().cpu() for g in grads))
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    for name, got, want in (("q", q_out, rq), ("k", k_out, rk), ("dq", dq, dq64), ("dk", dk, dk64)):
        assert_matches(got, want, dtype, f"rope {name} {what}")


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("batch", "q_heads", "k_heads", "seq", "head_dim", "rotary_dim", "cos_batch"),
    [
        (2, 4, 2, 7, 16, 16, 2),  # GQA, cos per sequence
        (1, 3, 3, 33, 64, 64, 1),  # odd sequence length
        (3, 2, 1, 5, 37, 24, 1),  # odd head_dim, partial rotary, cos shared by the batch
        (2, 8, 8, 17, 128, 128, 2),  # Llama-sized heads
        (1, 2, 1, 3, 10, 2, 1),  # one rotation pair
    ],
)
def test_contract(backend, dtype, interleaved, batch, q_heads, k_heads, seq, head_dim, rotary_dim, cos_batch):
    q = randn((batch, q_heads, seq, head_dim), dtype, backend.device, scale=2.0)
    k = randn((batch, k_heads, seq, head_dim), dtype, backend.device, seed=1, scale=2.0)
    cos, sin = _tables(cos_batch, seq, rotary_dim, dtype, backend.device, interleaved)
    _check(q, k, cos, sin, dtype, interleaved=interleaved)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_tables_whose_halves_differ(backend, interleaved):
    """The op is HF's formula, x·cos + rotate(x)·sin, for any cos/sin: each element of a rotated pair takes its own
    cosine and sine. HF's tables repeat their values across the pair, so they cannot tell a kernel that reads the
    partner's; these random ones can."""
    batch, heads, seq, d = 2, 3, 5, 16
    q = randn((batch, heads, seq, d), torch.float32, backend.device, scale=2.0)
    k = randn((batch, 1, seq, d), torch.float32, backend.device, seed=1, scale=2.0)
    g = torch.Generator().manual_seed(4)
    angles = torch.rand(batch, seq, d, generator=g, dtype=torch.float64) * 50.0  # every element its own angle
    cos, sin = (t.float().to(backend.device) for t in (angles.cos(), angles.sin()))
    _check(q, k, cos, sin, torch.float32, interleaved=interleaved, what="arbitrary tables")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hf_layouts_and_strided_gradients(backend, dtype):
    """q and k as HF's attention makes them (projection outputs viewed (batch, seq, heads, head_dim), transposed),
    a storage offset, heads in dimension 2 (unsqueeze_dim=2), 2-D cos/sin, transposed incoming gradients."""
    batch, seq, heads, kv, d = 2, 9, 4, 2, 32
    proj = randn((batch, seq, (heads + kv) * d + 3), dtype, backend.device, scale=2.0)
    q = proj[..., 3 : 3 + heads * d].view(batch, seq, heads, d).transpose(1, 2)  # offset 3, strided
    k = proj[..., 3 + heads * d :].reshape(batch, seq, kv, d).transpose(1, 2)
    assert q.storage_offset() == 3 and not q.is_contiguous()
    cos, sin = _tables(batch, seq, d, dtype, backend.device, False)
    _check(q, k, cos, sin, dtype, what="transposed projections")
    _check(q, k.contiguous(), cos, sin, dtype, what="q transposed, k contiguous (different head strides)")
    gq = randn((batch, seq, heads, d), dtype, backend.device, seed=5).transpose(1, 2)
    gk = randn((batch, seq, kv, d), dtype, backend.device, seed=6).transpose(1, 2)
    _check(q, k, cos, sin, dtype, grads=(gq, gk), what="transposed gradients")
    _check(q.transpose(1, 2), k.transpose(1, 2), cos, sin, dtype, unsqueeze_dim=2, what="unsqueeze_dim=2")
    _check(q, k, cos[0], sin[0], dtype, what="2-D cos/sin")


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_position_ids_with_gaps(backend, dtype, interleaved):
    """Tables (positions, rotary_dim) indexed by position_ids with gaps and repeats (packed sequences, left
    padding), one row of ids per sequence or one shared."""
    batch, seq, d = 2, 6, 16
    q = randn((batch, 3, seq, d), dtype, backend.device)
    k = randn((batch, 1, seq, d), dtype, backend.device, seed=1)
    cos, sin = _tables(1, 40, d, dtype, backend.device, interleaved)
    ids = torch.tensor([[0, 1, 2, 10, 11, 39], [5, 5, 0, 1, 2, 3]], device=backend.device)
    _check(q, k, cos[0], sin[0], dtype, interleaved=interleaved, position_ids=ids, what="per-sequence ids")
    _check(q, k, cos[0], sin[0], dtype, interleaved=interleaved, position_ids=ids[:1], what="shared ids")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_values(backend, dtype):
    """±inf and NaN in q propagate exactly as the float64 formula gives them (an inf times a zero sine is NaN)."""
    q = randn((1, 2, 3, 8), dtype, backend.device, scale=2.0)
    q[0, 0, 0, 1] = float("inf")
    q[0, 1, 2, 5] = float("nan")
    q[0, 1, 1, 0] = -float("inf")
    k = randn((1, 1, 3, 8), dtype, backend.device, seed=1)
    cos, sin = _tables(1, 3, 8, dtype, backend.device, False)
    _check(q, k, cos, sin, dtype, what="edge values")


@pytest.mark.parametrize(("q_shape", "k_shape"), [((2, 3, 0, 8), (2, 1, 0, 8)), ((0, 3, 4, 8), (0, 1, 4, 8))])
def test_empty(backend, q_shape, k_shape):
    q = torch.randn(q_shape, device=backend.device, requires_grad=True)
    k = torch.randn(k_shape, device=backend.device, requires_grad=True)
    cos = torch.randn(1, q_shape[2], 8, device=backend.device)
    q_out, k_out = tmf.rope(q, k, cos, cos)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad.shape == q.shape


def test_bad_input_is_a_clear_error():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        tmf.rope(q, k, cos, cos, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="q and k must be 4-D"):
        tmf.rope(q[0], k, cos, cos)
    with pytest.raises(ValueError, match="must agree in batch, seq and head_dim"):
        tmf.rope(q, torch.randn(2, 2, 6, 8), cos, cos)
    with pytest.raises(ValueError, match="same shape"):
        tmf.rope(q, k, cos, cos[:1])
    with pytest.raises(ValueError, match=r"shape \(batch or 1, seq, rotary_dim\)"):
        tmf.rope(q, k, torch.randn(2, 6, 8), torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="must be even"):
        tmf.rope(q, k, torch.randn(2, 5, 7), torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="must be even"):
        tmf.rope(q, k, torch.randn(2, 5, 10), torch.randn(2, 5, 10))  # wider than head_dim
    with pytest.raises(ValueError, match="position_ids must lie in"):
        tmf.rope(q, k, cos[0], cos[0], torch.tensor([[0, 1, 2, 3, 5]]))
    with pytest.raises(ValueError, match="tables"):
        tmf.rope(q, k, cos, cos, torch.tensor([[0, 1, 2, 3, 4]]))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        tmf.rope(q, k, cos[0], cos[0], torch.zeros(1, 5))
    with pytest.raises(ValueError, match="get no gradient"):
        tmf.rope(q, k, cos.requires_grad_(), cos)
    with pytest.raises(TypeError, match="k"):
        tmf.rope(q, k.double(), torch.randn(2, 5, 8), torch.randn(2, 5, 8))


@pytest.mark.emulated
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_harness_reads_q_k_and_cos_sin_once(monkeypatch, dtype):
    """The traffic floor: q and k read once and written once (as the outputs), cos and sin read once per position
    — all heads of q and k from the same registers — in one dispatch, forward and backward alike."""
    from torch_metal_fused.emulator import runner
    from torch_metal_fused.ops.rope import rope_apply

    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "metal-emulated")
    batch, seq, d = 2, 24, 64
    q = randn((batch, seq, 8, d), dtype, "cpu").transpose(1, 2)  # HF's layout
    k = randn((batch, 2, seq, d), dtype, "cpu", seed=1)
    cos, sin = _tables(1, seq, d, dtype, "cpu", False)
    es = q.element_size()
    for backward in (False, True):
        with runner.record() as rec:
            rope_apply(q, k, cos, sin, False, backward)
        (dispatch,) = rec
        qb, kb, cb = q.numel() * es, k.numel() * es, batch * seq * d * es  # cos: once per (batch, position)
        assert dispatch.traffic == {0: (qb, 0), 1: (kb, 0), 2: (cb, 0), 3: (cb, 0), 4: (0, qb), 5: (0, kb)}


# ---- Hugging Face patch ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_patched_attention_equals_hf_and_other_models_keep_hf_rope(backend, family, monkeypatch):
    """patch_model(rope=True): the family's apply_rotary_pos_emb is replaced in its module, but the replacement runs
    our kernel only inside a patched model's attention; logits and gradients equal the unpatched model's; another
    (unpatched) model of the same family keeps HF's function; unpatching the last patched model restores it."""
    import copy

    from test_patch import _tiny_causal_lm

    calls = record_kernel_calls(monkeypatch, ("rope",))
    from torch_metal_fused import patch as tmf_patch

    model = _tiny_causal_lm(family)
    other = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    hf_module = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    # Models patched earlier in this process (and never unpatched) may hold the replacement already.
    original_fn = getattr(hf_module.apply_rotary_pos_emb, "_tmf_original", hf_module.apply_rotary_pos_emb)
    users = tmf_patch.rope_users(hf_module.__name__)
    report = tmf.patch_model(model, rms_norm=False, lora=False, rope=True)
    assert tmf_patch.rope_users(hf_module.__name__) == users + 1  # one attention layer
    assert sum("rotary embedding fused" in what for _, what in report.patched) == 1, report
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(4)).to(backend.device)
    for m in (model, other, reference):
        m.to(backend.device)
    out, ref = model(input_ids=ids), reference(input_ids=ids)
    assert calls.count("rope_apply") == 1  # one layer: one forward call
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.logits.square().mean().backward()
    ref.logits.square().mean().backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    other(input_ids=ids)
    assert calls == []  # the unpatched model: HF's own formula
    assert hf_module.apply_rotary_pos_emb._tmf_original is original_fn
    assert tmf.unpatch_model(model) == 1
    assert tmf_patch.rope_users(hf_module.__name__) == users
    if users == 0:  # the last patched attention of the family: HF's function is back
        assert hf_module.apply_rotary_pos_emb is original_fn


# ---- the autograd contract's case (tests/test_autograd_contract.py) --------------------------------------------
def autograd_case(name, device, dtype, reduction) -> AutogradCase:
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    angles = torch.arange(7, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat((angles, angles), -1)[None]
    cos, sin = emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)
    ins = [randn((2, 4, 7, 16), dtype, device, seed=1), randn((2, 2, 7, 16), dtype, device, seed=2)]
    return AutogradCase(
        lambda q, k: tmf.rope(q, k, cos, sin),
        lambda q, k: _reference(q, k, cos.to(q.device, q.dtype), sin.to(q.device, q.dtype), 1, False),
        ins,
    )


# ---- every kernel of the family, for tests/test_emulator_kernels.py's drive -------------------------------------
def every_kernel(dtype):
    """A zero-argument call that dispatches the RoPE kernel in `dtype`, forward and backward (grouped k heads,
    partial rotary)."""
    q, k = randn((2, 3, 5, 12), dtype, "cpu").requires_grad_(True), randn((2, 1, 5, 12), dtype, "cpu")
    cos, sin = randn((1, 5, 8), dtype, "cpu"), randn((1, 5, 8), dtype, "cpu", seed=1)
    yield lambda: sum(t.sum() for t in tmf.rope(q, k.requires_grad_(True), cos, sin)).backward()


# ---- calls that differ in one thing a launch plan depends on (tests/test_compile_shader.py's plan-cache test) -----
def plan_cache_calls() -> list:
    """(backend entry point, arguments): back to back, each must get its own plan."""
    r = draws()

    q, k = r(2, 3, 5, 8), r(2, 1, 5, 8)
    cos1, sin1, cos2, sin2 = r(1, 5, 8), r(1, 5, 8), r(2, 5, 8), r(2, 5, 8)
    return [
        ("rope_apply", (q, k, cos1, sin1, False, False)),
        ("rope_apply", (q, k, cos1, sin1, True, False)),  # interleaved
        ("rope_apply", (q, k, cos1, sin1, True, True)),  # backward
        ("rope_apply", (q, k, cos2, sin2, True, True)),  # cos per sequence
    ]


# ---- NaN and ±inf as torch (tests/nan_inf.py: the contract and its helpers) ------------------------------------------
def _rope64(q, k, cos, sin, interleaved):
    r = cos.shape[-1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        if interleaved:
            return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return torch.cat((-x[..., r // 2 :], x[..., : r // 2]), dim=-1)

    def embed(x):
        return torch.cat((x[..., :r] * c + rot(x[..., :r]) * s, x[..., r:]), dim=-1)

    return embed(q), embed(k)


@nan_inf_contract("rope")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("head_dim", "rotary_dim", "interleaved"),
    [(16, 16, False), (10, 6, True)],
    ids=["rotate_half", "partial_interleaved"],
)
def test_nan_inf(backend, dtype, head_dim, rotary_dim, interleaved):
    """NaN/±inf in q and k at the first, a middle and the last element of a head (the last one past rotary_dim when
    partial: copied), in the incoming gradients, and NaN in the cos and sin tables at one position."""
    batch, q_heads, k_heads, seq = 2, 3, 1, 5
    q = randn((batch, q_heads, seq, head_dim), dtype, backend.device)
    k = randn((batch, k_heads, seq, head_dim), dtype, backend.device, seed=1)
    q[0, 0, 0, 0], q[0, 1, 1, head_dim // 2], q[0, 2, 2, head_dim - 1] = NAN, INF, -INF
    k[1, 0, 3, 0], k[1, 0, 4, head_dim - 1] = -INF, NAN
    g = torch.Generator().manual_seed(3)
    angles = torch.rand(batch, seq, rotary_dim // 2, generator=g, dtype=torch.float64) * 50.0
    emb = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    cos, sin = emb.cos(), emb.sin()
    cos[1, 2, 1], sin[0, 4, rotary_dim - 1] = NAN, NAN
    cos, sin = cos.to(dtype).to(backend.device), sin.to(dtype).to(backend.device)
    q, k = q.requires_grad_(True), k.requires_grad_(True)
    q_out, k_out = tmf.rope(q, k, cos, sin, interleaved=interleaved)
    dq_out = randn(q_out.shape, dtype, backend.device, seed=4)
    dk_out = randn(k_out.shape, dtype, backend.device, seed=5)
    dq_out[1, 1, 0, 1], dk_out[0, 0, 1, head_dim - 1] = NAN, INF
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    q64 = q.detach().double().cpu().requires_grad_(True)
    k64 = k.detach().double().cpu().requires_grad_(True)
    rq, rk = _rope64(q64, k64, cos.double().cpu(), sin.double().cpu(), interleaved)
    dq64, dk64 = torch.autograd.grad((rq, rk), (q64, k64), (dq_out.double().cpu(), dk_out.double().cpu()))
    for name, got, want in (("q", q_out, rq), ("k", k_out, rk), ("dq", dq, dq64), ("dk", dk, dk64)):
        assert_matches(got, want, dtype, f"rope {name} head_dim {head_dim} rotary {rotary_dim}")
