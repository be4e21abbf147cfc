"""The benchmark command: on a CPU its default is the emulated report (the Metal kernels' traffic on the harness, with
per-chip floors labelled as a model), --timed --quick --device cpu produces every output file of the timed run with
the expected columns, the fallback to the timed run where the harness is missing, the plots or the one-line
matplotlib message; the MPS timing method (back-to-back batches between two synchronize() calls), exercised with
fakes on Linux. Attention: the providers agree, the minimum bytes, FLOPs and bytes kept for backward follow their
formulas, and the emulated report's K/V reads and device bytes match the launch plan's model, with compute floors
per chip labelled a model."""

import csv
import json
import math
import sys

import pytest
import torch

from torch_metal_fused.bench import __main__ as bench_main
from torch_metal_fused.bench import cases, ledger, run
from torch_metal_fused.bench import results as results_page
from torch_metal_fused.bench.__main__ import main
from torch_metal_fused.bench.chips import CHIPS, by_name
from torch_metal_fused.bench.run import CSV_COLUMNS, EMULATED_COLUMNS, PROJECTION_COLUMNS

MPS_METHOD = "N back-to-back calls between two torch.mps.synchronize(), per-call = span/N; first call separate"


def _csv_rows(out):
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.emulated
def test_cpu_default_is_the_emulated_report_with_model_floors(tmp_path, capsys):
    """No flag on a CPU: the emulated report of the default (emulated) suite, every row with its traffic, dispatches,
    threadgroup memory and a floor per chip that is bytes moved ÷ that chip's copy bandwidth, labelled a model."""
    out = tmp_path / "default"
    gpu = torch.backends.mps.is_available() or torch.cuda.is_available()
    device = ["--device", "cpu"] if gpu else []  # no flag at all where the CPU is the default device
    assert main([*device, "--ops", "softmax", "--dtypes", "float16", "--out", str(out)]) == 0
    rows = _csv_rows(out)
    assert set(EMULATED_COLUMNS) <= set(rows[0]) and "median_us" not in rows[0]
    data = json.loads((out / "results.json").read_text())
    assert data["emulated"] is True and data["fused_backend"] == "metal-emulated" and data["suite"] == "emulated"
    assert {(r["shape"], r["mode"]) for r in rows} == {
        (f"{r}x{c}", m)
        for r, c in run.shapes("softmax", "emulated")
        for m in ("forward", "backward", "forward_backward")
    }
    m1 = by_name("M1")
    assert m1.copy_gbps == 56 and m1.kind == "measured copy"
    # The launch plans' host cost per entry point (a do-nothing executor), with the dispatches each call encodes.
    host = {r["entry_point"]: r for r in csv.DictReader((out / "host_cost.csv").open())}
    assert {"softmax_forward", "rms_norm_backward", "lora_lowrank", "rope_apply", "cross_entropy_rows"} <= set(host)
    assert host["rms_norm_backward"]["dispatches"] == "2" and host["softmax_forward"]["dispatches"] == "1"
    assert host["attention_forward"]["dispatches"] == "1" and host["attention_backward"]["dispatches"] == "3"
    assert all(float(r["median_us"]) > 0 for r in host.values())
    assert "Host cost per call" in (out / "summary.md").read_text()
    for r in rows:
        assert not r["error"], r
        moved = int(r["device_bytes_read"]) + int(r["device_bytes_written"])
        assert int(r["bytes_moved"]) == moved > 0 and int(r["dispatches"]) >= 1
        assert float(r["traffic_over_min"]) == pytest.approx(moved / int(r["min_bytes"]))
        for chip in CHIPS:  # the projection: bytes ÷ the chip's copy bandwidth, in µs
            assert float(r[f"floor_us_{chip.key}"]) == pytest.approx(moved / (chip.copy_gbps * 1e9) * 1e6)
        assert float(r["floor_us_M1"]) == pytest.approx(moved / 56e3)
        per_dispatch = [int(b) for b in r["threadgroup_bytes"].split(" + ")]  # threadgroup memory per dispatch
        assert len(per_dispatch) == int(r["dispatches"]) and max(per_dispatch) == int(r["max_threadgroup_bytes"])
        assert all(0 <= b <= 32768 for b in per_dispatch), r
    # the kernels' own `threadgroup` arrays and setThreadgroupMemoryLength arguments (LoRA's tiles) are counted:
    # the whole-threadgroup reductions of the wide-row variants go through a threadgroup scratch array
    assert any(int(r["max_threadgroup_bytes"]) > 0 for r in rows)
    chips = {c["name"]: c for c in data["projection"]["chips"]}
    assert chips["M1"]["copy_gbps"] == 56 and chips["M1"]["source"] and chips["M1"]["column"] == "floor_us_M1"
    assert "not a measurement" in data["projection"]["what"]
    summary = (out / "summary.md").read_text()
    assert "No timings" in summary and "- timing:" not in summary
    assert "A floor from a bandwidth model, NOT a measurement" in summary
    for name in ("M1", "M3 Max", "M4 Max"):  # the table's chips, their columns named as a model
        assert f"| {name} floor µs (model) " in summary
    assert "M1: 56 GB/s, measured copy (chsasank/device-benchmarks)" in summary
    printed = capsys.readouterr().out
    assert summary.strip() in printed
    assert (out / "softmax.png").stat().st_size > 1000  # bars of x minimum per shape


