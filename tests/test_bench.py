"""The benchmark command: --quick --device cpu produces every output file with the expected columns; the MPS
timing method (back-to-back batches between two synchronize() calls), exercised with fakes on Linux."""

import csv
import json
import math

import pytest
import torch

from torch_metal_fused.bench import run
from torch_metal_fused.bench.__main__ import main
from torch_metal_fused.bench.run import CSV_COLUMNS, EMULATED_COLUMNS

MPS_METHOD = "N back-to-back calls between two torch.mps.synchronize(), per-call = span/N; first call separate"


def test_quick_cpu_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--quick", "--device", "cpu", "--dtypes", "float32", "--reps", "3", "--out", str(out)]) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(CSV_COLUMNS) <= set(rows[0])
    seen = {(r["op"], r["provider"], r["mode"]) for r in rows}
    for op, baselines in (("softmax", ["torch"]), ("rms_norm", ["torch", "hf_eager"]), ("lora", ["eager"])):
        for mode in ("forward", "backward", "forward_backward"):
            for prov in ["fused", *baselines]:
                assert (op, prov, mode) in seen
    assert ("lora", "matmul", "forward") in seen
    for r in rows:
        assert not r["error"], r
        assert float(r["median_us"]) > 0 and float(r["p20_us"]) <= float(r["median_us"]) <= float(r["p80_us"])
        assert r["backend"] == ("reference" if r["provider"] == "fused" else "native")
        assert r["torch_version"] and r["device"] == "cpu"
        assert float(r["fused_speedup"]) > 0
    data = json.loads((out / "results.json").read_text())
    assert data["fused_backend"] == "reference" and data["environment"]["copy_gbps"] > 0
    assert len(data["rows"]) == len(rows)
    summary = (out / "summary.md").read_text()
    assert "reference path" in summary and "copy bandwidth" in summary
    assert "- timing: host clock around each call" in summary and data["timing"] == run.timing_method(
        torch.device("cpu"), 3
    )
    for op in ("softmax", "rms_norm", "lora"):
        assert (out / f"{op}.png").stat().st_size > 1000
    assert "| op" in capsys.readouterr().out


