"""cross_entropy and linear_cross_entropy against torch's cross-entropy in float64: every dtype, odd vocabulary
sizes, ignored rows, -inf logits, label smoothing, soft-capping, bias, views, every reduction; the chunked linear op
never allocates tokens x vocabulary; bad input raises a clear error."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from helpers import DTYPES, AutogradCase, draws, randn
from nan_inf import INF, NAN, VOCABS, check_rows, nan_inf_contract, row_cases
from torch.utils._python_dispatch import TorchDispatchMode

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches

F = torch.nn.functional


def _capped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _targets(rows: int, vocab: int, device, ignore_every: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[1::ignore_every] = -100  # some rows ignored (not the first: a 1-row batch keeps a defined mean)
    return t.to(device)


def _reference_loss(z64, target, reduction, label_smoothing, softcap):
    return F.cross_entropy(_capped(z64, softcap), target.cpu(), reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 33, 32001])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("label_smoothing", "softcap"), [(0.0, None), (0.1, None), (0.0, 3.0), (0.2, 2.0)])
def test_cross_entropy_contract(backend, dtype, vocab, reduction, label_smoothing, softcap):
    rows = 5 if vocab > 1000 else 13
    logits = randn((rows, vocab), dtype, backend.device, scale=3.0).requires_grad_(True)
    target = _targets(rows, vocab, backend.device)
    loss = tmf.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing, softcap=softcap)
    gout = randn(loss.shape, dtype, backend.device, seed=5) if reduction == "none" else torch.tensor(1.7)
    (dlogits,) = torch.autograd.grad(loss, logits, gout.to(loss.dtype).to(backend.device))
    z64 = logits.detach().double().cpu().requires_grad_(True)
    ref = _reference_loss(z64, target, reduction, label_smoothing, softcap)
    (ref_grad,) = torch.autograd.grad(ref, z64, gout.double().cpu())
    assert loss.dtype == dtype and loss.shape == ref.shape
    assert_matches(loss, ref, dtype, "cross_entropy loss")
    assert_matches(dlogits, ref_grad, dtype, "cross_entropy dlogits")


def _linear_reference(h, w, b, target, reduction, label_smoothing, softcap, leaves):
    z = h @ w.t() + (b if b is not None else 0)
    return _reference_loss(z, target, reduction, label_smoothing, softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden", "vocab"), [(17, 24, 33), (9, 8, 32001), (1, 5, 1)])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "bias+smoothing", "softcap+frozen_weight"])
def test_linear_cross_entropy_contract(backend, dtype, tokens, hidden, vocab, chunk_size, reduction, options):
    label_smoothing = 0.1 if "smoothing" in options else 0.0
    softcap = 2.5 if "softcap" in options else None
    h = randn((tokens, hidden), dtype, backend.device).requires_grad_(True)
    w = randn((vocab, hidden), dtype, backend.device, scale=hidden**-0.5, seed=1)
    w.requires_grad_("frozen_weight" not in options)
    b = randn((vocab,), dtype, backend.device, seed=2).requires_grad_(True) if "bias" in options else None
    target = _targets(tokens, vocab, backend.device, ignore_every=3)
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    loss = tmf.linear_cross_entropy(
        h, w, target, b, reduction=reduction, label_smoothing=label_smoothing, softcap=softcap, chunk_size=chunk_size
    )
    gout = randn(loss.shape, dtype, backend.device, seed=5) if reduction == "none" else torch.tensor(0.8)
    grads = torch.autograd.grad(loss, leaves, gout.to(loss.dtype).to(backend.device))

    def reference(dt):
        ins = [t.detach().to(dt).cpu().requires_grad_(t.requires_grad) if t is not None else None for t in (h, w, b)]
        out = _linear_reference(*ins, target, reduction, label_smoothing, softcap, None)
        wanted = [t for t in ins if t is not None and t.requires_grad]
        return out, torch.autograd.grad(out, wanted, gout.to(dt).cpu())

    ref, ref_grads = reference(torch.float64)
    base, base_grads = reference(torch.float32)  # PyTorch's own float32 computation: the fairness baseline
    assert loss.dtype == dtype and loss.shape == ref.shape
    assert_matches(loss, ref, dtype, "linear_cross_entropy loss", baseline=base.to(dtype))
    for g, r, bl in zip(grads, ref_grads, base_grads):
        assert_matches(g, r, dtype, "linear_cross_entropy gradient", baseline=bl.to(dtype))


def test_minus_inf_logits_and_a_target_on_one(backend):
    logits = randn((4, 9), torch.float32, backend.device).requires_grad_(True)
    with torch.no_grad():
        logits[:, ::2] = float("-inf")  # masked classes
    target = torch.tensor([1, 3, 5, 0], device=backend.device)  # the last row's target is masked: loss inf
    loss = tmf.cross_entropy(logits, target, reduction="none")
    (dlogits,) = torch.autograd.grad(loss[:3].sum(), logits)
    z64 = logits.detach().double().cpu().requires_grad_(True)
    ref = F.cross_entropy(z64, target.cpu(), reduction="none")
    (ref_grad,) = torch.autograd.grad(ref[:3].sum(), z64)
    assert_matches(loss, ref, torch.float32, "loss with -inf logits")
    assert torch.isinf(loss[3]) and loss[3] > 0
    assert_matches(dlogits, ref_grad, torch.float32, "dlogits with -inf logits")


def test_minus_inf_logits_ahead_of_finite_ones_in_a_threads_columns(backend):
    """Masked (-inf) classes at the start of a vocabulary wide enough that each thread reads several columns: a thread
    meets -inf before its first finite logit, which the online max/sum must skip (exp(-inf - -inf) is NaN). The test
    above has one column per thread, where such a thread's sum is discarded anyway."""
    logits = randn((3, 5000), torch.float32, backend.device).requires_grad_(True)
    with torch.no_grad():
        logits[:, :2600] = float("-inf")
        logits[1, 2600:4000:3] = float("-inf")  # and some among the finite ones
    target = torch.tensor([2600, 4999, 3001], device=backend.device)
    loss = tmf.cross_entropy(logits, target, reduction="none")
    (dlogits,) = torch.autograd.grad(loss.sum(), logits)
    z64 = logits.detach().double().cpu().requires_grad_(True)
    ref = F.cross_entropy(z64, target.cpu(), reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), z64)
    assert_matches(loss, ref, torch.float32, "loss with leading -inf logits")
    assert_matches(dlogits, ref_grad, torch.float32, "dlogits with leading -inf logits")


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_a_batch_with_every_row_ignored_has_zero_loss_and_gradient(backend, op):
    """torch's "mean" gives NaN here; ours gives 0 (documented), so one fully padded batch cannot poison training."""
    h = randn((6, 8), torch.float32, backend.device).requires_grad_(True)
    w = randn((11, 8), torch.float32, backend.device, seed=1).requires_grad_(True)
    target = torch.full((6,), -100, device=backend.device)
    for reduction in ("mean", "sum"):
        if op == "cross_entropy":
            loss = tmf.cross_entropy(h @ w.t(), target, reduction=reduction)
        else:
            loss = tmf.linear_cross_entropy(h, w, target, reduction=reduction, chunk_size=4)
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_linear_cross_entropy_with_an_empty_hidden_size(backend):
    """hidden of width 0: every logit is 0 (or the bias), so each row's loss is log(vocab) and hidden's gradient is
    empty (reshape(-1, 0) could not infer the rows), as the formula gives them."""
    h = torch.zeros(2, 3, 0, device=backend.device).requires_grad_(True)
    w = torch.zeros(7, 0, device=backend.device).requires_grad_(True)
    target = torch.tensor([[1, 2, 3], [4, 5, -100]], device=backend.device)
    loss = tmf.linear_cross_entropy(h, w, target)
    gh, gw = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(loss.cpu(), torch.tensor(math.log(7)))
    assert gh.shape == h.shape and gw.shape == w.shape


