"""Every Metal kernel runs through the harness, with the launch geometry the MPS dispatch uses; device traffic
and dispatches per op call, as counted by the harness, against the minimum."""

import math
import re

import pytest
import torch
from helpers import CONTRACT_FILES, DTYPES, contract_module, randn

import torch_metal_fused as tmf
from torch_metal_fused.backends import metal
from torch_metal_fused.emulator import runner
from torch_metal_fused.testing import assert_matches

pytestmark = pytest.mark.emulated


@pytest.fixture(autouse=True)
def _emulated(monkeypatch):
    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "metal-emulated")


def _size(dtype):
    return torch.finfo(dtype).bits // 8


def _record(fn):
    with runner.record() as rec:
        fn()
    return rec


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [1, 7, 31, 32, 33, 256, 257, 1000, 4096])
def test_forward_traffic_within_10_percent_of_minimum(dtype, cols):
    rows = 64
    es = _size(dtype)
    x = randn((rows, cols), dtype, "cpu")
    w = randn((cols,), dtype, "cpu", seed=1)
    (d,) = _record(lambda: tmf.softmax(x))
    minimum = 2 * rows * cols * es
    assert d.bytes_read + d.bytes_written <= 1.10 * minimum, (d.kernel, d.traffic, minimum)
    assert d.traffic[1] == (0, rows * cols * es)  # y written exactly once
    (d,) = _record(lambda: tmf.rms_norm(x, w))
    minimum = 2 * rows * cols * es + cols * es + rows * 4
    assert d.bytes_read + d.bytes_written <= 1.10 * minimum, (d.kernel, d.traffic, minimum)
    assert d.traffic[3] == (0, rows * 4)  # rstd: one float per row


@pytest.mark.parametrize("cols", [8193, 10000])
def test_looped_forward_traffic_is_documented(cols):
    """Rows too long for registers: the looped variants read x twice (documented in the shaders)."""
    rows, es = 4, 4
    x = randn((rows, cols), torch.float32, "cpu")
    (d,) = _record(lambda: tmf.softmax(x))
    assert d.kernel.startswith("softmax_forward_looped")
    assert d.traffic[0] == (2 * rows * cols * es, 0) and d.traffic[1] == (0, rows * cols * es)
    (d,) = _record(lambda: tmf.rms_norm(x, None))
    assert d.traffic[0] == (2 * rows * cols * es, 0)


# ---- the traffic targets (docs/metal-on-cpu.md#traffic): harness counts against the minimum, every dtype ------
def _moved(rec) -> int:
    return sum(d.bytes_read + d.bytes_written for d in rec)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [300, 1024, 4096, 8192])