def test_timed_quick_cpu_run_writes_every_output(tmp_path, capsys):
    """--timed: the old CPU behaviour, timing the plain-PyTorch reference against torch."""
    out = tmp_path / "bench"
    assert main(["--timed", "--quick", "--device", "cpu", "--dtypes", "float32", "--reps", "3", "--out", str(out)]) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(CSV_COLUMNS) <= set(rows[0])
    seen = {(r["op"], r["provider"], r["mode"]) for r in rows}
    baselines_per_op = (
        ("softmax", ["torch"]),
        ("rms_norm", ["torch", "hf_eager"]),
        ("lora", ["eager"]),
        ("attention", ["sdpa", "hf_eager"]),
    )
    for op, baselines in baselines_per_op:
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
    attention = [r for r in rows if r["op"] == "attention"]
    assert attention and all(float(r["tflops"]) > 0 for r in attention)  # the FLOPs convention's rate
    for op in ("softmax", "rms_norm", "lora", "attention"):  # bars of % of copy bandwidth per shape
        assert (out / f"{op}.png").stat().st_size > 1000
    assert "| op" in capsys.readouterr().out


def test_record_appends_the_run_to_the_ledger(tmp_path):
    """--record LEDGER: every timed row becomes one ledger row (the ledger's columns, the run's device, torch and
    commit, median and percentiles, minimum bytes, % of the floor); a second run appends under the same header."""
    from torch_metal_fused.bench import ledger as ledger_mod

    book = tmp_path / "ledger.csv"
    argv = ["--timed", "--quick", "--device", "cpu", "--ops", "softmax", "--dtypes", "float32", "--reps", "3"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--no-plots", "--record", str(book)]) == 0
    rows = ledger_mod.read(book)
    timed = _csv_rows(tmp_path / "a")
    assert len(rows) == len(timed) > 0
    assert book.read_text().splitlines()[0] == ",".join(ledger_mod.COLUMNS)
    for r, t in zip(rows, timed):
        assert (r["op"], r["provider"], r["mode"], r["shape"]) == (t["op"], t["provider"], t["mode"], t["shape"])
        assert r["run"] == t["timestamp"] and r["date"] == t["timestamp"][:10] and r["source"] == "bench"
        assert r["torch"] == torch.__version__ and r["level"] == "op" and r["method"] == "host-clock"
        assert float(r["p50_us"]) == pytest.approx(float(t["median_us"]), abs=0.006)
        assert float(r["p20_us"]) <= float(r["p50_us"]) <= float(r["p80_us"])
        assert int(r["bytes"]) == int(t["min_bytes"]) and float(r["pct_floor"]) > 0 and float(r["copy_gbps"]) > 0
        assert r["commit"] == ledger_mod.current_commit()
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-plots", "--record", str(book)]) == 0
    assert len(ledger_mod.read(book)) == 2 * len(rows)
    assert book.read_text().count("run,date,commit") == 1


def test_record_refuses_a_ledger_of_other_columns_and_a_missing_default(tmp_path, monkeypatch, capsys):
    from torch_metal_fused.bench import ledger as ledger_mod

    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not the ledger's"):
        ledger_mod.append([{"op": "softmax"}], other)
    with pytest.raises(KeyError, match="not ledger columns"):
        ledger_mod.normalise({"median_us": 1.0})
    monkeypatch.setattr(bench_main, "DEFAULT_LEDGER", tmp_path / "none" / "ledger.csv")
    with pytest.raises(SystemExit):
        bench_main.parse(["--device", "cpu", "--record"])
    assert "--record: no ledger at" in capsys.readouterr().err


@pytest.mark.emulated
def test_record_of_an_emulated_run_holds_counted_bytes(tmp_path):
    """The emulated report's rows go into the ledger as counted rows: the harness's bytes, no time."""
    from torch_metal_fused.bench import ledger as ledger_mod

    book = tmp_path / "ledger.csv"
    argv = ["--device", "cpu", "--emulated", "--ops", "softmax", "--dtypes", "float32", "--modes", "forward"]
    assert main([*argv, "--out", str(tmp_path / "e"), "--no-plots", "--record", str(book)]) == 0
    rows, emulated = ledger_mod.read(book), _csv_rows(tmp_path / "e")
    assert len(rows) == len(emulated) > 0
    for r, e in zip(rows, emulated):
        assert r["method"] == "counted" and r["device"] == "Metal-on-CPU harness" and r["backend"] == "metal-emulated"
        assert r["bytes_moved"] == e["bytes_moved"] and r["bytes"] == e["min_bytes"]
        assert not r["p50_us"] and not r["copy_gbps"]


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


@pytest.mark.emulated
def test_emulated_cross_entropy_counts_the_row_pass_against_its_minimum(tmp_path):
    """The default (emulated) suite has the linear cross-entropy at both vocabulary sizes: its forward runs the Metal
    row pass (which reads each logits row twice and writes the gradient over it once: 1.5x the minimum of one read
    and one write), its backward only scales the gradients the forward computed (no Metal dispatch)."""
    out = tmp_path / "ce"
    args = ["--device", "cpu", "--emulated", "--ops", "cross_entropy", "--dtypes", "float16", "--out", str(out)]
    assert main(args) == 0
    rows = _csv_rows(out)
    assert {(r["shape"], r["mode"]) for r in rows} == {
        (f"{t}x{h}x{v}", m)
        for t, h, v in run.shapes("cross_entropy", "emulated")
        for m in ("forward", "backward", "forward_backward")
    }
    assert {r["shape"].split("x")[2] for r in rows} == {"32000", "128256"}
    for r in rows:
        assert not r["error"], r
        tokens, _, vocab = map(int, r["shape"].split("x"))
        if r["mode"] == "backward":
            assert int(r["dispatches"]) == 0 and "only scales" in r["note"]
            continue
        assert r["kernels"] == "cross_entropy_rows_looped_half" and int(r["dispatches"]) >= 1
        assert int(r["min_bytes"]) == 2 * tokens * vocab * 2 + 8 * tokens
        assert float(r["traffic_over_min"]) == pytest.approx(1.5, abs=0.02), r
    assert "cross_entropy_rows_looped" in (out / "summary.md").read_text()


def test_attention_providers_agree_with_the_reference():
    """fused (the reference on a CPU), SDPA and Hugging Face's eager attention compute the same causal grouped-query
    attention and the same gradients of q, k and v, from q, k, v made as HF makes them (transposed projections)."""
    case = cases.Case("attention", (2, 24, 4, 2, 32), torch.float32, "forward")  # HF's softmax runs in float32
    g = torch.Generator().manual_seed(1)
    (q, k, v), (dout,) = cases._attention_inputs(case.shape, case.dtype, torch.device("cpu"), g)()
    assert q.shape == (2, 4, 24, 32) and k.shape == (2, 2, 24, 32) and q.stride(1) == 32  # (B, S, H, D) transposed
    results = {}
    for provider in cases.providers("attention", torch.device("cpu")):
        out = cases._attention_fn(provider, 24, case.dtype, torch.device("cpu"))(q, k, v)
        results[provider] = (out, *torch.autograd.grad(out, (q, k, v), dout))
    assert set(results) == {"fused", "sdpa", "hf_eager"}
    for provider in ("sdpa", "hf_eager"):
        for got, want in zip(results[provider], results["fused"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for mode in ("forward", "backward", "forward_backward"):  # each mode's callable runs
        prep = cases.prepare(cases.Case("attention", (1, 16, 2, 1, 32), torch.float32, mode), "hf_eager", q.device)
        prep.run()
        assert prep.flops > 0 and prep.min_bytes > 0


def test_attention_min_bytes_flops_and_saved_bytes():
    b, s, h, kv, d = shape = (2, 64, 8, 2, 32)
    es, stats = 2, 4 * b * h * s
    q, k = b * h * s * d * es, b * kv * s * d * es

    def of(mode):
        return cases.attention_min_bytes_flops(cases.Case("attention", shape, torch.bfloat16, mode))

    fwd_flops = 4 * b * h * s * s * d // 2  # causal: half of q·kᵀ and p·v
    assert of("forward") == (q + 2 * k + q + stats, fwd_flops)  # q, k, v read; out and the fp32 lse written
    # backward: q, k, v, out, dout, lse read; dq, dk, dv and the fp32 delta written
    assert of("backward") == (3 * q + 2 * k + stats + q + 2 * k + stats, fwd_flops * 5 // 2)
    assert of("forward_backward") == (of("forward")[0] + of("backward")[0], fwd_flops * 7 // 2)
    assert cases.min_bytes(cases.Case("attention", shape, torch.bfloat16, "forward")) == of("forward")[0]
    # ours (out + lse) against the composite path's probabilities: ≈33 MiB against 1 GiB at Llama-3-8B's 4096 tokens
    ours, composite = cases.attention_saved_bytes((1, 4096, 32, 8, 128), torch.bfloat16)
    assert ours == 32 * 4096 * (128 * 2 + 4) and ours / 2**20 == 32.5 and composite == 2**30
    assert cases.providers("attention", torch.device("cuda")) == ["fused", "sdpa", "hf_eager"]  # no Liger attention
    assert (1, 4096, 32, 8, 128) in cases.shapes("attention", "cuda") and "attention" in cases.OPS
    assert set(cases.shapes("attention", "cuda")) <= set(cases.shapes("attention", "full"))
    assert "attention" in bench_main.parse(["--device", "cpu"]).cfg.ops  # in the default run


def test_attention_model_reads_k_and_v_once_per_query_block():
    """The launch plan's model: with 64 query rows per threadgroup, a causal call's forward stages, per query head,
    K and V up to each group's last key: (seq / 64 + 1) / 2 passes, times the query heads per kv head."""
    for seq, groups in ((4096, 4), (2048, 4), (256, 2)):
        model = cases.attention_model((1, seq, 4 * groups, 4, 128), torch.bfloat16, "forward")
        assert model["kv_reads"] == pytest.approx(groups * (seq / 64 + 1) / 2)
        assert model["q_reads"] == 1
    small = cases.attention_model((1, 40, 2, 2, 64), torch.float32, "forward")  # one group of 40 rows, blocks of 32
    assert small["kv_reads"] == 1 and cases.AttentionPlan.of((1, 40, 2, 2, 64)).query_rows == 40
    assert cases.AttentionPlan.of((1, 4096, 32, 8, 128)) == cases.AttentionPlan(64, 64, 16)
    backward = cases.attention_model((1, 256, 4, 2, 64), torch.float32, "backward")
    assert backward["kv_reads"] == 5 + 1 and backward["q_reads"] == 1 + 2.5  # dQ as the forward; dK/dV's q blocks


def test_chip_compute_rates_are_cited_models():
    m1 = by_name("M1")
    assert m1.peak_tflops == pytest.approx(2.617, abs=1e-3)  # Apple's 2.6 TFLOPS: 8 cores x 1.278 GHz x 256
    assert by_name("M1 Max").peak_tflops == pytest.approx(10.62, abs=0.01)
    assert m1.compute_floor_us(2.617e12) == pytest.approx(1e6 * 2.617 / m1.peak_tflops)
    for chip in CHIPS:
        if chip.name.startswith("M4"):  # no citable clock: no compute floor
            assert chip.peak_tflops is None and chip.compute_floor_us(1e9) is None
        else:
            assert chip.clock_source and chip.gpu_cores > 0
        assert "TFLOPS" in chip.describe_compute() or "no citable GPU clock" in chip.describe_compute()


@pytest.mark.emulated
def test_emulated_attention_counts_kv_reads_against_the_model(tmp_path):
    """The emulated suite's attention rows: the harness's device bytes match the launch plan's model (exactly in the
    forward; the backward's dQ kernel loads each row's lse and delta once per lane, ~1 % more), K and V are read as
    often as the model says, and each row has FLOPs, compute floors per chip (a model, none without a citable clock)
    and the bytes kept for backward; the summary has the attention section and the projection at the LLM shapes."""
    out = tmp_path / "attention"
    args = ["--device", "cpu", "--emulated", "--ops", "attention", "--dtypes", "bfloat16", "--out", str(out)]
    assert main(args) == 0
    rows = _csv_rows(out)
    assert {(r["shape"], r["mode"]) for r in rows} == {
        ("x".join(map(str, shape)), m)
        for shape in cases.shapes("attention", "emulated")
        for m in ("forward", "backward", "forward_backward")
    }
    for r in rows:
        assert not r["error"], r
        shape = tuple(map(int, r["shape"].split("x")))
        case = cases.Case("attention", shape, torch.bfloat16, r["mode"])
        model = cases.attention_model(shape, torch.bfloat16, r["mode"])
        moved = int(r["bytes_moved"])
        assert int(r["min_bytes"]) == cases.attention_min_bytes_flops(case)[0]
        assert int(r["model_device_bytes"]) == model["device_bytes"]
        if r["mode"] == "forward":
            assert moved == model["device_bytes"] and r["kernels"].startswith("attention_forward_d")
        else:
            assert model["device_bytes"] <= moved <= 1.02 * model["device_bytes"], r
            assert int(r["dispatches"]) == (3 if r["mode"] == "backward" else 4)
        assert float(r["kv_reads"]) == pytest.approx(model["kv_reads"])
        assert float(r["q_reads"]) == pytest.approx(model["q_reads"])
        assert float(r["kv_reads"]) > 1  # K and V are re-read per query block: the traffic is above the minimum
        assert float(r["traffic_over_min"]) > 1
        flops = int(r["flops"])
        assert flops == cases.attention_min_bytes_flops(case)[1] and int(r["model_matrix_flops"]) >= flops
        for chip in CHIPS:
            floor = r[f"compute_floor_us_{chip.key}"]
            if chip.peak_tflops is None:
                assert floor == ""
            else:
                assert float(floor) == pytest.approx(flops / (chip.peak_tflops * 1e12) * 1e6)
        ours, composite = cases.attention_saved_bytes(shape, torch.bfloat16)
        assert int(r["saved_for_backward_bytes"]) == ours and int(r["composite_saved_bytes"]) == composite
    projection = list(csv.DictReader((out / "attention_projection.csv").open()))
    assert set(PROJECTION_COLUMNS) <= set(projection[0])
    assert {r["shape"] for r in projection} == {"x".join(map(str, s)) for s in cases.LLM_ATTENTION}
    llama = next(r for r in projection if r["shape"] == "1x4096x32x8x128" and r["mode"] == "forward")
    assert float(llama["kv_reads"]) == 4 * (4096 / 64 + 1) / 2
    assert float(llama["min_floor_us_M1"]) == pytest.approx(int(llama["min_bytes"]) / 56e3)
    data = json.loads((out / "results.json").read_text())
    assert data["attention_projection"] and "not a measurement" in data["projection"]["compute"]
    summary = (out / "summary.md").read_text()
    assert "## attention: K/V reads and floors per chip (models, not measurements)" in summary
    assert "| M1 compute floor µs" in summary and "M1: 2.62 TFLOPS = 8 cores x 1.278 GHz" in summary
    assert "32.5 MiB against 1·32·4096·4096·2 B = 1024 MiB (1 GiB)" in summary


def test_timed_cpu_cross_entropy_against_the_unfused_path(tmp_path):
    out = tmp_path / "ce"
    args = ["--timed", "--quick", "--device", "cpu", "--ops", "cross_entropy", "--dtypes", "float32", "--reps", "2"]
    assert main([*args, "--out", str(out)]) == 0
    rows = _csv_rows(out)
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("fused", "torch") for m in ("forward", "backward", "forward_backward")
    }
    for r in rows:
        assert not r["error"], r
        assert r["shape"] == "64x64x32000" and float(r["median_us"]) > 0 and float(r["tflops"]) > 0
        assert float(r["fused_speedup"]) > 0 and int(r["min_bytes"]) > 0
    assert (out / "cross_entropy.png").stat().st_size > 1000


def test_cross_entropy_providers_and_shapes(monkeypatch):
    from torch_metal_fused.bench import cases

    assert "cross_entropy" in bench_main.parse(["--device", "cpu"]).cfg.ops  # in the default run
    assert cases.providers("cross_entropy", torch.device("cpu")) == ["fused", "torch"]
    monkeypatch.setattr(cases, "_has", lambda module: module == "liger_kernel")
    assert cases.providers("cross_entropy", torch.device("cuda")) == ["fused", "torch", "liger"]
    assert (16384, 4096, 128256) in cases.shapes("cross_entropy", "cuda")
    assert {(4096, 2048, 32000), (8192, 4096, 128256)} <= set(cases.shapes("cross_entropy", "full"))
    fb = cases.min_bytes(cases.Case("cross_entropy", (4, 8, 16), torch.float16, "forward_backward"))
    assert fb == 3 * (4 * 8 + 16 * 8) * 2 + 2 * 4 * 4  # hidden and weight read twice, dhidden and dweight written


def test_timed_table_shows_peak_memory_where_measured():
    row = {"op": "cross_entropy", "mode": "forward", "dtype": "bfloat16", "shape": "8x8x8", "provider": "fused"}
    row |= {"backend": "cuda", "median_us": 10.0, "peak_memory_mb": 1234.5, "fused_speedup": 1.0}
    assert "peak MB" in run._table([row], emulated=False) and "| 1234" in run._table([row], emulated=False)
    assert "peak MB" not in run._table([{**row, "peak_memory_mb": None}], emulated=False)


def test_bad_arguments_are_reported(capsys):
    with pytest.raises(SystemExit):
        main(["--ops", "conv"])
    assert "unknown op 'conv'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--emulated"])
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--emulated", "--timed"])
    with pytest.raises(SystemExit):
        main(["--chips", "M9"])
    assert "unknown chip 'M9'" in capsys.readouterr().err


def test_cpu_modes_and_suites_by_flag():
    cpu = bench_main.parse(["--device", "cpu"])
    assert cpu.cfg.emulated and cpu.emulated_by_default and cpu.cfg.suite == "emulated"
    assert cpu.cfg.chips == ["M1", "M3 Max", "M4 Max"]
    timed = bench_main.parse(["--device", "cpu", "--timed"]).cfg
    assert not timed.emulated and timed.suite == "quick"
    explicit = bench_main.parse(["--device", "cpu", "--emulated", "--quick", "--chips", "all"])
    assert explicit.cfg.emulated and not explicit.emulated_by_default and explicit.cfg.suite == "quick"
    assert explicit.cfg.chips == [c.name for c in CHIPS]


def test_without_the_harness_the_cpu_default_falls_back_to_the_timed_run(monkeypatch, capsys):
    reason = "clang 19 (or newer) not found: the harness needs its _Float16/__bf16 support"
    monkeypatch.setattr(bench_main, "harness_unavailable_reason", lambda: reason)
    ran = []
    monkeypatch.setattr(bench_main, "run_benchmarks", lambda cfg, notes: ran.append((cfg, notes)))
    assert main(["--device", "cpu"]) == 0
    (cfg, notes), err = ran[0], capsys.readouterr().err
    assert not cfg.emulated and cfg.suite == "quick"  # the timed run's CPU default
    explained = [ln for ln in err.splitlines() if "unavailable" in ln]
    assert len(explained) == 1 and reason in explained[0] and "times the plain-PyTorch reference" in explained[0]
    assert notes == explained  # and in the report's header
    assert main(["--device", "cpu", "--suite", "full"]) == 0 and ran[1][0].suite == "full"  # a chosen suite stays
    assert main(["--device", "cpu", "--emulated"]) == 2 and len(ran) == 2  # asked for explicitly: an error
    assert reason in capsys.readouterr().err


def test_plots_without_matplotlib_say_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rows = [{"op": "softmax", "mode": "forward", "dtype": "float32", "shape": "8x8", "traffic_over_min": 1.0}]
    paths, message = run._plots(tmp_path, rows, emulated=True)
    assert paths == [] and "\n" not in message
    assert "matplotlib is not installed" in message and "pip install matplotlib" in message and "[plot]" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.emulated
def test_emulated_run_prints_the_matplotlib_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = ["--device", "cpu", "--ops", "lora", "--suite", "quick", "--dtypes", "float32", "--modes", "forward"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "matplotlib" in ln]
    assert lines == [f"plots skipped: matplotlib is not installed ({run.PLOT_HINT})"]
    assert not list(tmp_path.glob("*.png"))


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


def test_train_bench_providers_agree_on_the_losses(tmp_path):
    """`python -m torch_metal_fused.bench --train` on the tiny preset (CPU): Hugging Face + PEFT and ours with every
    patch option, LoRA with PEFT's defaults (float32 adapters on bf16) and full fine-tuning, each provider in its own
    process: every run completes and the first two losses agree (the fused path computes the same training step)."""
    pytest.importorskip("peft")
    import json

    from torch_metal_fused.bench import train

    args = ["--modes", "lora,full", "--providers", "hf,tmf", "--steps", "1", "--warmup", "1", "--device", "cpu"]
    book = tmp_path / "ledger.csv"
    assert train.main([*args, "--out", str(tmp_path), "--record", str(book)]) == 0
    # --record: rows by the ledger's rules (ours is "fused", a step is forward_backward, the training mode in the
    # shape), which the results page renders with ours against the other provider
    rows = ledger.read(book)
    assert [(r["provider"], r["mode"], r["shape"]) for r in rows] == [
        (p, "forward_backward", f"tiny {m} 1x128") for m in ("lora", "full") for p in ("hf", "fused")
    ]
    page = results_page.render(rows)
    assert "### train_step" in page and "| – |" not in page
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["mode"], r["provider"], r["ok"]) for r in results] == [
        ("lora", "hf", True),
        ("lora", "tmf", True),
        ("full", "hf", True),
        ("full", "tmf", True),
    ]
    for mode in ("lora", "full"):
        hf, ours = (r["losses"] for r in results if r["mode"] == mode)
        assert len(hf) == len(ours) == 2
        for a, b in zip(hf, ours):
            assert abs(a - b) <= 1e-2 * abs(a), (mode, hf, ours)
    assert "| lora | tmf |" in (tmp_path / "summary.md").read_text()


