"""NaN and ±inf at every kernel variant of every public op, forward and backward, against torch's unfused float64
composition (issue 31): the NaN and ±inf positions of every output and every gradient equal torch's, finite values
match within the contract's tolerance, and a row's NaN never reaches another row. Each test puts one placement per
row (NaN at the first, middle and last column, at the row's maximum, among -inf, ±inf, ...) into one tensor with
clean rows before and after, so one call covers them all.

Kernels must not rely on a max carrying a NaN: Metal's fmax/fmin (and the harness's max, min, simd_max, simd_min:
tests/test_emulator_semantics.py) drop it, so a NaN reaches a row's statistics through its sums only. The bug this
file was written for: a cross-entropy (and looped softmax) thread whose elements were all NaN or -inf kept m = -inf
and threw its NaN sum away, so the loss of a row holding a NaN logit came out finite.

Decided semantics where torch's own result is an artifact: an ignored cross-entropy row (target == ignore_index)
has loss 0 and a zero gradient even when it holds NaN (torch's log_softmax backward gives it 0·NaN = NaN, which would
poison linear_cross_entropy's dweight through rows nobody trains on)."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import DTYPES, PUBLIC_OPS, randn

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches

F = torch.nn.functional
NAN, INF = float("nan"), float("inf")
# A width per variant of the row kernels (tmf::launch::plan_rows: simd_rows <= 256, single_row <= 8192): 1023 gives a
# tail thread with 7 of its 8 elements.
WIDTHS = {"simd_rows": 200, "single_row": 1023, "looped": 9000}
# Cross-entropy has one kernel (looped) whose thread count follows the vocabulary: 32, 64 and 320 threads hold at most
# one logit each (8, 33, 300), 1024 threads hold ~5 (5000).
VOCABS = (8, 33, 300, 5000)

COVERED: set[str] = set()


def covers(*ops):
    """Marks a test as the NaN/inf contract of `ops` (test_every_public_op_is_covered checks the union)."""

    def mark(fn):
        COVERED.update(ops)
        return fn

    return mark


def _row_cases(cols: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """One float64 row per placement, clean rows first and last."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(cols, generator=g, dtype=torch.float64)  # noqa: E731

    def put(row, *pairs):
        for col, value in pairs:
            row[col] = value
        return row

    at_max = r()
    at_max[int(at_max.argmax())] = NAN
    among_neg_inf = torch.full((cols,), -INF, dtype=torch.float64)
    among_neg_inf[0] = 0.5  # one finite logit: every other thread holds only -inf, and one of them the NaN
    among_neg_inf[cols // 2] = NAN
    one_finite = torch.full((cols,), -INF, dtype=torch.float64)
    one_finite[cols // 3] = 1.5
    return [
        ("clean", r()),
        ("nan_first", put(r(), (0, NAN))),
        ("nan_middle", put(r(), (cols // 2, NAN))),
        ("nan_last", put(r(), (cols - 1, NAN))),
        ("nan_at_max", at_max),
        ("nan_among_neg_inf", among_neg_inf),
        ("all_nan", torch.full((cols,), NAN, dtype=torch.float64)),
        ("pos_inf", put(r(), (cols // 3, INF))),
        ("neg_inf", put(r(), (cols // 3, -INF))),
        ("pos_and_neg_inf", put(r(), (1, INF), (cols - 2, -INF))),
        ("neg_inf_but_one", one_finite),
        ("all_neg_inf", torch.full((cols,), -INF, dtype=torch.float64)),
        ("clean_last", r()),
    ]


def _random_row(cols: int, seed: int) -> torch.Tensor:
    return torch.randn(cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_rows(out, ref, dtype, what, clean, baseline=None):
    """out against ref everywhere (NaN/inf masks equal, finite values within tolerance), and again on the clean rows
    alone (so a small leak into a clean row is not diluted by the other rows' norm)."""
    assert_matches(out, ref, dtype, what, baseline=baseline)
    if clean:
        rows = torch.tensor(clean)
        assert_matches(out.detach().cpu()[rows], ref.detach().cpu()[rows], dtype, f"{what} (clean rows)")


def _grad_with_nan(shape, dtype, device, rows_with_nan, seed):
    """An incoming gradient with a NaN in the middle of each of `rows_with_nan`."""
    dy = randn(shape, dtype, device, seed=seed)
    for row in rows_with_nan:
        dy[row, shape[-1] // 2] = NAN
    return dy


# ---- softmax ----------------------------------------------------------------------------------------------------
@covers("softmax")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(WIDTHS))
def test_softmax(backend, variant, dtype):
    """Every row placement, plus a clean row whose incoming gradient holds a NaN (its dx row is NaN, as torch's)."""
    cols = WIDTHS[variant]
    cases = _row_cases(cols, seed=cols) + [("dy_nan", _random_row(cols, seed=99))]
    names = [n for n, _ in cases]
    x = torch.stack([row for _, row in cases]).to(dtype).to(backend.device).requires_grad_(True)
    y = tmf.softmax(x, -1)
    dy = _grad_with_nan(y.shape, dtype, backend.device, [names.index("dy_nan")], seed=1)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().cpu().requires_grad_(True)
    y64 = torch.softmax(x64, -1)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double().cpu())
    clean = [names.index("clean"), names.index("clean_last")]
    _check_rows(y, y64, dtype, f"softmax {variant} forward", clean)
    _check_rows(dx, dx64, dtype, f"softmax {variant} dx", clean)
    assert torch.isnan(y[names.index("nan_among_neg_inf")]).all(), "a NaN among -inf must make the row NaN"


# ---- RMSNorm ----------------------------------------------------------------------------------------------------
def _rms_norm64(x, w, eps, offset=0.0):
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y * (w + offset) if w is not None else y


def _weight_with(cols, dtype, device, placements):
    w = randn((cols,), dtype, device, seed=2) + 1.0
    for col, value in placements:
        w[col] = value
    return w


@covers("rms_norm")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(WIDTHS))
@pytest.mark.parametrize("mode", ["dx_dw", "dx", "dw", "noweight"])
def test_rms_norm(backend, variant, dtype, mode):
    """Two calls per kernel (dx/dw/dx+dw backward, no-weight forward): NaN/±inf placements in x with a finite weight
    (dw: a NaN row poisons every column, as torch's), then NaN and ±inf in the weight with finite x (forward: those
    columns of every row; dx: every row, through the row's dot product; dw: finite)."""
    cols = WIDTHS[variant]
    eps = 1e-5
    cases = _row_cases(cols, seed=cols + 1) + [("dy_nan", _random_row(cols, seed=99))]
    names = [n for n, _ in cases]
    x_placed = torch.stack([row for _, row in cases]).to(dtype).to(backend.device)
    x_clean = randn((4, cols), dtype, backend.device, seed=5)
    w_finite = _weight_with(cols, dtype, backend.device, [])
    w_placed = _weight_with(cols, dtype, backend.device, [(0, NAN), (cols // 2, INF), (cols - 1, -INF)])
    calls = [(x_placed, w_finite, "x placements", [names.index("clean"), names.index("clean_last")])]
    if mode != "noweight":
        calls.append((x_clean, w_placed, "weight placements", []))
    for x_in, w_in, what, clean in calls:
        dy_nan_rows = [names.index("dy_nan")] if clean else []
        w = None if mode == "noweight" else w_in.detach().clone().requires_grad_(mode != "dx")
        x = x_in.detach().clone().requires_grad_(mode != "dw")
        leaves = [t for t in (x, w) if t is not None and t.requires_grad]
        y = tmf.rms_norm(x, w, eps)
        dy = _grad_with_nan(y.shape, dtype, backend.device, dy_nan_rows, seed=3)
        grads = torch.autograd.grad(y, leaves, dy)
        x64 = x.detach().double().cpu().requires_grad_(x.requires_grad)
        w64 = w.detach().double().cpu().requires_grad_(w.requires_grad) if w is not None else None
        y64 = _rms_norm64(x64, w64, eps)
        refs = torch.autograd.grad(y64, [t for t in (x64, w64) if t is not None and t.requires_grad], dy.double().cpu())
        _check_rows(y, y64, dtype, f"rms_norm {variant} {mode} forward, {what}", clean)
        grad_names = [n for n, t in (("dx", x), ("dw", w)) if t is not None and t.requires_grad]
        for g, ref, name in zip(grads, refs, grad_names):
            _check_rows(g, ref, dtype, f"rms_norm {variant} {mode} {name}, {what}", clean if name == "dx" else [])


@covers("add_rms_norm")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(WIDTHS))
@pytest.mark.parametrize("frozen_weight", [False, True], ids=["dx_dw", "dx"])
def test_add_rms_norm(backend, variant, dtype, frozen_weight):
    """NaN/±inf placements in x (one per row), NaN and ±inf in the residual (other rows, and +inf + -inf = NaN in
    h), then NaN and ±inf in the weight; outputs y and h, gradients of x, residual and weight against float64
    autograd through h as the dtype rounds it."""
    cols = WIDTHS[variant]
    eps = 1e-6
    cases = _row_cases(cols, seed=cols + 2)
    names = [n for n, _ in cases]
    x_placed = torch.stack([row for _, row in cases]).to(dtype).to(backend.device)
    res_placed = randn(x_placed.shape, dtype, backend.device, seed=4)
    res_placed[names.index("nan_first"), cols - 1] = NAN  # a second NaN in that row, from the residual
    res_placed[names.index("pos_inf"), cols // 3] = -INF  # +inf + -inf: NaN in h
    res_placed[names.index("neg_inf"), 0] = INF
    w_placed = _weight_with(cols, dtype, backend.device, [(0, NAN), (cols // 2, INF), (cols - 1, -INF)])
    clean = [names.index("clean"), names.index("clean_last")]
    calls = [
        (x_placed, res_placed, _weight_with(cols, dtype, backend.device, []), "x/residual placements", clean),
        (randn((3, cols), dtype, backend.device, seed=6), randn((3, cols), dtype, backend.device, seed=7), w_placed,
         "weight placements", []),
    ]  # fmt: skip
    for x_in, res_in, w_in, what, clean_rows in calls:
        x, res = x_in.detach().clone().requires_grad_(True), res_in.detach().clone().requires_grad_(True)
        w = w_in.detach().clone().requires_grad_(not frozen_weight)
        y, h = tmf.add_rms_norm(x, res, w, eps)
        dy, dh = randn(y.shape, dtype, x.device, seed=8), randn(h.shape, dtype, x.device, seed=9)
        wanted = (x, res) if frozen_weight else (x, res, w)
        grads = torch.autograd.grad((y, h), wanted, (dy, dh))
        h64 = (x.detach() + res.detach()).double().cpu().requires_grad_(True)  # rounded as the dtype's add rounds
        w64 = w.detach().double().cpu().requires_grad_(True)
        y64 = _rms_norm64(h64, w64, eps)
        dh64, dw64 = torch.autograd.grad((y64, h64), (h64, w64), (dy.double().cpu(), dh.double().cpu()))
        tag = f"add_rms_norm {variant} {'frozen' if frozen_weight else 'dx_dw'}, {what}"
        _check_rows(h, h64, dtype, f"{tag} h", clean_rows)
        _check_rows(y, y64, dtype, f"{tag} y", clean_rows)
        _check_rows(grads[0], dh64, dtype, f"{tag} dx", clean_rows)
        _check_rows(grads[1], dh64, dtype, f"{tag} dresidual", clean_rows)
        if not frozen_weight:
            assert_matches(grads[2], dw64, dtype, f"{tag} dw")


# ---- cross-entropy ----------------------------------------------------------------------------------------------
IGNORE = -100


def _ce_cases(vocab: int):
    """(logits rows, targets, names): the row placements, plus NaN/±inf at the target column and ignored rows."""
    cases = _row_cases(vocab, seed=vocab + 3)
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


@covers("cross_entropy")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize(
    ("label_smoothing", "softcap"), [(0.0, None), (0.1, None), (0.1, 30.0)], ids=["plain", "smooth", "smooth_capped"]
)
def test_cross_entropy(backend, vocab, dtype, label_smoothing, softcap):
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
    _check_rows(loss_only.unsqueeze(-1), loss64.unsqueeze(-1), dtype, f"{tag} loss (no grad)", clean)
    # with the gradient
    zg = z.detach().clone().requires_grad_(True)
    loss = tmf.cross_entropy(zg, target, reduction="none", **kw)
    (dz,) = torch.autograd.grad(loss, zg, dloss)
    _check_rows(loss.unsqueeze(-1), loss64.unsqueeze(-1), dtype, f"{tag} loss", clean)
    _check_rows(dz, dz64, dtype, f"{tag} dlogits", clean)
    for name in ("ignored_nan", "ignored_inf"):
        i = names.index(name)
        assert loss[i] == 0 and loss_only[i] == 0 and (dz[i] == 0).all(), f"{tag}: {name} must give 0 and no gradient"
    # reduction "mean": NaN (a valid row holds one), and the gradient rows as above, scaled
    zm = z.detach().clone().requires_grad_(True)
    mean = tmf.cross_entropy(zm, target, reduction="mean", **kw)
    (dzm,) = torch.autograd.grad(mean, zm)
    mean64, dzm64 = _ce_reference(z, target, label_smoothing, softcap or 0.0, "mean", torch.tensor(1.0))
    assert_matches(mean.reshape(1), mean64.reshape(1), dtype, f"{tag} mean")
    _check_rows(dzm, dzm64, dtype, f"{tag} mean dlogits", clean)


@pytest.mark.parametrize("vocab", VOCABS)
def test_issue_31_repro(backend, vocab):
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


def test_issue_31_repro_verbatim(backend):
    z = torch.randn(1, 33).to(backend.device)
    z[0, 16] = float("nan")
    assert torch.isnan(tmf.cross_entropy(z, torch.tensor([0], device=backend.device)))  # must be NaN


@covers("linear_cross_entropy")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [33, 5000])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(backend, vocab, dtype, reduction):
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
            _check_rows(loss.unsqueeze(-1), loss64.detach().unsqueeze(-1), dtype, f"{tag} loss", clean_rows)
        else:
            assert_matches(loss.reshape(1), loss64.detach().reshape(1), dtype, f"{tag} loss")
        _check_rows(grads[0], dlogits64 @ w64, dtype, f"{tag} dhidden", clean_rows)
        assert_matches(grads[1], dlogits64.t() @ h64, dtype, f"{tag} dweight")
        if bias is not None:
            assert_matches(grads[2], dlogits64.sum(0), dtype, f"{tag} dbias")
        if clean_rows:
            assert (grads[0][names.index("ignored_nan")] == 0).all(), f"{tag}: an ignored row's dhidden must be 0"


# ---- GLU --------------------------------------------------------------------------------------------------------
TORCH_ACT = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


@covers("glu", "swiglu", "geglu")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("entry", ["swiglu", "geglu", "glu_silu", "glu_gelu_tanh"])
def test_glu(backend, entry, dtype):
    """NaN/±inf in gate, up and the incoming gradient at the first, middle and last element of rows 1027 wide
    (strided rows: launched per row, the last thread's chunk partial) and of a flat contiguous tensor."""
    activation = {"swiglu": "silu", "geglu": "gelu_tanh"}.get(entry, entry[4:])
    fn = {"swiglu": tmf.swiglu, "geglu": tmf.geglu}.get(entry, lambda g, u: tmf.glu(g, u, activation))
    cols = 1027
    rows = 6
    for layout in ("strided_rows", "contiguous"):
        base_g = randn((rows, cols + 5), dtype, backend.device, scale=3.0)
        base_u = randn((rows, cols + 5), dtype, backend.device, seed=1)
        gate = base_g[:, 2 : 2 + cols] if layout == "strided_rows" else base_g[:, :cols].contiguous()
        up = base_u[:, 2 : 2 + cols] if layout == "strided_rows" else base_u[:, :cols].contiguous()
        for (row, col), value in {(1, 0): NAN, (1, cols // 2): INF, (1, cols - 1): -INF, (3, 5): 1e30}.items():
            gate[row, col] = value
        for (row, col), value in {(2, 0): INF, (2, cols // 2): NAN, (2, cols - 1): -INF, (1, cols // 2): 0.0}.items():
            up[row, col] = value
        gate, up = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
        out = fn(gate, up)
        dout = randn(out.shape, dtype, backend.device, seed=2)
        dout[4, 0], dout[4, cols - 1], dout[3, cols // 2] = NAN, INF, -INF
        dgate, dup = torch.autograd.grad(out, (gate, up), dout)
        g64 = gate.detach().double().cpu().requires_grad_(True)
        u64 = up.detach().double().cpu().requires_grad_(True)
        out64 = TORCH_ACT[activation](g64) * u64
        dgate64, dup64 = torch.autograd.grad(out64, (g64, u64), dout.double().cpu())
        tag = f"{entry} {layout}"
        _check_rows(out, out64, dtype, f"{tag} forward", [0, 5])
        _check_rows(dgate, dgate64, dtype, f"{tag} dgate", [0, 5])
        _check_rows(dup, dup64, dtype, f"{tag} dup", [0, 5])


# ---- RoPE -------------------------------------------------------------------------------------------------------
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


@covers("rope")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("head_dim", "rotary_dim", "interleaved"),
    [(16, 16, False), (10, 6, True)],
    ids=["rotate_half", "partial_interleaved"],
)
def test_rope(backend, dtype, head_dim, rotary_dim, interleaved):
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


# ---- LoRA linear ------------------------------------------------------------------------------------------------
def _lora64(x, w, a, b, scale, bias, mask):
    xl = x if mask is None else x * mask
    y = x @ w.t() + scale * (xl @ a.t()) @ b.t()
    return y + bias if bias is not None else y


@covers("lora_linear")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("rank", "dropout"), [(4, 0.0), (72, 0.0), (8, 0.25)], ids=["rank4", "rank72_two_blocks", "rank8_dropout"]
)
def test_lora_linear(backend, dtype, rank, dropout):
    """Low-rank kernels (reduce, expand; one or two rank blocks; dropout mask): NaN/±inf placements in x (one token
    row each), then NaN in the base weight, in lora_a, in lora_b and in the bias, each its own call; y and every
    gradient (x, weight, lora_a, lora_b, bias) against float64 autograd of the unfused composition."""
    tokens, fin, fout, scale = 40, 24, 20, 2.0
    x_placed = randn((tokens, fin), dtype, backend.device)  # tokens 5, 13, 21: NaN; 29: +inf; 35: -inf
    for row, (col, value) in zip((5, 13, 21, 29, 35), ((0, NAN), (fin // 2, NAN), (fin - 1, NAN), (3, INF), (7, -INF))):
        x_placed[row, col] = value
    clean = [t for t in range(tokens) if t not in (5, 13, 21, 29, 35)]
    w = randn((fout, fin), dtype, backend.device, scale=fin**-0.5, seed=1)
    a = randn((rank, fin), dtype, backend.device, scale=fin**-0.5, seed=2)
    b = randn((fout, rank), dtype, backend.device, scale=rank**-0.5, seed=3)
    bias = randn((fout,), dtype, backend.device, seed=4)
    x_clean = randn((tokens, fin), dtype, backend.device, seed=5)

    def poisoned(t, index):
        t = t.clone()
        t[index] = NAN
        return t

    calls = [
        ("x placements", x_placed, w, a, b, bias, clean),
        ("weight NaN", x_clean, poisoned(w, (3, 4)), a, b, bias, []),
        ("lora_a NaN", x_clean, w, poisoned(a, (rank - 1, 5)), b, bias, []),
        ("lora_b NaN", x_clean, w, a, poisoned(b, (6, rank // 2)), bias, []),
        ("bias NaN", x_clean, w, a, b, poisoned(bias, (2,)), []),
    ]
    for what, *inputs, clean_rows in calls:
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        xl, wl, al, bl, biasl = leaves
        torch.manual_seed(11)
        y = tmf.lora_linear(xl, wl, al, bl, scale, biasl, dropout_p=dropout, training=dropout > 0)
        dy = randn(y.shape, dtype, backend.device, seed=6)
        grads = torch.autograd.grad(y, leaves, dy)
        mask = None
        if dropout > 0:
            torch.manual_seed(11)  # the op draws its mask like this, on a tensor like x (tmf/ops/lora_linear.py)
            mask = torch.empty_like(xl).bernoulli_(1.0 - dropout).div_(1.0 - dropout).double().cpu()
        leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
        y64 = _lora64(*leaves64[:4], scale, leaves64[4], mask)
        refs = torch.autograd.grad(y64, leaves64, dy.double().cpu())
        tag = f"lora_linear rank {rank} dropout {dropout}, {what}"
        _check_rows(y, y64, dtype, f"{tag} y", clean_rows)
        for name, g, ref in zip(("dx", "dweight", "dlora_a", "dlora_b", "dbias"), grads, refs):
            _check_rows(g, ref, dtype, f"{tag} {name}", clean_rows if name == "dx" else [])


@covers("lora_linear")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear_merged_weight_route(backend, dtype):
    """The merged-weight route (tokens >= 1024, more than in_features, no dropout: y = x·(W + s·B·A)ᵀ on the native
    matmul): NaN in x, W, A and B gives torch's NaN positions (±inf need not: inf·W + inf·(s·B·A) may be NaN where
    inf·(W + s·B·A) is not, a route-level difference from the unfused composition)."""
    tokens, fin, fout, rank, scale = 1100, 24, 20, 4, 2.0
    x = randn((tokens, fin), dtype, backend.device)
    x[7, 3], x[700, fin - 1] = NAN, NAN
    w = randn((fout, fin), dtype, backend.device, scale=fin**-0.5, seed=1)
    a = randn((rank, fin), dtype, backend.device, scale=fin**-0.5, seed=2)
    b = randn((fout, rank), dtype, backend.device, scale=rank**-0.5, seed=3)
    w[2, 5], a[1, 9], b[11, 0] = NAN, NAN, NAN
    for what, inputs in (
        ("x and W", (x, w, a.nan_to_num(), b.nan_to_num())),
        ("A and B", (x.nan_to_num(), w.nan_to_num(), a, b)),
    ):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        y = tmf.lora_linear(*leaves, scale)
        dy = randn(y.shape, dtype, backend.device, seed=6)
        grads = torch.autograd.grad(y, leaves, dy)
        leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
        y64 = _lora64(*leaves64, scale, None, None)
        refs = torch.autograd.grad(y64, leaves64, dy.double().cpu())
        assert_matches(y, y64, dtype, f"lora_linear merged, NaN in {what}: y")
        for name, g, ref in zip(("dx", "dweight", "dlora_a", "dlora_b"), grads, refs):
            assert_matches(g, ref, dtype, f"lora_linear merged, NaN in {what}: {name}")


# ---- attention ----------------------------------------------------------------------------------------------------
def _attention_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B·H·S, D): one row per (batch, head, position), as _check_rows takes them."""
    return t.detach().cpu().flatten(0, 2)


@covers("attention")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention(backend, dtype):
    """Two calls, against the float64 formula of tests/test_attention.py (attention64). (1) NaN/±inf placements in
    the query rows of head 0 (no mask, so every key is visible to them and the formula is well defined), a NaN in
    the incoming gradient of a head-1 row: those output rows (and dq rows) are NaN, every other row exact; the kv
    head they read gets NaN dk/dv, the other kv head (query heads 2, 3) stays exact. (2) Causal, with an additive
    mask holding -inf (a key dropped; a row with no key: zeros; a row with one key), +inf and NaN at visible keys
    (that row NaN, and dk/dv of the keys it sees) and NaN and +inf at causally invisible keys (dropped: the row
    stays exact)."""
    from test_attention import attention64

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
        _check_rows(_attention_rows(out), _attention_rows(out64), dtype, f"{tag} out", clean_out_rows)
        _check_rows(_attention_rows(grads[0]), _attention_rows(refs[0]), dtype, f"{tag} dq", clean_dq_rows)
        for name, g, ref in zip(("dk", "dv"), grads[1:], refs[1:]):
            _check_rows(_attention_rows(g), _attention_rows(ref), dtype, f"{tag} {name}", clean_kv_rows)
    assert torch.isnan(out[0, :, 6:8]).all() and (out[0, :, 4] == 0).all()


# ---- the contract covers every op -------------------------------------------------------------------------------
def test_every_public_op_is_covered():
    """This file covers exactly PUBLIC_OPS, and every op torch_metal_fused exports is in PUBLIC_OPS: a new op cannot
    skip the NaN/inf contract."""
    assert COVERED == set(PUBLIC_OPS), f"covered here {sorted(COVERED)}, PUBLIC_OPS {sorted(PUBLIC_OPS)}"
    exported_ops = {
        name
        for name in tmf.__all__
        if inspect.isfunction(getattr(tmf, name)) and getattr(tmf, name).__module__.startswith("torch_metal_fused.ops")
    }
    assert exported_ops, "no op found in torch_metal_fused.__all__"
    assert exported_ops <= set(PUBLIC_OPS), (
        f"exported ops missing from PUBLIC_OPS: {sorted(exported_ops - set(PUBLIC_OPS))}"
    )
