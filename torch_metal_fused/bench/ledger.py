"""The results ledger: one CSV of every measurement the project cites (benchmarks/results/ledger.csv).

`python -m torch_metal_fused.bench --record` appends a run's rows; `python -m torch_metal_fused.bench.results`
renders docs/results.md from it. One row is one provider's timing (or, on the Metal-on-CPU harness, byte count) of one
op, dtype, shape and mode in one run. `COLUMNS` is the schema: docs/results.md prints it.
"""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Iterable
from pathlib import Path

# (column, meaning). The order is the CSV's.
SCHEMA: list[tuple[str, str]] = [
    (
        "run",
        "the run the row belongs to: the benchmark's UTC start time, or a name for rows converted from older files",
    ),
    ("date", "the run's date (UTC), YYYY-MM-DD"),
    ("commit", "the commit measured (short hash; '+' when the tree had uncommitted changes; empty when unknown)"),
    ("device", "the device, as torch names it ('NVIDIA H200'), or 'Metal-on-CPU harness' for counted rows"),
    ("torch", "torch version"),
    ("source", "what produced the row: 'bench' (python -m torch_metal_fused.bench) or a script under benchmarks/"),
    ("op", "the op as the benchmark names it (softmax, rms_norm, lora, ...), or op.part for one product of an op"),
    (
        "provider",
        "fused (ours), torch, liger, peft, eager, matmul (the base GEMM), hf_eager, sdpa, cublas, "
        "cutlass, composition (a route built in a script), ours_unfused (our kernels for the unfused steps)",
    ),
    ("backend", "what served the provider: cuda, metal, metal-emulated, reference, native"),
    ("dtype", "float32, float16 or bfloat16"),
    ("shape", "the benchmark's shape string (rows x cols; LoRA tokens x in x out x rank; ...)"),
    ("mode", "forward, backward or forward_backward"),
    (
        "level",
        "op (the public op, autograd included), kernel (kernels launched alone), composition (a route built "
        "from library calls in a script)",
    ),
    (
        "method",
        "cuda-events-cold (CUDA events per call, 1 GiB or 512 MB cleared before each), profiler (kernel time "
        "from the profiler), wall (host clock, back-to-back calls), mps-back-to-back, host-clock, counted (harness: "
        "bytes, no time)",
    ),
    ("variant", "a build or launch setting other than the shipped one ('' = as shipped at that commit)"),
    ("p20_us", "20th percentile, µs"),
    ("p50_us", "median, µs"),
    ("p80_us", "80th percentile, µs"),
    ("bytes", "minimum bytes: each input read once, each output written once"),
    ("pct_floor", "% of the bandwidth floor: (bytes ÷ p50) ÷ copy_gbps"),
    ("copy_gbps", "the device's copy bandwidth measured in the same run, GB/s (read + written)"),
    ("bytes_moved", "device bytes the kernels read and wrote, counted by the harness (counted rows)"),
    ("peak_mb", "peak memory of one call above what was allocated before it, MiB (MPS: what one call left allocated)"),
    ("note", "anything else the row needs to be read right"),
]
COLUMNS = [name for name, _ in SCHEMA]

# The checkout's ledger, where the package runs from a source tree (an installed wheel has none).
REPO = Path(__file__).resolve().parents[2]
DEFAULT_LEDGER = REPO / "benchmarks" / "results" / "ledger.csv"
DEFAULT_RESULTS_MD = REPO / "docs" / "results.md"

_DIGITS = {"p20_us": 2, "p50_us": 2, "p80_us": 2, "pct_floor": 1, "copy_gbps": 0, "peak_mb": 1}
_INTS = {"bytes", "bytes_moved"}


def _cell(column: str, value) -> str:
    if value is None or value == "":
        return ""
    if column in _DIGITS:
        return f"{float(value):.{_DIGITS[column]}f}"
    if column in _INTS:
        return str(round(float(value)))
    return str(value)


def normalise(row: dict) -> dict[str, str]:
    """The row as the CSV holds it: every column, numbers at the ledger's precision, unknown keys refused."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not ledger columns: {sorted(unknown)}")
    return {c: _cell(c, row.get(c)) for c in COLUMNS}


def read(path: Path = DEFAULT_LEDGER) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the ledger's {COLUMNS}")
        return list(reader)


def append(rows: Iterable[dict], path: Path = DEFAULT_LEDGER) -> int:
    """Append rows (creating the file with its header); returns how many."""
    rows = [normalise(r) for r in rows]
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        read(path)  # refuse to append to a file of another schema
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerows(rows)
    return len(rows)


def current_commit(repo: Path = REPO) -> str:
    """The checkout's short commit, with '+' when tracked files differ from it; '' outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty else "")


def method_for(device_type: str, emulated: bool) -> str:
    if emulated:
        return "counted"
    return {"cuda": "cuda-events-cold", "mps": "mps-back-to-back"}.get(device_type, "host-clock")


def bench_rows(rows: list[dict], *, emulated: bool, copy_gbps: float | None, commit: str) -> list[dict]:
    """Ledger rows from the benchmark's result rows (run.py's CSV rows). Rows that failed, and emulated rows with no
    Metal dispatch, are left out."""
    out = []
    for r in rows:
        if r.get("error"):
            continue
        if emulated and not r.get("bytes_moved"):
            continue
        if not emulated and r.get("median_us") is None:
            continue
        stamp = r["timestamp"]
        out.append(
            {
                "run": stamp,
                "date": stamp[:10],
                "commit": commit,
                "device": "Metal-on-CPU harness" if emulated else r["device_name"],
                "torch": r["torch_version"],
                "source": "bench",
                "op": r["op"],
                "provider": r["provider"],
                "backend": r["backend"],
                "dtype": r["dtype"],
                "shape": r["shape"],
                "mode": r["mode"],
                "level": "op",
                "method": method_for(r["device"], emulated),
                "variant": "",
                "p20_us": r.get("p20_us"),
                "p50_us": r.get("median_us"),
                "p80_us": r.get("p80_us"),
                "bytes": r.get("min_bytes"),
                "pct_floor": r.get("pct_copy_bw"),
                "copy_gbps": None if emulated else copy_gbps,
                "bytes_moved": r.get("bytes_moved"),
                "peak_mb": r.get("peak_memory_mb"),
                "note": r.get("note") or "",
            }
        )
    return out