def test_softmax_rows_up_to_8192_move_exactly_the_minimum(dtype, cols):
    """Register-resident up to 8192 wide: x read once and y written once; backward y, dy read once, dx written."""
    from torch_metal_fused.ops.softmax import softmax_backward

    rows, es = 64, _size(dtype)
    x, dy = randn((rows, cols), dtype, "cpu"), randn((rows, cols), dtype, "cpu", seed=1)
    (f,) = _record(lambda: tmf.softmax(x))
    y = tmf.softmax(x)
    (b,) = _record(lambda: softmax_backward(y, dy))
    assert "single_row" in f.kernel and "single_row" in b.kernel
    assert _moved([f]) == 2 * rows * cols * es and _moved([b]) == 3 * rows * cols * es


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [8193, 32000])
def test_softmax_vocab_rows_within_the_documented_ratio(dtype, cols):
    """Longer rows (vocabulary-size) take the looped variants: forward reads x twice (1.5x the minimum), backward
    reads y and dy twice (5/3x)."""
    from torch_metal_fused.ops.softmax import softmax_backward

    rows, es = 3, _size(dtype)
    x, dy = randn((rows, cols), dtype, "cpu"), randn((rows, cols), dtype, "cpu", seed=1)
    (f,) = _record(lambda: tmf.softmax(x))
    y = tmf.softmax(x)
    (b,) = _record(lambda: softmax_backward(y, dy))
    assert _moved([f]) <= 1.5 * 2 * rows * cols * es and _moved([b]) <= 1.7 * 3 * rows * cols * es


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), [(1, 8192), (7, 300), (2000, 200), (128, 1024), (1024, 4096), (64, 8192)])
@pytest.mark.parametrize("cores", [metal.STAND_IN_GPU_CORES, 40])
def test_rms_norm_forward_within_3_percent_of_minimum(dtype, rows, cols, cores):
    """x read once, y written once, the weight once per row walker of >= 20 rows, rstd 4 B per row."""
    es = _size(dtype)
    x, w = randn((rows, cols), dtype, "cpu"), randn((cols,), dtype, "cpu", seed=1)
    with runner.gpu_cores(cores):
        (d,) = _record(lambda: tmf.rms_norm(x, w))
    minimum = (2 * rows * cols + cols) * es + rows * 4
    assert _moved([d]) <= 1.03 * minimum, (d.kernel, d.groups, d.traffic, minimum)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("rows", "cols", "limit"), [(4096, 1024, 1.10), (4096, 8192, 1.10), (1024, 4096, 1.25), (2048, 1024, 1.25)]
)
@pytest.mark.parametrize("cores", [metal.STAND_IN_GPU_CORES, 40])
def test_rms_norm_backward_traffic_targets(dtype, rows, cols, limit, cores):
    """dx and dw, both launches: x, dy read and dx written once; the float32 dw partial rows (4 per GPU core, at
    most one per 16 rows) and the weight per partial row are the excess — with the harness's stand-in core count
    and with a 40-core GPU's."""
    from torch_metal_fused.ops.rms_norm import rms_norm_backward, rms_norm_forward

    es = _size(dtype)
    x, dy = randn((rows, cols), dtype, "cpu"), randn((rows, cols), dtype, "cpu", seed=2)
    w = randn((cols,), dtype, "cpu", seed=1)
    with runner.gpu_cores(cores):
        _, rstd = rms_norm_forward(x, w, 1e-6, 0.0)
        rec = _record(lambda: rms_norm_backward(dy, x, w, rstd, True, True, 0.0))
    assert [d.kernel.rsplit("_", 1)[0] for d in rec] == [
        "rms_norm_backward_dx_dw_single_row",
        "rms_norm_backward_dw_reduce_columns",
    ]
    minimum = (3 * rows * cols + 2 * cols) * es + rows * 4
    assert _moved(rec) <= limit * minimum, (_moved(rec) / minimum, rec[0].groups)


def test_dispatches_per_op_call():
    x = randn((33, 300), torch.float32, "cpu").requires_grad_(True)
    w = randn((300,), torch.float32, "cpu").requires_grad_(True)
    rec = _record(lambda: tmf.softmax(x).sum().backward())
    assert [d.kernel for d in rec] == ["softmax_forward_single_row_float", "softmax_backward_single_row_float"]
    rec = _record(lambda: tmf.rms_norm(x, w).sum().backward())
    assert [d.kernel for d in rec] == [
        "rms_norm_forward_single_row_float",
        "rms_norm_backward_dx_dw_single_row_float",
        "rms_norm_backward_dw_reduce_columns_float",
    ]
    w.requires_grad_(False)  # frozen weight: no dw kernel at all
    rec = _record(lambda: tmf.rms_norm(x, w).sum().backward())
    assert [d.kernel for d in rec][1:] == ["rms_norm_backward_dx_single_row_float"]


