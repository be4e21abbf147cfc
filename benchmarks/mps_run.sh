#!/usr/bin/env bash
# On a Mac with Apple Silicon: the first run of what no machine of this project could run. Installs the package
# (nothing is compiled: the shaders are compiled at first use by the OS's Metal compiler through
# torch.mps.compile_shader, PyTorch 2.9+), runs `python -m torch_metal_fused.doctor` (every family compiled and
# each pipeline's limits; its JSON is stored with the results), the whole test suite (its `metal`
# parameter asserts our kernels, not a fallback, served the MPS tensors) and the benchmark against the native MPS
# ops. TORCH_METAL_FUSED_STRICT=1: a fallback to the reference is an error, so nothing passes by falling back.
# Logs go to bench_results/mps-<chip>-<date>/ (not committed); the benchmark's rows go into the results ledger
# (benchmarks/results/ledger.csv, --record), which regenerates docs/results.md: commit those two, paste doctor.json
# into an issue, and update docs/status.md (and the README's status lines) from them.
set -uo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -s)" = Darwin ] || { echo "benchmarks/mps_run.sh runs on macOS (Apple Silicon)" >&2; exit 1; }
chip=$(sysctl -n machdep.cpu.brand_string | tr -c 'A-Za-z0-9\n' '-')
out=bench_results/mps-$chip-$(date +%Y-%m-%d)
mkdir -p "$out"
{
  sw_vers
  sysctl -n machdep.cpu.brand_string
} > "$out/system.txt"
export TORCH_METAL_FUSED_STRICT=1
bash tools/setup.sh > "$out/setup.log" 2>&1 || { tail -40 "$out/setup.log"; echo "setup failed: $out/setup.log" >&2; exit 1; }
python3 -c "import torch, torch_metal_fused as t; print('torch', torch.__version__, '| mps available:', \
torch.backends.mps.is_available(), '| backend:', t.backend_for(torch.empty(1, device='mps')))" | tee -a "$out/system.txt"
python3 -m torch_metal_fused.doctor --json "$out/doctor.json" 2>&1 | tee "$out/doctor.txt"
python3 -m pytest -q -rs 2>&1 | tee "$out/tests.log" | tail -25
python3 -m torch_metal_fused.bench --device mps --out "$out/bench" --record 2>"$out/bench.err" | tail -60
echo "results in $out"
