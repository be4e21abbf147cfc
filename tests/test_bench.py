"""The benchmark command: --quick --device cpu produces every output file with the expected columns."""

import csv
import json

import pytest

from torch_metal_fused.bench.__main__ import main
from torch_metal_fused.bench.run import CSV_COLUMNS, EMULATED_COLUMNS


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