@pytest.mark.emulated
def test_emulated_run_reports_traffic_not_timings(tmp_path):
    out = tmp_path / "emu"
    assert (
        main(
            [
                "--quick",
                "--device",
                "cpu",
                "--emulated",
                "--dtypes",
                "bfloat16",
                "--ops",
                "softmax,rms_norm,lora",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(EMULATED_COLUMNS) <= set(rows[0]) and "median_us" not in rows[0]
    for r in rows:
        assert int(r["dispatches"]) >= 1 and r["kernels"]
        if r["mode"] == "forward":
            assert float(r["traffic_over_min"]) <= 1.10, r
    assert "No timings" in (out / "summary.md").read_text()


def test_bad_arguments_are_reported(capsys):
    with pytest.raises(SystemExit):
        main(["--ops", "conv"])
    assert "unknown op 'conv'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--emulated"])


class FakeGpu:
    """A fake clock and device: each call adds `call_ms` of work, each sync `sync_ms` of latency; `log` holds
    the order of calls ("c") and syncs ("s")."""

    def __init__(self, call_ms: float, sync_ms: float = 0.0) -> None:
        self.now_ms, self.call_ms, self.sync_ms = 0.0, call_ms, sync_ms
        self.log: list[str] = []

    def fn(self) -> None:
        self.now_ms += self.call_ms
        self.log.append("c")

    def sync(self) -> None:
        self.now_ms += self.sync_ms
        self.log.append("s")

    def clock(self) -> float:
        return self.now_ms / 1e3

    def batches(self, skip: int = 0) -> list[int]:
        """Calls per sync-delimited batch after the first `skip` log entries; fails unless the rest of the log is
        sync, calls, sync, sync, calls, sync, ..."""
        text = "".join(self.log[skip:])
        assert text.startswith("s") and text.endswith("s") and "sss" not in text
        parts = text[1:-1].split("ss")
        assert all(p and set(p) == {"c"} for p in parts), text
        return [len(p) for p in parts]


@pytest.mark.parametrize("call_ms, sync_ms", [(0.005, 0.0), (0.03, 0.2), (1.7, 0.05), (25.0, 0.1)])
def test_back_to_back_batches_span_the_minimum_and_sync_only_around_them(call_ms, sync_ms):
    gpu = FakeGpu(call_ms, sync_ms)
    samples = run._time_back_to_back_ms(gpu.fn, gpu.sync, min_span_ms=20.0, samples=7, clock=gpu.clock)
    batches = gpu.batches()  # sync only at each batch's two ends, never between calls
    n = batches[-1]
    assert batches[-7:] == [n] * 7 and len(samples) == 7  # the timed batches all have the probe's final N
    assert n * call_ms + sync_ms >= 20.0  # the span (from just after the first sync) reaches the minimum
    assert n == 1 or (n - 1) * call_ms < 2 * 20.0  # ... without grossly overshooting it
    for s in samples:  # per-call = span / N, the span holding the N calls and the closing sync
        assert math.isclose(s, (n * call_ms + sync_ms) / n, rel_tol=1e-9)
    assert len(batches) - 7 <= 6  # a handful of probe batches


def test_back_to_back_n_is_bounded_when_calls_take_no_time():
    gpu = FakeGpu(0.0)
    samples = run._time_back_to_back_ms(gpu.fn, gpu.sync, min_span_ms=20.0, samples=2, clock=gpu.clock)
    assert samples == [0.0, 0.0] and gpu.batches()[-1] == run._MAX_BATCH


def test_mps_route_times_back_to_back_without_events_or_mps_tensors(monkeypatch):
    """time_fn on an MPS device (no MPS here: the route must need none) goes through torch.mps.synchronize and
    back-to-back batches: no events, no flush buffer, no MPS allocation."""
    gpu = FakeGpu(0.5)
    monkeypatch.setattr(torch.mps, "synchronize", gpu.sync)

    def no(*args, **kwargs):
        raise AssertionError("the MPS route must not use events, the flush buffer or MPS tensors")

    monkeypatch.setattr(torch.mps, "Event", no)
    monkeypatch.setattr(run, "_flush_buffer", no)
    real = run._time_back_to_back_ms
    routed = []

    def spy(fn, sync, min_span_ms, samples):
        routed.append((sync, min_span_ms, samples))
        return real(fn, sync, min_span_ms, samples, clock=gpu.clock)  # the fake clock instead of the host's

    monkeypatch.setattr(run, "_time_back_to_back_ms", spy)
    first, times = run.time_fn(gpu.fn, torch.device("mps"), reps=4)
    assert routed == [(gpu.sync, run.MIN_SPAN_MS, 4)]
    assert first >= 0  # the first call, alone between two syncs (host clock)
    assert gpu.log[:6] == list("scsccc")  # the first call on its own, then 3 warm-up calls
    batches = gpu.batches(skip=6)  # then the probe's batches and the 4 timed ones
    n = batches[-1]
    assert n * 0.5 >= run.MIN_SPAN_MS and batches[-4:] == [n] * 4
    assert times == pytest.approx([0.5] * 4)
    gpu.log.clear()
    _, times = run.time_fn(gpu.fn, torch.device("mps"))  # no --reps: a fixed number of spans
    assert gpu.batches(skip=6)[-run.MPS_SAMPLES :] == [n] * run.MPS_SAMPLES
    assert len(times) == run.MPS_SAMPLES and routed[-1][2] == run.MPS_SAMPLES


def test_report_header_names_the_timing_method():
    mps = run.timing_method(torch.device("mps"))
    assert mps.startswith(MPS_METHOD) and f"{run.MPS_SAMPLES} spans" in mps and ">= 20 ms" in mps
    assert "4 spans" in run.timing_method(torch.device("mps"), reps=4)
    assert "CUDA events" in run.timing_method(torch.device("cuda"))
    assert "host clock around each call" in run.timing_method(torch.device("cpu"))
    cfg = run.BenchConfig(torch.device("mps"), ["softmax"], [torch.float32], ["forward"], "quick")
    env = run.Environment("mps", "Apple GPU (test)", torch.__version__, "0", "now")
    summary = run._summary(cfg, env, [], "metal")
    assert f"- timing: {MPS_METHOD}" in summary and "- fused backend on this device: metal" in summary
    cfg.emulated = True  # emulated runs time nothing
    assert "- timing:" not in run._summary(cfg, env, [], "metal-emulated")