def test_train_bench_fit_bisects_and_caps_memory_only_in_its_trials(monkeypatch, capsys):
    """--fit: sequence lengths double from 512 until one does not fit, then bisect to 256 tokens; only those trial
    processes get the memory cap (the timed run at the configured batch and length must not)."""
    import json
    import types
    from dataclasses import asdict

    from torch_metal_fused.bench import train

    cmds = []

    def fake_run(cmd, **_):
        cmds.append(cmd)
        seq = int(cmd[cmd.index("--seq") + 1])
        result = train.StepResult("hf", "lora", "tiny", 1, seq, "cpu", ok=seq <= 2600, peak_gib=0.1, losses=[1.0])
        return types.SimpleNamespace(stdout=json.dumps(asdict(result)), stderr="")

    monkeypatch.setattr(train.subprocess, "run", fake_run)
    train.main(["--modes", "lora", "--providers", "hf", "--device", "cpu", "--fit", "1.5"])
    caps = [float(c[c.index("--fit") + 1]) for c in cmds]
    assert caps[0] == 0.0 and all(cap == 1.5 for cap in caps[1:])
    seqs = [int(c[c.index("--seq") + 1]) for c in cmds[1:]]
    assert seqs == [512, 1024, 2048, 4096, 3072, 2560, 2816]
    assert "- lora hf: 2560" in capsys.readouterr().out