def test_views(backend):
    """Logits rows wider than the vocabulary (their own row stride), a transposed logits view, and a hidden view
    with wider rows and a storage offset."""
    for dtype in (torch.float32, torch.bfloat16):
        wide = randn((5, 300), dtype, backend.device, scale=2.0)
        logits = wide[:, 7:290].detach().requires_grad_(True)
        t = _targets(5, 283, backend.device)
        (g,) = torch.autograd.grad(tmf.cross_entropy(logits, t, reduction="sum"), logits)
        z64 = logits.detach().double().cpu().requires_grad_(True)
        (ref,) = torch.autograd.grad(F.cross_entropy(z64, t.cpu(), reduction="sum"), z64)
        assert_matches(g, ref, dtype, "dlogits of a strided-row view")
    logits = randn((40, 6), torch.float32, backend.device).t()  # (6, 40), last dim strided
    target = _targets(6, 40, backend.device)
    assert_matches(
        tmf.cross_entropy(logits, target), F.cross_entropy(logits.double().cpu(), target.cpu()), torch.float32
    )
    wide = randn((7, 30), torch.float32, backend.device)
    h = wide[1:, 3:19]
    w = randn((25, 16), torch.float32, backend.device, seed=1)
    t = _targets(6, 25, backend.device)
    ref = F.cross_entropy(h.double().cpu() @ w.double().cpu().t(), t.cpu())
    assert_matches(tmf.linear_cross_entropy(h, w, t, chunk_size=4), ref, torch.float32)


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
def test_targets_of_either_index_dtype_as_strided_views(backend, target_dtype):
    """The kernels read targets as they come (an int64 one by its low 32-bit word, no conversion pass): int64 and
    int32, contiguous and every third element of a wider tensor at a storage offset, a vocabulary past 2^16, a custom
    negative ignore_index; also through linear_cross_entropy's chunks (slices of the target)."""
    vocab, rows = 70001, 6
    logits = randn((rows, vocab), torch.float32, backend.device, scale=2.0).requires_grad_(True)
    ids = torch.tensor([69999, 3, -7, 65536, 0, 70000])
    wide = torch.full((3 * rows + 2,), 12345, dtype=target_dtype, device=backend.device)
    wide[2::3] = ids.to(wide)
    for target in (ids.to(wide), wide[2::3]):
        loss = tmf.cross_entropy(logits, target, ignore_index=-7, reduction="sum")
        (g,) = torch.autograd.grad(loss, logits)
        z64 = logits.detach().double().cpu().requires_grad_(True)
        ref = F.cross_entropy(z64, ids, ignore_index=-7, reduction="sum")
        (ref_g,) = torch.autograd.grad(ref, z64)
        assert target.dtype == target_dtype
        assert_matches(loss, ref, torch.float32, f"loss, {target_dtype} target with stride {target.stride(0)}")
        assert_matches(g, ref_g, torch.float32, f"dlogits, {target_dtype} target with stride {target.stride(0)}")
    h = randn((rows, 8), torch.float32, backend.device, seed=3)
    w = randn((40, 8), torch.float32, backend.device, seed=4)
    small = torch.tensor([39, 3, -7, 20, 0, 1])
    wide[2::3] = small.to(wide)
    target = wide[2::3]
    ref = F.cross_entropy(h.double().cpu() @ w.double().cpu().t(), small, ignore_index=-7)
    assert_matches(tmf.linear_cross_entropy(h, w, target, ignore_index=-7, chunk_size=4), ref, torch.float32)


