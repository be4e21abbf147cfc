"""Every Metal kernel runs through the harness, with the launch geometry the MPS dispatch uses; device traffic
and dispatches per op call, as counted by the harness, against the minimum."""

import math

import pytest
import torch
from helpers import DTYPES, randn

import torch_metal_fused as tmf
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


# ---- the traffic targets (README "Device traffic"): harness counts against the minimum, every dtype ----------
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
@pytest.mark.parametrize("cores", [runner.HARNESS_GPU_CORES, 40])
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
@pytest.mark.parametrize("cores", [runner.HARNESS_GPU_CORES, 40])
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


def _lora_tokens_per_group(rank, max_threads=256):
    """The host's tiling rule (tmf::launch::lora_tiling): 16 tokens per thread for each of threads / rank
    threads per rank entry, at most 128, and an h tile of at most 4096 floats."""
    return min(128, max_threads // rank * 16, 4096 // rank)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "fin", "fout", "r"), [(512, 256, 384, 8), (300, 200, 100, 16), (700, 64, 96, 4)])
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_forward_traffic_within_10_percent_of_minimum(dtype, tokens, fin, fout, r, dropout):
    """x, the dropout mask, h and y (read, then written in place) move exactly once; A and B once per group."""
    es = _size(dtype)
    x, w = randn((tokens, fin), dtype, "cpu"), randn((fout, fin), dtype, "cpu", seed=1)
    a, b = randn((r, fin), dtype, "cpu", seed=2), randn((fout, r), dtype, "cpu", seed=3)
    torch.manual_seed(0)
    (d,) = _record(lambda: tmf.lora_linear(x, w, a, b, 2.0, dropout_p=0.1 if dropout else 0.0, training=True))
    groups = math.ceil(tokens / _lora_tokens_per_group(r))
    assert d.kernel.startswith("lora_forward_lowrank_tiled") and d.groups == (groups, 1, 1)
    assert d.traffic[0] == (tokens * fin * es, 0)  # x once: x·A is never recomputed per output or rank chunk
    assert d.traffic[1] == (groups * r * fin * es, 0)  # A once per group of rows
    assert d.traffic[2] == (groups * fout * r * es, 0)  # B once per group of rows
    assert d.traffic[3] == ((tokens * fin * es, 0) if dropout else (0, 0))  # the mask once
    assert d.traffic[4] == (tokens * fout * es, tokens * fout * es)  # y read (base) and written once
    assert d.traffic[5] == (0, tokens * r * es)  # h written once
    minimum = (tokens * fin * (2 if dropout else 1) + r * fin + fout * r + 2 * tokens * fout + tokens * r) * es
    assert d.bytes_read + d.bytes_written <= 1.10 * minimum


@pytest.mark.parametrize(("tokens", "r", "max_threads"), [(200, 64, 1024), (100, 256, 1024), (300, 16, 64)])
def test_lora_traffic_beyond_the_10_percent_range_is_as_documented(tokens, r, max_threads):
    """Higher ranks (or a pipeline capped below 256 threads) make shorter groups, so A and B are re-read more
    often: (groups - 1) * r * (in + out) elements over the minimum, the rest still exactly once."""
    fin, fout, es = 72, 40, 4
    x, w = randn((tokens, fin), torch.float32, "cpu"), randn((fout, fin), torch.float32, "cpu", seed=1)
    a, b = randn((r, fin), torch.float32, "cpu", seed=2), randn((fout, r), torch.float32, "cpu", seed=3)
    with runner.pipeline_max_threads(max_threads):
        (d,) = _record(lambda: tmf.lora_linear(x, w, a, b, 0.5))
    groups = math.ceil(tokens / _lora_tokens_per_group(r, min(max_threads, 256)))
    assert d.groups == (groups, 1, 1) and d.threads == (min(max_threads, 256), 1, 1)
    assert d.traffic[0] == (tokens * fin * es, 0) and d.traffic[5] == (0, tokens * r * es)
    assert d.traffic[1] == (groups * r * fin * es, 0) and d.traffic[2] == (groups * fout * r * es, 0)
    minimum = (tokens * fin + r * fin + fout * r + 2 * tokens * fout + tokens * r) * es
    assert d.bytes_read + d.bytes_written == minimum + (groups - 1) * r * (fin + fout) * es


@pytest.mark.parametrize("frozen_input", [False, True])
def test_lora_backward_traffic(frozen_input):
    """dy, dh and dx (read, then written in place) and the mask move once; A and B once per group; for a
    frozen input only dh = scale * dy·B is computed (no A, no dx)."""
    tokens, fin, fout, r, es = 260, 48, 88, 8, 4
    x = randn((tokens, fin), torch.float32, "cpu").requires_grad_(not frozen_input)
    w = randn((fout, fin), torch.float32, "cpu", seed=1)
    a = randn((r, fin), torch.float32, "cpu", seed=2).requires_grad_(True)
    b = randn((fout, r), torch.float32, "cpu", seed=3).requires_grad_(True)
    y = tmf.lora_linear(x, w, a, b, 2.0, dropout_p=0.2, training=True)
    dy = randn((tokens, fout), torch.float32, "cpu", seed=4)
    rec = _record(lambda: y.backward(dy))
    (d,) = [d for d in rec if d.kernel.startswith("lora_backward")]
    groups = math.ceil(tokens / _lora_tokens_per_group(r))
    assert d.groups == (groups, 1, 1)
    assert d.traffic[0] == (tokens * fout * es, 0)  # dy once
    assert d.traffic[2] == (groups * fout * r * es, 0)  # B once per group
    assert d.traffic[4] == (0, tokens * r * es)  # dh written once
    if frozen_input:
        assert d.kernel == "lora_backward_lowrank_dh_tiled_float"
        assert d.traffic[1] == (0, 0) and d.traffic[3] == (0, 0)
    else:
        assert d.kernel == "lora_backward_lowrank_dx_tiled_float"
        assert d.traffic[1] == (groups * r * fin * es, 0)  # A once per group
        assert d.traffic[3] == (tokens * fin * es, 0)  # the mask once
        assert d.traffic[5] == (tokens * fin * es, tokens * fin * es)  # dx (holding dy·W) read and written once


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


def test_every_registered_kernel_runs():
    """Drive every op through every variant, dtype and mode; every kernel the library holds must run."""
    ran = set()
    for dtype in DTYPES:
        for cols, max_threads in ((40, 1024), (1000, 1024), (1000, 64), (9000, 1024)):
            x = randn((9, cols), dtype, "cpu")
            w = randn((cols,), dtype, "cpu")
            with runner.pipeline_max_threads(max_threads):
                for wx, ww, weight in ((True, True, w), (True, False, w), (False, True, w), (True, False, None)):
                    xx = x.clone().requires_grad_(wx)
                    wt = weight.clone().requires_grad_(ww) if weight is not None else None
                    rec = _record(lambda: tmf.rms_norm(tmf.softmax(xx) if wx else xx, wt).sum().backward())
                    ran |= {d.kernel for d in rec}
        lx = randn((4, 24), dtype, "cpu").requires_grad_(True)
        la, lb = randn((3, 24), dtype, "cpu").requires_grad_(True), randn((10, 3), dtype, "cpu").requires_grad_(True)
        lw = randn((10, 24), dtype, "cpu")
        ran |= {d.kernel for d in _record(lambda: tmf.lora_linear(lx, lw, la, lb).sum().backward())}
        lx.requires_grad_(False)
        ran |= {d.kernel for d in _record(lambda: tmf.lora_linear(lx, lw, la, lb).sum().backward())}
        logits = randn((3, 50), dtype, "cpu").requires_grad_(True)
        ran |= {d.kernel for d in _record(lambda: tmf.cross_entropy(logits, torch.tensor([1, 2, 3])).backward())}
    assert set(runner.kernel_names()) - ran == set()


def test_lora_route_chosen_by_shape():
    """Many tokens (>= 1024 and > in_features) without dropout: the merged-weight route, no low-rank kernel;
    with dropout, or few tokens: the fused low-rank kernel."""
    x = randn((1100, 48), torch.float32, "cpu").requires_grad_(True)
    w, a = randn((40, 48), torch.float32, "cpu"), randn((8, 48), torch.float32, "cpu").requires_grad_(True)
    b = randn((40, 8), torch.float32, "cpu").requires_grad_(True)
    assert runner.lora_use_merged_weight(1100, 48, False) and not runner.lora_use_merged_weight(1100, 48, True)
    assert not runner.lora_use_merged_weight(1000, 48, False) and not runner.lora_use_merged_weight(2048, 4096, False)
    assert _record(lambda: tmf.lora_linear(x, w, a, b, 2.0).sum().backward()) == []
    rec = _record(lambda: tmf.lora_linear(x, w, a, b, 2.0, dropout_p=0.1, training=True).sum().backward())
    assert [d.kernel for d in rec] == ["lora_forward_lowrank_tiled_float", "lora_backward_lowrank_dx_tiled_float"]