def test_overhead_pairs_compute_the_same_thing():
    """--overhead times each public op against the native op(s) it replaces: at its tiny shapes the two give the same
    values (so the table compares like with like), and the table has a row per pair with both timings."""
    from torch_metal_fused.bench import host_cost

    cpu = torch.device("cpu")
    for op, (ours, native, make) in host_cost._op_pairs(cpu).items():
        inputs = make()
        torch.testing.assert_close(ours(*inputs), native(*inputs), rtol=1e-4, atol=1e-5, msg=op)
    rows = host_cost.op_overhead_rows(cpu, calls=2)
    assert [r["op"] for r in rows] == list(host_cost._op_pairs(cpu))
    assert all(v > 0 for r in rows for k, v in r.items() if k != "op")


def _least_saved_bytes(mode: str, tokens: int) -> int:
    """What one forward of the tiny preset (batch 1) must keep for backward, in bytes: per layer the bf16 inputs of the
    two norms (the first layer's only when its weight trains: full mode), the projections' input (in LoRA modes only the
    first layer's attention input, which has no history to remake it from: every other is a norm output the LoRA op
    remakes, ops.rms_norm.NormOutput), q, k, v, the attention output, and gate and up (their product is recomputed for
    the down projection's backward: ops.glu's down_of_glu); the final norm's input and the loss's hidden rows (all but
    the last token); float32 per-token statistics (each norm's 1/rms, attention's log-sum-exp per head); LoRA's rank-16
    intermediates of the 7 adapters (in the adapters' dtype); RoPE's cos and sin; the loss's int64 targets."""
    from torch_metal_fused.bench import train

    p = train.PRESETS["tiny"]
    hidden, inter, layers, heads = p["hidden"], p["intermediate"], p["layers"], p["heads"]
    q_width, kv_width = heads * p["head_dim"], p["kv_heads"] * p["head_dim"]
    per_layer = hidden + 2 * q_width + 2 * kv_width + 2 * inter  # q, k, v, out, norm-2 input, MLP
    first_norm_inputs = layers if mode == "full" else layers - 1
    norm_outputs = 2 * layers if mode == "full" else 1
    hidden_rows = first_norm_inputs + norm_outputs + 1  # + the final norm's input
    bf16 = ((layers * per_layer + hidden_rows * hidden) * tokens + hidden * (tokens - 1)) * 2
    norms = 2 * layers + 1 - (mode != "full")
    float32 = (norms + layers * heads) * tokens * 4
    lora = 0 if mode == "full" else layers * 7 * 16 * tokens * (4 if mode == "lora" else 2)
    return bf16 + float32 + lora + 2 * p["head_dim"] * tokens * 2 + (tokens - 1) * 8