# ---- LoRA: the host's launch plan (tmf/launch/lora_linear.h), mirrored to predict every buffer's count ---------
def _round_up(v, m):
    return -(-v // m) * m


def _lora_reduce_plan(tokens, rank, max_threads=1024):
    """(token rows per tile, threads) of the reduce dispatch: 16 rows per rank entry, at least 256, within the
    threads (one per token and rank block of 64) and the tokens (rounded up to a SIMD-group)."""
    blocks, cap = -(-rank // 64), min(1024, max_threads // 32 * 32)
    bm = min(max(256, 16 * rank), cap // blocks // 32 * 32, _round_up(max(tokens, 1), 32))
    return bm, bm * blocks


def _lora_expand_plans(tokens, out_dim, rank, max_threads=1024):
    """Per rank block of 64: (rank entries, column groups, token groups) of the expand dispatches: one thread per
    column (up to 1024 per group), 32 token rows per rank entry (at least 256) per group."""
    columns = min(1024, max_threads // 32 * 32, _round_up(max(out_dim, 1), 32))
    plans = []
    for j0 in range(0, rank, 64):
        nr = min(64, rank - j0)
        rows = min(max(tokens, 1), max(256, 32 * nr))
        plans.append((nr, -(-out_dim // columns), -(-tokens // rows)))
    return plans


def _lora_forward_counts(tokens, fin, fout, r, dropout, max_threads=1024):
    """Elements each buffer of the forward's dispatches moves: [(reduce: x, A, mask, h), (expand: h, B, -, y) ...]
    (one expand per rank block of 64)."""
    bm, _ = _lora_reduce_plan(tokens, r, max_threads)
    groups, blocks = -(-tokens // bm), -(-r // 64)  # x (and the mask) read once per rank block of 64
    reduce = {
        0: (blocks * tokens * fin, 0),
        1: (groups * r * fin, 0),
        2: (blocks * tokens * fin if dropout else 0, 0),
        3: (0, tokens * r),
    }
    expands = [
        {0: (cols * tokens * nr, 0), 1: (rows * fout * nr, 0), 2: (0, 0), 3: (tokens * fout, tokens * fout)}
        for nr, cols, rows in _lora_expand_plans(tokens, fout, r, max_threads)
    ]
    return [reduce, *expands]


def _lora_backward_counts(tokens, fin, fout, r, dropout, wants_dx, max_threads=1024):
    """[(reduce: dy, B, -, dh), (expand: dh, A, mask, dx) ...]; no expand for a frozen input."""
    bm, _ = _lora_reduce_plan(tokens, r, max_threads)
    groups, blocks = -(-tokens // bm), -(-r // 64)
    reduce = {0: (blocks * tokens * fout, 0), 1: (groups * fout * r, 0), 2: (0, 0), 3: (0, tokens * r)}
    expands = [
        {
            0: (cols * tokens * nr, 0),
            1: (rows * fin * nr, 0),
            2: (tokens * fin if dropout else 0, 0),
            3: (tokens * fin, tokens * fin),
        }
        for nr, cols, rows in _lora_expand_plans(tokens, fin, r, max_threads)
    ]
    return [reduce, *expands] if wants_dx else [reduce]


def _lora_minimum(tokens, fin, fout, r, dropout, forward=True, wants_dx=True):
    """Elements of the minimum: each input read once, each output written once (out read and written)."""
    if forward:
        return tokens * fin * (2 if dropout else 1) + r * (fin + fout) + 2 * tokens * fout + tokens * r
    if not wants_dx:
        return tokens * fout + r * fout + tokens * r
    return tokens * fout + r * (fin + fout) + tokens * fin * (3 if dropout else 2) + tokens * r


def _elements(counts):
    return sum(rd + wr for c in counts for rd, wr in c.values())


def _assert_counts(rec, counts, es):
    assert len(rec) == len(counts), [d.kernel for d in rec]
    for d, c in zip(rec, counts):
        assert {i: d.traffic.get(i, (0, 0)) for i in c} == {i: (rd * es, wr * es) for i, (rd, wr) in c.items()}, (
            d.kernel,
            d.groups,
        )
        assert set(d.traffic) <= set(c), d.traffic  # nothing else touched


def _lora_step(tokens, fin, fout, r, dtype, dropout, frozen_input=False, max_threads=1024):
    x = randn((tokens, fin), dtype, "cpu").requires_grad_(not frozen_input)
    w = randn((fout, fin), dtype, "cpu", scale=fin**-0.5, seed=1)
    a = randn((r, fin), dtype, "cpu", scale=fin**-0.5, seed=2).requires_grad_(True)
    b = randn((fout, r), dtype, "cpu", scale=r**-0.5, seed=3).requires_grad_(True)
    dy = randn((tokens, fout), dtype, "cpu", seed=4)
    torch.manual_seed(0)
    with runner.pipeline_max_threads(max_threads):
        with runner.record() as fwd:
            y = tmf.lora_linear(x, w, a, b, 2.0, dropout_p=0.1 if dropout else 0.0, training=True)
        with runner.record() as bwd:
            torch.autograd.grad(y, [t for t in (x, a, b) if t.requires_grad], dy)
    return [d for d in fwd if d.kernel.startswith("lora_")], [d for d in bwd if d.kernel.startswith("lora_")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("tokens", "fin", "fout", "r", "max_threads"),
    [
        (512, 256, 384, 8, 1024),  # two reduce tiles, two expand token groups
        (300, 200, 100, 16, 1024),
        (700, 64, 96, 4, 1024),
        (600, 72, 1100, 64, 256),  # capped pipeline: 256-row tiles, three of them; two expand column groups
        (130, 40, 56, 100, 1024),  # two rank blocks: 128 threads per token row pair, two expand dispatches
    ],
)
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_traffic_is_the_launch_plans(dtype, tokens, fin, fout, r, max_threads, dropout):
    """Every buffer of every LoRA dispatch, forward and backward, moves what the launch plan says: the input and mask
    once per rank block of 64, out (read and written) once per rank block, h/dh written once and read once per
    expand column group, A and B once per reduce tile or expand token group, and nothing else; the groups and
    threads are the plan's."""
    es = _size(dtype)
    fwd, bwd = _lora_step(tokens, fin, fout, r, dtype, dropout, max_threads=max_threads)
    suffix = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}[dtype]
    blocks = -(-r // 64)  # one expand dispatch per rank block of 64
    # Variants are named by their threadgroup array (tg<floats>; test_lora_linear.py drives each).
    assert [re.sub(r"_tg\d+_", "_", d.kernel) for d in fwd] == [
        f"lora_forward_h_{suffix}",
        *[f"lora_forward_y_{suffix}"] * blocks,
    ]
    assert [re.sub(r"_tg\d+_", "_", d.kernel) for d in bwd] == [
        f"lora_backward_dh_{suffix}",
        *[f"lora_backward_dx_{suffix}"] * blocks,
    ]
    bm, threads = _lora_reduce_plan(tokens, r, max_threads)
    assert fwd[0].groups == (-(-tokens // bm), 1, 1) and fwd[0].threads == (threads, 1, 1)
    for d, (_, cols, rows) in zip(fwd[1:], _lora_expand_plans(tokens, fout, r, max_threads)):
        assert d.groups == (cols, rows, 1) and d.threads[0] <= max_threads
    _assert_counts(fwd, _lora_forward_counts(tokens, fin, fout, r, dropout, max_threads), es)
    _assert_counts(bwd, _lora_backward_counts(tokens, fin, fout, r, dropout, True, max_threads), es)


def test_lora_frozen_input_computes_dh_only():
    """For a frozen input only dh = scale · dy·B is computed: one reduce dispatch, no A, no dx, no mask."""
    tokens, fin, fout, r = 260, 48, 88, 8
    _, bwd = _lora_step(tokens, fin, fout, r, torch.float32, True, frozen_input=True)
    assert [re.sub(r"_tg\d+_", "_", d.kernel) for d in bwd] == ["lora_backward_dh_float"]
    _assert_counts(bwd, _lora_backward_counts(tokens, fin, fout, r, True, False), 4)


# The issue #13 target: the low-rank kernels within 10 % of the minimum, forward and backward, at tokens >= 1024,
# rank <= 64, in/out 1024..8192. The plan's counts are exact (test above), so they are evaluated over the whole
# range here; the harness counts a row per rank at the smallest target shape, in every dtype, below.
TARGET_TOKENS = (1024, 1500, 2048, 4096, 8192, 16384, 65536)
TARGET_FEATURES = (1024, 2048, 4096, 5120, 8192)
TARGET_RANKS = (1, 4, 8, 16, 24, 32, 48, 64)


@pytest.mark.parametrize("r", TARGET_RANKS)
def test_lora_plans_within_10_percent_over_the_target_range(r):
    worst = 0.0
    for tokens in TARGET_TOKENS:
        for fin in TARGET_FEATURES:
            for fout in TARGET_FEATURES:
                for dropout in (False, True):
                    cases = [
                        (
                            _lora_forward_counts(tokens, fin, fout, r, dropout),
                            _lora_minimum(tokens, fin, fout, r, dropout),
                        ),
                        (
                            _lora_backward_counts(tokens, fin, fout, r, dropout, True),
                            _lora_minimum(tokens, fin, fout, r, dropout, forward=False),
                        ),
                        (
                            _lora_backward_counts(tokens, fin, fout, r, dropout, False),
                            _lora_minimum(tokens, fin, fout, r, dropout, forward=False, wants_dx=False),
                        ),
                    ]
                    for counts, minimum in cases:
                        ratio = _elements(counts) / minimum
                        assert ratio <= 1.10, (tokens, fin, fout, r, dropout, ratio)
                        worst = max(worst, ratio)
    assert worst > 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [32, 64])
def test_lora_rank_32_and_64_within_10_percent_of_minimum(dtype, r):
    """Counted at 1024 tokens, 1024 -> 1024 features with dropout (so the kernels, not the merged weight, serve
    it): forward, backward with dx, and backward for a frozen input, each <= 1.10x the minimum."""
    tokens, fin, fout, es = 1024, 1024, 1024, _size(dtype)
    fwd, bwd = _lora_step(tokens, fin, fout, r, dtype, True)
    assert _moved(fwd) <= 1.10 * es * _lora_minimum(tokens, fin, fout, r, True), _moved(fwd) / es
    assert _moved(bwd) <= 1.10 * es * _lora_minimum(tokens, fin, fout, r, True, forward=False), _moved(bwd) / es
    _assert_counts(fwd, _lora_forward_counts(tokens, fin, fout, r, True), es)
    _assert_counts(bwd, _lora_backward_counts(tokens, fin, fout, r, True, True), es)
    for d in fwd + bwd:  # the plans fill the threadgroup-memory budget at these tile sizes, never pass it
        assert 0 < d.threadgroup_memory <= min(32 * 1024, 64 * math.prod(d.threads)), (d.kernel, d.threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_looped_variants_when_the_pipeline_allows_fewer_threads(dtype):
    """A pipeline whose maxTotalThreadsPerThreadgroup is below ceil(cols/8) gets the looped kernels."""
    x = randn((5, 2000), dtype, "cpu").requires_grad_(True)
    w = randn((2000,), dtype, "cpu", seed=3).requires_grad_(True)
    with runner.pipeline_max_threads(128):
        rec = _record(lambda: torch.autograd.grad(tmf.rms_norm(tmf.softmax(x), w).square().sum(), (x, w)))
        grads = torch.autograd.grad(tmf.rms_norm(tmf.softmax(x), w).square().sum(), (x, w))
    assert {d.kernel.rsplit("_", 1)[0] for d in rec} >= {
        "softmax_forward_looped",
        "rms_norm_forward_looped",
        "rms_norm_backward_dx_dw_looped",
        "softmax_backward_looped",
    }
    assert all(d.threads[0] <= 128 for d in rec)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    s = torch.softmax(x64, -1)
    y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-6) * w64
    refs = torch.autograd.grad(y.square().sum(), (x64, w64))
    for g, ref in zip(grads, refs):
        assert_matches(g, ref, dtype)


def _drive_every_kernel():
    """Every op through every variant, dtype and mode: each op's contract file lists the calls that reach its kernels
    (every_kernel(dtype) in tests/test_<op>.py, found through the manifest). Every dispatch made."""
    rec = []
    for dtype in DTYPES:
        for contract in CONTRACT_FILES:
            for run in contract_module(contract).every_kernel(dtype):
                rec += _record(run)
    return rec


def test_every_registered_kernel_runs():
    """Drive every op through every variant, dtype and mode; every kernel the library holds must run."""
    ran = {d.kernel for d in _drive_every_kernel()}
    assert set(runner.kernel_names()) - ran == set()


def test_threadgroup_memory_within_16_kib_per_256_threads():
    """Issue #13's occupancy budget: every dispatch of every kernel uses at most 64 bytes of threadgroup memory per
    thread (16 KiB per 256 threads, so four such groups fit a core) and at most Apple's 32 KiB per group."""
    over = {
        (d.kernel, d.threads, d.threadgroup_memory)
        for d in _drive_every_kernel()
        if d.threadgroup_memory > min(32 * 1024, 64 * math.prod(d.threads))
    }
    assert over == set()


def test_cuda_lora_kconcat_rule():
    """The CUDA backend's K-concatenated GEMM rule, from the launch header shared with csrc/cuda (CI has no GPU, so
    this is where it is tested on every change): tall outputs on the cooperative 128x256 configuration, wide ones on
    ping-pong 128x128, ties cooperative; taken by default only where y's and dx's tiles, each counted on its own
    configuration, number at least one per SM."""
    gemm, fills = runner.lora_kconcat_gemm_for, runner.lora_kconcat_fills_device
    assert gemm(8192, 4096) == "cooperative" and gemm(2048, 11008) == "pingpong" and gemm(2048, 4096) == "pingpong"
    assert gemm(1000, 1016) == "cooperative"  # 8 x 8 tiles of 128: a tie
    assert gemm(1000, 1048) == "pingpong" and gemm(1024, 1025) == "pingpong"  # one more column tile (9 against 8)
    assert gemm(1, 8) == "cooperative" and gemm(1, 264) == "pingpong"
    assert fills(8192, 4096, 4096, 132)  # cooperative: 64 x 16 tiles for y and dx
    assert fills(2048, 4096, 11008, 132)  # ping-pong: 16 x 86 for y, 16 x 32 for dx
    assert not fills(4096, 640, 640, 132)  # cooperative 32 x 3 = 96; counted as 128x128 tiles it would be 160
    assert fills(4096, 640, 640, 96) and not fills(4096, 640, 640, 97)
    assert not fills(512, 1024, 16384, 132) and not fills(512, 16384, 1024, 132)  # one GEMM fills (512), one not (32)
    assert fills(512, 1024, 16384, 32) and not fills(512, 1024, 16384, 33)
    assert not fills(1000, 1048, 1016, 132)  # 8 x 4 (cooperative y) and 8 x 9 (ping-pong dx)
    assert not fills(0, 4096, 4096, 1)


def test_lora_route_chosen_by_shape():
    """Many tokens (>= 1024 and > in_features) without dropout: the merged-weight route, no low-rank kernel;
    with dropout, or few tokens: the fused low-rank kernel."""
    x = randn((1100, 48), torch.float32, "cpu").requires_grad_(True)
    w, a = randn((40, 48), torch.float32, "cpu"), randn((8, 48), torch.float32, "cpu").requires_grad_(True)
    b = randn((40, 8), torch.float32, "cpu").requires_grad_(True)
    for rule in (metal.lora_use_merged_weight, runner.lora_use_merged_weight):  # the Metal plans' and CUDA's (C++)
        assert rule(1100, 48, False) and not rule(1100, 48, True)
        assert not rule(1000, 48, False) and not rule(2048, 4096, False)
    assert _record(lambda: tmf.lora_linear(x, w, a, b, 2.0).sum().backward()) == []
    rec = _record(lambda: tmf.lora_linear(x, w, a, b, 2.0, dropout_p=0.1, training=True).sum().backward())
    assert [re.sub(r"_tg\d+_", "_", d.kernel) for d in rec] == [
        "lora_forward_h_float",
        "lora_forward_y_float",
        "lora_backward_dh_float",
        "lora_backward_dx_float",
    ]
