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


@pytest.mark.parametrize("cols", [4097, 10000])
def test_looped_forward_traffic_is_documented(cols):
    """Rows too long for registers: the looped variants read x twice (documented in the shaders)."""
    rows, es = 4, 4
    x = randn((rows, cols), torch.float32, "cpu")
    (d,) = _record(lambda: tmf.softmax(x))
    assert d.kernel.startswith("softmax_forward_looped")
    assert d.traffic[0] == (2 * rows * cols * es, 0) and d.traffic[1] == (0, rows * cols * es)
    (d,) = _record(lambda: tmf.rms_norm(x, None))
    assert d.traffic[0] == (2 * rows * cols * es, 0)


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


def test_lora_traffic_never_recomputes_x_a_per_output():
    tokens, fin, fout, r, es, tm = 16, 96, 80, 20, 4, 4  # tm: token rows per threadgroup (kLoraTokensPerGroup)
    x = randn((tokens, fin), torch.float32, "cpu")
    w = randn((fout, fin), torch.float32, "cpu")
    a, b = randn((r, fin), torch.float32, "cpu"), randn((fout, r), torch.float32, "cpu")
    (d,) = _record(lambda: tmf.lora_linear(x, w, a, b, 2.0))
    assert d.kernel == "lora_forward_lowrank_row_float" and d.groups == (tokens // tm, 1, 1)
    passes = math.ceil(r / 16)
    assert d.traffic[0] == (tokens * fin * es * passes, 0)  # x: once per 16 rank entries, not per output
    assert d.traffic[1] == (tokens // tm * r * fin * es, 0)  # A once per group of rows
    assert d.traffic[2] == (tokens // tm * fout * r * es, 0)  # B once per group of rows
    assert d.traffic[4] == (tokens * fout * es, tokens * fout * es)  # y read (base) and written once
    assert d.traffic[5] == (0, tokens * r * es)  # h written once


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_looped_variants_when_the_pipeline_allows_fewer_threads(dtype):
    """A pipeline whose maxTotalThreadsPerThreadgroup is below ceil(cols/4) gets the looped kernels."""
    x = randn((5, 2000), dtype, "cpu").requires_grad_(True)
    w = randn((2000,), dtype, "cpu", seed=3).requires_grad_(True)
    with runner.pipeline_max_threads(256):
        rec = _record(lambda: torch.autograd.grad(tmf.rms_norm(tmf.softmax(x), w).square().sum(), (x, w)))
        grads = torch.autograd.grad(tmf.rms_norm(tmf.softmax(x), w).square().sum(), (x, w))
    assert {d.kernel.rsplit("_", 1)[0] for d in rec} >= {
        "softmax_forward_looped",
        "rms_norm_forward_looped",
        "rms_norm_backward_dx_dw_looped",
        "softmax_backward_looped",
    }
    assert all(d.threads[0] <= 256 for d in rec)
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
        for cols, max_threads in ((40, 1024), (1000, 1024), (1000, 128), (5000, 1024)):
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
    assert [d.kernel for d in rec] == ["lora_forward_lowrank_row_float", "lora_backward_lowrank_dx_row_float"]