def test_train_bench_memory_counts_what_each_provider_saves_for_backward():
    """--memory on the tiny preset (CPU): the bytes one forward saves for backward, by call site. Ours with every
    patch option keeps what the step needs and no more (within 1 KiB: one extra activation-sized copy in any layer,
    8 KiB here, fails), less than Hugging Face + PEFT, in LoRA with float32 and bf16 adapters and full fine-tuning;
    each of our ops is a site of its own."""
    pytest.importorskip("peft")
    from torch_metal_fused.bench import train

    tokens = 64
    for mode in ("lora", "lora-bf16", "full"):
        totals, sites = {}, {}
        for provider in ("hf", "tmf"):
            r = train.run_worker(provider, mode, "tiny", 1, tokens, 1, 0, "cpu", memory=True)
            assert r.ok, r.error
            assert r.memory["saved"][-1][0] == "total" and "peak" not in r.memory  # the peak: CUDA's history only
            totals[provider] = r.memory["saved"][-1][1]
            sites[provider] = {site.split(":")[0] for site, _ in r.memory["saved"][:-1]}
        least = _least_saved_bytes(mode, tokens)
        assert least <= totals["tmf"] <= least + 1024 < totals["hf"], (mode, least, totals)
        ops = {"glu.py", "rms_norm.py", "attention.py", "rope.py", "cross_entropy.py"}
        assert ops | ({"linear.py"} if mode == "full" else {"lora_linear.py"}) <= sites["tmf"], sites["tmf"]