def test_leading_dimensions_and_the_module(backend):
    h = randn((2, 5, 12), torch.float32, backend.device)
    w = randn((19, 12), torch.float32, backend.device, seed=1)
    t = _targets(10, 19, backend.device).reshape(2, 5)
    loss = tmf.nn.LinearCrossEntropyLoss(reduction="none", chunk_size=3)(h, w, t)
    assert loss.shape == (2, 5)
    ref = F.cross_entropy(
        (h.double().cpu() @ w.double().cpu().t()).reshape(10, 19), t.cpu().reshape(10), reduction="none"
    )
    assert_matches(loss.reshape(10), ref, torch.float32)


class _Allocations(TorchDispatchMode):
    """The shapes of every new tensor (not a view) an op returns inside the block."""

    def __init__(self, vocab: int = 0) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.vocab = vocab
        self.live_gemm_logit_rows = 0  # rows of (rows, vocab) GEMM outputs (chunks of logits) not yet freed
        self.peak_gemm_logit_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view (t, slice, reshape...) or an in-place result: no new memory
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and t.shape[-1] == self.vocab:
                    self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        rows = t.shape[0]
        self.live_gemm_logit_rows += rows
        self.peak_gemm_logit_rows = max(self.peak_gemm_logit_rows, self.live_gemm_logit_rows)
        weakref.finalize(t, self._freed, rows)

    def _freed(self, rows: int) -> None:
        self.live_gemm_logit_rows -= rows

    def most_logit_rows(self, vocab: int) -> int:
        """The most rows of any (rows, vocab) tensor: logits, their float32 temporaries and gradient."""
        return max((s[0] for s in self.shapes if len(s) == 2 and s[1] == vocab), default=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_never_allocates_the_full_logits(reduction):
    """Forward and backward: no tensor larger than one chunk of logits (tokens x vocab never exists)."""
    tokens, hidden, vocab, chunk = 64, 16, 500, 8
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (tokens,))
    with _Allocations(vocab) as fused:
        loss = tmf.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=chunk)
        loss.sum().backward()
    assert fused.most_logit_rows(vocab) == chunk
    # one chunk of logits alive at a time: each is freed before the next chunk's GEMM (the peak memory)
    assert fused.peak_gemm_logit_rows == chunk
    assert max(torch.Size(s).numel() for s in fused.shapes) <= vocab * hidden  # nothing beyond dweight's size
    with _Allocations() as unfused:
        F.cross_entropy(h @ w.t(), t).backward()
    assert unfused.most_logit_rows(vocab) == tokens  # the check sees the full logits where they exist


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_out_dtype_float32_returns_the_unrounded_loss(backend, reduction):
    """bfloat16 inputs with out_dtype=float32 (what patch_model's loss uses, as HF's float32 loss): the loss is the
    float32 accumulation, closer to float64 than a bfloat16 rounding could be; gradients flow as before."""
    h = randn((37, 16), torch.bfloat16, backend.device).requires_grad_(True)
    w = randn((300, 16), torch.bfloat16, backend.device, seed=3)
    target = _targets(37, 300, backend.device)
    # an output gradient that bfloat16 holds exactly, so both runs below get the same one
    gout = randn((37,), torch.bfloat16, backend.device, seed=4) if reduction == "none" else torch.tensor(1.25)
    # the logits as the chunk GEMM rounds them to bfloat16; the loss from them is then float32 accumulation alone
    z = (h.detach() @ w.t()).double().cpu()
    ref = _reference_loss(z, target, reduction, 0.0, None)
    for op in ("linear", "rows"):
        loss = (
            tmf.linear_cross_entropy(h, w, target, reduction=reduction, out_dtype=torch.float32)
            if op == "linear"
            else tmf.cross_entropy(h @ w.t(), target, reduction=reduction, out_dtype=torch.float32)
        )
        assert loss.dtype == torch.float32, op
        torch.testing.assert_close(loss.double().cpu(), ref, rtol=2e-4, atol=1e-5, msg=op)  # bfloat16: 4e-3
        (dh,) = torch.autograd.grad(loss, h, gout.float().to(backend.device))
        (ref_dh,) = torch.autograd.grad(
            tmf.linear_cross_entropy(h, w, target, reduction=reduction), h, gout.to(torch.bfloat16).to(backend.device)
        )
        assert dh.dtype == torch.bfloat16
        assert_matches(dh, ref_dh.double(), torch.bfloat16, f"{op} dhidden")