def test_train_bench_memory_finds_the_allocations_alive_at_the_peak():
    """peak_by_site replays a CUDA allocator trace: the live set at the highest total, by the innermost frame
    outside torch's machinery; frees before the peak leave it, allocations after it are not counted."""
    from torch_metal_fused.bench import train

    def frames(*sites):
        return [{"filename": f, "line": n, "name": "fn"} for f, n in sites]

    machinery = ("/x/torch/autograd/function.py", 10)
    trace = [
        {"action": "alloc", "addr": 1, "size": 3 << 20, "frames": frames(machinery, ("/m/glu.py", 5))},
        {"action": "alloc", "addr": 2, "size": 1 << 20, "frames": frames(("/m/rope.py", 7))},
        {"action": "free_requested", "addr": 2, "size": 1 << 20},
        {"action": "free_completed", "addr": 2, "size": 1 << 20},
        {"action": "alloc", "addr": 3, "size": 2 << 20, "frames": frames(("/m/glu.py", 5))},
        {"action": "alloc", "addr": 4, "size": 4 << 20, "frames": frames(("/m/lora.py", 9))},  # the peak: 9 MiB
        {"action": "free_requested", "addr": 4, "size": 4 << 20},
        {"action": "alloc", "addr": 5, "size": 3 << 20, "frames": frames(("/m/rope.py", 7))},  # 8 MiB: below it
    ]
    assert train.peak_by_site(trace) == [["glu.py:fn:5", 5 << 20], ["lora.py:fn:9", 4 << 20], ["total", 9 << 20]]
    assert train.call_site([(machinery[0], 10, "apply")]) == "(torch internals)"


def test_the_cpu_peak_is_the_held_bytes_plus_the_steps_highest_live_sum():
    """--train's memory side on a CPU: the weights' and optimizer state's bytes plus the highest running sum of what
    the step allocates and frees (two buffers alive at once count together; one freed before the next does not)."""
    from torch_metal_fused.bench import train

    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(256)).sum().backward()
    opt.step()  # momentum buffers: optimizer state of the parameters' size
    opt.zero_grad(set_to_none=True)

    def step() -> None:
        a, b = torch.empty(1 << 18), torch.empty(1 << 17)  # 1.5 MiB alive at once
        del a, b
        torch.empty(1 << 18)  # 1 MiB after they are freed

    params = (256 * 256 + 256) * 4
    assert train.cpu_step_peak_bytes(step, model, opt) == 2 * params + (1 << 20) + (1 << 19)


def test_train_bench_profile_reports_one_steps_host_and_device_time():
    """--profile (CPU, tiny preset, ours): one profiled step's wall time and its ops by host self time, our autograd
    Functions among them; no device work on a CPU; the summary renders it."""
    pytest.importorskip("peft")
    from torch_metal_fused.bench import train

    r = train.run_worker("tmf", "lora", "tiny", 1, 32, 1, 0, "cpu", profile=True)
    assert r.ok, r.error
    f = r.profile
    assert f["wall_ms"] > 0 and f["device_busy_ms"] == f["device_launches"] == 0 and f["top_device"] == []
    names = [name for name, ms, calls in f["top_host"]]
    assert 0 < len(names) <= train.PROFILE_ROWS and all(ms > 0 and calls > 0 for _, ms, calls in f["top_host"])
    assert any(name.startswith("LoRALinearFunction") for name in names), names
    assert "lora tmf: one profiled step" in train.profile_tables([r])