def test_default_chunk_size_bounds_the_chunk_memory():
    from torch_metal_fused.ops.cross_entropy import (
        CHUNK_BUDGET_BYTES,
        CHUNK_BUDGET_BYTES_NO_DWEIGHT,
        default_chunk_size,
    )

    n = default_chunk_size(16384, 128256, torch.bfloat16)
    assert 8 <= n < 16384 and n % 8 == 0 and n * 128256 * 14 <= CHUNK_BUDGET_BYTES
    n = default_chunk_size(16384, 128256, torch.bfloat16, fused_rows=True, needs_dweight=False)
    assert 8 <= n and n % 8 == 0 and n * 128256 * 2 <= CHUNK_BUDGET_BYTES_NO_DWEIGHT < CHUNK_BUDGET_BYTES
    assert default_chunk_size(10, 32, torch.float32) == 10


def test_a_frozen_head_takes_the_smaller_chunks(monkeypatch):
    """The chunk the op picks: the no-dweight budget for a frozen weight (LoRA) or under no_grad, the larger one for a
    trained weight (each chunk re-reads dweight)."""
    from torch_metal_fused.ops import cross_entropy as ce

    picked = []
    real = ce.default_chunk_size
    monkeypatch.setattr(ce, "default_chunk_size", lambda *a, **k: picked.append(real(*a, **k)) or picked[-1])
    h, target = torch.randn(64, 8, requires_grad=True), torch.randint(0, 4096, (64,))
    w = torch.randn(4096, 8)
    monkeypatch.setattr(ce, "CHUNK_BUDGET_BYTES", 4096 * 16 * 32)  # float32 logits + the reference's temporaries
    monkeypatch.setattr(ce, "CHUNK_BUDGET_BYTES_NO_DWEIGHT", 4096 * 16 * 8)
    tmf.linear_cross_entropy(h, w, target)
    tmf.linear_cross_entropy(h, w.requires_grad_(True), target)
    with torch.no_grad():
        tmf.linear_cross_entropy(h, w, target)
    assert picked == [8, 32, 8]


def test_bad_input_is_a_clear_error():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.tensor([1, 2, 3, -100])
    with pytest.raises(TypeError, match="target must hold class indices"):
        tmf.linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        tmf.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="class index 10, outside"):
        tmf.linear_cross_entropy(h, w, torch.tensor([1, 10, 3, 0]))
    with pytest.raises(ValueError, match="class index -1, outside"):
        tmf.cross_entropy(h @ w.t(), torch.tensor([1, -1, 3, 0]))
    with pytest.raises(ValueError, match="weight must have shape"):
        tmf.linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        tmf.linear_cross_entropy(h, w, t, torch.randn(9))
    with pytest.raises(ValueError, match="reduction must be one of"):
        tmf.cross_entropy(h, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        tmf.cross_entropy(h, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap must be positive"):
        tmf.cross_entropy(h, t, softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        tmf.linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(TypeError, match="dtype torch.float64 but hidden has dtype torch.float32"):
        tmf.linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="out_dtype must be a floating-point torch.dtype"):
        tmf.linear_cross_entropy(h, w, t, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="out_dtype must be a floating-point torch.dtype"):
        tmf.cross_entropy(h, t, out_dtype="float32")


# ---- the autograd contract's case (tests/test_autograd_contract.py) --------------------------------------------
AUTOGRAD_TARGET = [3, 0, 38, -100, 7, 21, 39, 1, 12]  # one ignored row


def autograd_case(name, device, dtype, reduction) -> AutogradCase:
    """Both ops refuse double backward (their gradient is computed in forward)."""
    target = torch.tensor(AUTOGRAD_TARGET, device=device)
    scalar = reduction != "none"
    if name == "cross_entropy":
        return AutogradCase(
            lambda z: tmf.cross_entropy(z, target, reduction=reduction),
            lambda z: F.cross_entropy(z, target.to(z.device), reduction=reduction),
            [randn((9, 40), dtype, device, scale=3.0, seed=1)],
            double_backward=False,
            scalar_output=scalar,
        )
    ins = [randn((9, 16), dtype, device, seed=1), randn((40, 16), dtype, device, scale=0.5, seed=2)]
    return AutogradCase(
        lambda h, w, b: tmf.linear_cross_entropy(h, w, target, b, reduction=reduction, chunk_size=4),
        lambda h, w, b: F.cross_entropy(F.linear(h, w, b), target.to(h.device), reduction=reduction),
        [*ins, randn((40,), dtype, device, seed=3)],
        double_backward=False,
        scalar_output=scalar,
    )


# ---- every kernel of the family, for tests/test_emulator_kernels.py's drive -------------------------------------
def every_kernel(dtype):
    """A zero-argument call that dispatches the cross-entropy row kernel in `dtype`, loss and gradient."""
    logits = randn((3, 50), dtype, "cpu").requires_grad_(True)
    yield lambda: tmf.cross_entropy(logits, torch.tensor([1, 2, 3])).backward()


# ---- calls that differ in one thing a launch plan depends on (tests/test_compile_shader.py's plan-cache test) -----
def plan_cache_calls() -> list:
    """(backend entry point, arguments): back to back, each must get its own plan."""
    r = draws()

    logits, target, ones = r(6, 50), torch.tensor([1, 2, 3, 4, 5, 2]), torch.ones(6)
    return [
        ("cross_entropy_rows", (logits, target, -100, 0.0, 0.0, ones, False)),
        ("cross_entropy_rows", (logits, target, 2, 0.0, 0.0, ones, False)),  # ignore_index
        ("cross_entropy_rows", (logits, target, 2, 0.1, 0.0, ones, False)),  # label smoothing
        ("cross_entropy_rows", (logits, target, 2, 0.1, 3.0, ones, False)),  # softcap
        ("cross_entropy_rows", (logits, target, 2, 0.1, 3.0, None, False)),  # loss only
        ("cross_entropy_rows", (logits, target.int(), 2, 0.1, 3.0, None, False)),  # int32 targets
    ]


# ---- NaN and ±inf as torch (tests/nan_inf.py: the contract and its helpers) ------------------------------------------
IGNORE = -100


def _ce_cases(vocab: int):
    """(logits rows, targets, names): the row placements, plus NaN/±inf at the target column and ignored rows."""
    cases = row_cases(vocab, seed=vocab + 3)
    g = torch.Generator().manual_seed(vocab)
    r = lambda: torch.randn(vocab, generator=g, dtype=torch.float64)  # noqa: E731
    default_target = vocab // 4 + 1  # no placement of _row_cases sits there
    extra = []
    for name, value in (("nan_at_target", NAN), ("pos_inf_at_target", INF), ("neg_inf_at_target", -INF)):
        row = r()
        row[default_target] = value
        extra.append((name, row))
    ignored_nan = r()
    ignored_nan[vocab // 2] = NAN
    ignored_inf = r()
    ignored_inf[0], ignored_inf[vocab - 1] = INF, -INF
    extra += [("ignored_nan", ignored_nan), ("ignored_inf", ignored_inf), ("ignored_clean", r()), ("clean_end", r())]
    cases = cases + extra
    names = [n for n, _ in cases]
    targets = torch.tensor([IGNORE if n.startswith("ignored") else default_target for n in names])
    return torch.stack([row for _, row in cases]), targets, names


def _ce_reference(z64, target, label_smoothing, softcap, reduction, dloss):
    """torch's F.cross_entropy (with Gemma's soft-capping composed in front) in float64, loss and d/dlogits; ignored
    rows' gradient set to 0 (the decided semantics: torch's is NaN where such a row holds a NaN)."""
    z64 = z64.detach().double().cpu().requires_grad_(True)
    z = softcap * torch.tanh(z64 / softcap) if softcap else z64
    loss = F.cross_entropy(z, target.cpu(), ignore_index=IGNORE, reduction=reduction, label_smoothing=label_smoothing)
    (dz,) = torch.autograd.grad(loss, z64, dloss.double().cpu())
    dz[target.cpu() == IGNORE] = 0.0
    return loss.detach(), dz


@nan_inf_contract("cross_entropy")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize(
    ("label_smoothing", "softcap"), [(0.0, None), (0.1, None), (0.1, 30.0)], ids=["plain", "smooth", "smooth_capped"]
)
def test_nan_inf(backend, vocab, dtype, label_smoothing, softcap):
    """Per-row losses (reduction "none", so a row's NaN can only show in its own loss) and d/dlogits; the loss-only
    kernel (no gradient wanted) too; "mean" over the same rows."""
    rows, target, names = _ce_cases(vocab)
    z = rows.to(dtype).to(backend.device)
    target = target.to(backend.device)
    kw = dict(ignore_index=IGNORE, label_smoothing=label_smoothing, softcap=softcap)
    clean = [names.index(n) for n in ("clean", "clean_last", "clean_end", "ignored_clean")]
    tag = f"cross_entropy vocab {vocab} ls {label_smoothing} softcap {softcap}"
    # loss only (want_grad = 0)
    loss_only = tmf.cross_entropy(z, target, reduction="none", **kw)
    dloss = randn(target.shape, torch.float32, backend.device, seed=5).abs().to(dtype) + 0.5
    loss64, dz64 = _ce_reference(z, target, label_smoothing, softcap or 0.0, "none", dloss)
    check_rows(loss_only.unsqueeze(-1), loss64.unsqueeze(-1), dtype, f"{tag} loss (no grad)", clean)
    # with the gradient
    zg = z.detach().clone().requires_grad_(True)
    loss = tmf.cross_entropy(zg, target, reduction="none", **kw)
    (dz,) = torch.autograd.grad(loss, zg, dloss)
    check_rows(loss.unsqueeze(-1), loss64.unsqueeze(-1), dtype, f"{tag} loss", clean)
    check_rows(dz, dz64, dtype, f"{tag} dlogits", clean)
    for name in ("ignored_nan", "ignored_inf"):
        i = names.index(name)
        assert loss[i] == 0 and loss_only[i] == 0 and (dz[i] == 0).all(), f"{tag}: {name} must give 0 and no gradient"
    # reduction "mean": NaN (a valid row holds one), and the gradient rows as above, scaled
    zm = z.detach().clone().requires_grad_(True)
    mean = tmf.cross_entropy(zm, target, reduction="mean", **kw)
    (dzm,) = torch.autograd.grad(mean, zm)
    mean64, dzm64 = _ce_reference(z, target, label_smoothing, softcap or 0.0, "mean", torch.tensor(1.0))
    assert_matches(mean.reshape(1), mean64.reshape(1), dtype, f"{tag} mean")
    check_rows(dzm, dzm64, dtype, f"{tag} mean dlogits", clean)


@pytest.mark.parametrize("vocab", VOCABS)
def test_nan_inf_issue_31_repro(backend, vocab):
    """The issue's report: the Metal kernel returned a finite loss for a row with a NaN logit at vocab 8, 33 and 300
    (NaN only at 5000), while the gradient row was NaN."""
    torch.manual_seed(0)
    z = torch.randn(1, vocab).to(backend.device)
    z[0, vocab // 2] = NAN
    loss = tmf.cross_entropy(z, torch.tensor([0], device=backend.device))
    assert torch.isnan(loss), f"vocab {vocab}: loss {loss.item()} for a row with a NaN logit"
    zg = z.clone().requires_grad_(True)
    tmf.cross_entropy(zg, torch.tensor([0], device=backend.device)).backward()
    assert torch.isnan(zg.grad).all()


def test_nan_inf_issue_31_repro_verbatim(backend):
    z = torch.randn(1, 33).to(backend.device)
    z[0, 16] = float("nan")
    assert torch.isnan(tmf.cross_entropy(z, torch.tensor([0], device=backend.device)))  # must be NaN


@nan_inf_contract("linear_cross_entropy")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [33, 5000])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_inf_linear_cross_entropy(backend, vocab, dtype, reduction):
    """NaN and ±inf in hidden rows (valid and ignored), then NaN in one weight row (that vocabulary entry's logit
    is NaN in every row), then NaN in the bias; loss, dhidden, dweight and dbias against float64 (logits = hidden·Wᵀ
    + bias, torch's cross-entropy, ignored rows' dlogits 0, then the chain rule's GEMMs). Chunks of 4 rows:
    placements fall in several chunks."""
    hidden_size = 16
    names = ["clean", "nan_first", "nan_last", "pos_inf", "neg_inf", "ignored_nan", "ignored_clean", "clean_last"]
    hidden = randn((len(names), hidden_size), dtype, backend.device, seed=1)
    hidden[names.index("nan_first"), 0] = NAN
    hidden[names.index("nan_last"), hidden_size - 1] = NAN
    hidden[names.index("pos_inf"), 3] = INF
    hidden[names.index("neg_inf"), 5] = -INF
    hidden[names.index("ignored_nan"), 7] = NAN
    target = torch.tensor([IGNORE if n.startswith("ignored") else (3 * i) % vocab for i, n in enumerate(names)])
    weight = randn((vocab, hidden_size), dtype, backend.device, scale=hidden_size**-0.5, seed=2)
    weight_nan = weight.clone()
    weight_nan[vocab // 2, 1] = NAN
    bias_nan = randn((vocab,), dtype, backend.device, seed=3)
    bias_nan[vocab - 1] = NAN
    clean = [names.index(n) for n in ("clean", "ignored_clean", "clean_last")]
    calls = [
        (hidden, weight, None, "hidden placements", clean),
        (hidden.nan_to_num(0.0, 0.0, 0.0), weight_nan, None, "weight row NaN", []),
        (hidden.nan_to_num(0.0, 0.0, 0.0), weight, bias_nan, "bias NaN", []),
    ]
    for h_in, w_in, b_in, what, clean_rows in calls:
        leaves = [t.detach().clone().requires_grad_(True) for t in (h_in, w_in, b_in) if t is not None]
        h, wg, bias = leaves[0], leaves[1], leaves[2] if b_in is not None else None
        t = target.to(backend.device)
        loss = tmf.linear_cross_entropy(h, wg, t, bias, ignore_index=IGNORE, reduction=reduction, chunk_size=4)
        dloss = torch.ones(()) if reduction == "mean" else torch.linspace(0.5, 1.5, len(names))
        grads = torch.autograd.grad(loss, leaves, dloss.to(dtype).to(backend.device))
        h64, w64 = h.detach().double().cpu(), wg.detach().double().cpu()
        logits64 = h64 @ w64.t()
        if bias is not None:
            logits64 = logits64 + bias.detach().double().cpu()
        logits64.requires_grad_(True)
        loss64 = F.cross_entropy(logits64, target, ignore_index=IGNORE, reduction=reduction)
        (dlogits64,) = torch.autograd.grad(loss64, logits64, dloss.double())
        dlogits64[target == IGNORE] = 0.0
        tag = f"linear_cross_entropy vocab {vocab} {reduction}, {what}"
        if reduction == "none":
            check_rows(loss.unsqueeze(-1), loss64.detach().unsqueeze(-1), dtype, f"{tag} loss", clean_rows)
        else:
            assert_matches(loss.reshape(1), loss64.detach().reshape(1), dtype, f"{tag} loss")
        check_rows(grads[0], dlogits64 @ w64, dtype, f"{tag} dhidden", clean_rows)
        assert_matches(grads[1], dlogits64.t() @ h64, dtype, f"{tag} dweight")
        if bias is not None:
            assert_matches(grads[2], dlogits64.sum(0), dtype, f"{tag} dbias")
        if clean_rows:
            assert (grads[0][names.index("ignored_nan")] == 0).all(), f"{tag}: an ignored row's dhidden must be 0"
