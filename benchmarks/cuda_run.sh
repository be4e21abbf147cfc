#!/usr/bin/env bash
# On the NVIDIA machine: build the CUDA extension, run the CUDA tests, compute-sanitizer, and the CUDA
# comparison benchmark (torch, Liger-Kernel from .whl/, PEFT). Usage: bash benchmarks/cuda_run.sh [steps] with steps
# from: build build-fast tests sanitize sanitize:<tool> bench bench:<ops> bench-quick lora rowbench glurope lorak ncu
# rowstores kconcat ncu-kconcat tests-kconcat lora-no-kconcat lora-gemms lora-step lora-f32 attention train memory
# profile fit overhead (default: build tests sanitize bench). CLOCK_LOG=0: no per-step clock log (the device returns 8 files).
# Results go to $OUT. rowbench: the row-kernel variants side by side without PyTorch (benchmarks/cuda_rowbench.cu)
# and Liger's kernels timed the same way (benchmarks/cuda_liger_rows.py). glurope: the SwiGLU/RoPE kernel variants
# side by side (benchmarks/cuda_glu_rope_bench.cu), then ours vs torch vs Liger through the ops
# (benchmarks/cuda_glu_rope.py). lorak: LoRA's tensor-core kernels against cuBLAS and the routes built from them
# (benchmarks/cuda_lora_kernels_bench.cu). ncu: Nsight Compute counters of the LoRA and forward row kernels.
set -uo pipefail
# 9.0a: Hopper's architecture-specific features (wgmma), which the LoRA op's K-concatenated GEMM needs when CUTLASS's
# headers are there (the nvidia-cutlass wheel in .whl/; setup.py). The other kernels compile the same for it.
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
OUT=${OUT:-$PWD/cuda_out}
mkdir -p "$OUT"
steps=${*:-build tests sanitize bench}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# cuBLAS for the standalone LoRA benchmarks, from the CUDA toolkit or from the nvidia-* wheels torch depends on: sets
# cublas_inc (its header's directory) and cublas_link (the nvcc flags that link it and find it at run time).
find_cublas() {
  local site inc lib
  site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))')
  inc=$(find /usr/local/cuda*/ $site -name cublas_v2.h 2>/dev/null | head -1)
  lib=$(find /usr/local/cuda*/ $site -name 'libcublas.so*' 2>/dev/null | grep -v Lt | head -1)
  echo "cuBLAS: $inc $lib"
  cublas_inc=$(dirname "$inc")
  cublas_link=(-Xlinker "$lib" -Xlinker -rpath,"$(dirname "$lib")")
}
# The LoRA kernel benchmark.
build_lorak() {
  find_cublas
  nvcc -O3 -std=c++20 -arch=sm_90 -I csrc/cuda -I "$cublas_inc" benchmarks/cuda_lora_kernels_bench.cu \
    "${cublas_link[@]}" -o /tmp/lorak
}
# The K-concatenated GEMM's benchmark, with CUTLASS's headers from the nvidia-cutlass wheel (.whl/).
build_kconcat() {
  local cutlass
  cutlass=$(dirname "$(find /tmp/site ${PYTHONPATH//:/ } -path '*cutlass_library/source/include' -type d 2>/dev/null | head -1)")
  [ -d "$cutlass/include/cute" ] || { echo "kconcat: no CUTLASS headers (put the nvidia-cutlass wheel in .whl/)"; return 1; }
  # One build per source state: steps kconcat and ncu-kconcat in one command share it.
  local stamp
  stamp=$(cat benchmarks/cuda_lora_kconcat_bench.cu csrc/cuda/*.cuh | md5sum | cut -c1-32)
  [ -x /tmp/kconcat ] && [ "$(cat /tmp/kconcat.stamp 2>/dev/null)" = "$stamp" ] && return 0
  find_cublas
  nvcc -O3 -DNDEBUG -std=c++20 -arch=sm_90a --expt-relaxed-constexpr -I "$cutlass/include" \
    -I "$cutlass/tools/util/include" -I csrc/cuda -I "$cublas_inc" benchmarks/cuda_lora_kconcat_bench.cu \
    "${cublas_link[@]}" -L /usr/local/cuda/lib64/stubs -lcuda -o /tmp/kconcat && echo "$stamp" > /tmp/kconcat.stamp
}
build_rowbench() { nvcc -O3 -std=c++20 -arch=sm_90 -I csrc/cuda benchmarks/cuda_rowbench.cu -o /tmp/rowbench; }
# The GPU's SM clock, power, temperature and clock-limiting reasons once a second while each step runs
# ($OUT/clocks-<step>.csv): the 2026-12-02 K-concat sweep ran on a GPU that slowed by up to 25 % after its first
# timings (cuBLAS's own GEMM beside it rose from 343 to 430 µs), which only the times showed.
clock_log_start() {
  [ "${CLOCK_LOG:-1}" = 1 ] || return 0
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 1000 > "$OUT/clocks-${1//[:,]/-}.csv" 2>&1 &
  clock_log_pid=$!
}
clock_log_stop() {
  [ -n "${clock_log_pid:-}" ] || return 0
  kill "$clock_log_pid" 2>/dev/null
  wait "$clock_log_pid" 2>/dev/null
  clock_log_pid=
}
trap clock_log_stop EXIT
trap 'clock_log_stop; exit 143' TERM INT
# Nsight Compute's sections every ncu step reads (some add more).
ncu_sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats)
for step in $steps; do
  clock_log_start "$step"
  case $step in
    build | build-fast)
      # build-fast: sm_90 without the K-concatenated GEMM (no CUTLASS: about 1 of build's 2.5 minutes), for runs
      # that test correctness only (the attention and patch suites); timings want build
      arch=$TORCH_CUDA_ARCH_LIST
      [ "$step" = build-fast ] && arch=9.0
      ( time TORCH_CUDA_ARCH_LIST=$arch TORCH_METAL_FUSED_REQUIRE_EXTENSION=1 python3 setup.py -q build_ext --inplace ) \
        > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      python3 -c "import torch, torch_metal_fused as t; print('backend:', t.backend_for(torch.empty(1, device='cuda')))"
      python3 -c "from torch_metal_fused import _C; print('LoRA K-concatenated GEMM:', _C.lora_kconcat_mode())"
      ;;
    tests)
      python3 -m pytest -q -x tests -k "cuda" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
      ;;
    tests-kconcat)
      # The LoRA op's K-concatenated route for every eligible shape (by default only large ones take it, and the tests'
      # shapes are small): the LoRA, patch and autocast tests again
      TORCH_METAL_FUSED_LORA_KCONCAT=1 python3 -m pytest -q -x tests/test_lora_linear.py tests/test_patch.py \
        tests/test_autocast.py -k "cuda" -p no:cacheprovider 2>&1 | tee "$OUT/tests-kconcat.log" | tail -15
      ;;
    sanitize | sanitize:*)
      # sanitize:memcheck runs one tool
      tools=${step#sanitize}
      tools=${tools#:}
      for tool in ${tools:-memcheck racecheck}; do
        # racecheck reports hazards inside cuBLAS's own GEMM kernels (nvjet_*) at the LoRA cases with 1100 tokens;
        # excluding them (--kernel-name-exclude kns=nvjet) made the sanitizer fail in a cuBLAS GEMM instead
        # (docs/status.md, compute-sanitizer), so the summary line counts the reports
        # outside them. Without PyTorch's caching allocator each tensor is its own allocation, so an overrun past
        # it is reported.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 \
          python3 benchmarks/cuda_sanitize_ops.py > "$OUT/sanitize_$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitize_$tool.log") clean summaries," \
          "$(grep 'Error:' "$OUT/sanitize_$tool.log" | grep -vc 'nvjet_') reports outside cuBLAS's nvjet kernels)"
        tail -3 "$OUT/sanitize_$tool.log"
      done
      ;;
    bench | bench:*)
      # bench:<ops> runs part of the suite (e.g. bench:softmax,rms_norm), so each part fits one 10-minute command
      ops=${step#bench}
      ops=${ops#:}
      # --record: the rows go to $OUT/ledger.csv; `python3 -m torch_metal_fused.bench.results --add` puts them in the
      # checkout's ledger (benchmarks/results/ledger.csv) and regenerates docs/results.md.
      python3 -m torch_metal_fused.bench --device cuda --suite cuda --dtypes bfloat16,float32 ${ops:+--ops $ops} \
        --modes forward,forward_backward --out "$OUT/bench${ops:+-${ops//,/-}}" --no-plots \
        --record "$OUT/ledger.csv" 2>"$OUT/bench.err" | tail -80
      ;;
    lora)
      # LoRA through the op (ours, eager, PEFT, the base GEMMs), bf16: benchmarks/cuda_lora_bench.py
      python3 benchmarks/cuda_lora_bench.py --out "$OUT/lora" --dtypes bfloat16 2>&1 | tail -40
      ;;
    lora-no-kconcat)
      # the same without the op's K-concatenated route (the routes it replaces at the large shapes)
      TORCH_METAL_FUSED_LORA_KCONCAT=0 python3 benchmarks/cuda_lora_bench.py --out "$OUT/lora-no-kconcat" \
        --dtypes bfloat16 2>&1 | tail -40
      ;;
    lora-gemms)
      # the K-concatenated GEMM's two configurations through the op, each forced at the four large bf16 shapes, ours
      # and the base GEMMs only, in the order cooperative, ping-pong, ping-pong, cooperative (linear drift cancels in
      # the two runs' mean); each run first checks that the route is on and the configuration is the forced one
      gemm_runs=0
      for gemm in cooperative pingpong pingpong cooperative; do
        run=$gemm-$((++gemm_runs))
        TORCH_METAL_FUSED_LORA_KCONCAT_GEMM=$gemm python3 -c "
from torch_metal_fused import _C
got = {_C.lora_kconcat_gemm_for(8192, 4096), _C.lora_kconcat_gemm_for(2048, 11008)}
print('$run: route', _C.lora_kconcat_mode(), 'configuration', got)
assert _C.HAS_LORA_KCONCAT and _C.lora_kconcat_mode() == 'by_size' and got == {'$gemm'}" || continue
        TORCH_METAL_FUSED_LORA_KCONCAT_GEMM=$gemm python3 benchmarks/cuda_lora_bench.py --dtypes bfloat16 \
          --providers fused --shapes "8192,4096,4096,16;8192,4096,4096,64;2048,4096,11008,16;2048,4096,11008,64" \
          --out "$OUT/lora-$run" > "$OUT/lora-$run.log" 2>&1
        echo "$run: exit $?"
        grep -E "^\| bfloat16" "$OUT/lora-$run.log" | sed "s/^/$run /"
        # the op's launches went to the forced configuration (launch counts: both compute the same numbers)
        [ "$gemm_runs" -le 2 ] && TORCH_METAL_FUSED_LORA_KCONCAT_GEMM=$gemm python3 -m pytest -q \
          tests/test_lora_linear.py -k "runs_the_configuration_chosen and cuda" -p no:cacheprovider 2>&1 | tail -1
      done
      ;;
    rowbench)
      build_rowbench && /tmp/rowbench 30 2>&1 | tee "$OUT/rowbench.txt"
      python3 benchmarks/cuda_liger_rows.py 2>&1 | tee "$OUT/liger_rows.txt"
      ;;
    glurope)
      nvcc -O3 -std=c++20 -arch=sm_90 -I csrc/cuda -I csrc/include benchmarks/cuda_glu_rope_bench.cu -o /tmp/glurope &&
        /tmp/glurope 2>&1 | tee "$OUT/glu_rope_variants.txt"
      python3 benchmarks/cuda_glu_rope.py 2>&1 | tee "$OUT/glu_rope.txt"
      ;;
    lorak | lorak:*)
      # lorak:pipelined times only the two-stream routes (to lora_kernels-pipelined.txt)
      step=${step/:/-}
      build_lorak && /tmp/lorak 20 ${step#lorak-} 2>&1 | tee "$OUT/lora_kernels${step#lorak}.txt"
      ;;
    kconcat)
      # LoRA's base GEMM over K-concatenated operands (CUTLASS's Hopper GEMM with our producer) against cuBLAS and the
      # op's routes: benchmarks/cuda_lora_kconcat_bench.cu. Needs CUTLASS's headers: the nvidia-cutlass wheel in .whl/.
      build_kconcat && /tmp/kconcat 20 2>&1 | tee "$OUT/lora_kconcat.txt"
      ;;
    lora-step)
      # one LoRA training step through the op at 8192x4096->4096 r16 and 2048x4096->11008 r16, kernel by kernel
      # (torch.profiler), on each configuration of the K-concatenated GEMM, then Nsight Compute on one step of each
      # at 8192 tokens (benchmarks/cuda_lora_step.py)
      for shape in 8192,4096,4096,16 2048,4096,11008,16; do
        for gemm in cooperative pingpong; do
          echo "== $shape $gemm"
          TORCH_METAL_FUSED_LORA_KCONCAT_GEMM=$gemm python3 benchmarks/cuda_lora_step.py --shape $shape 2>&1 |
            tee "$OUT/lora-step-$shape-$gemm.txt" | head -20
        done
      done
      sections=("${ncu_sections[@]}")
      for gemm in cooperative pingpong; do
        TORCH_METAL_FUSED_LORA_KCONCAT_GEMM=$gemm ncu --clock-control none --profile-from-start off "${sections[@]}" \
          python3 benchmarks/cuda_lora_step.py --ncu > "$OUT/ncu-lora-step-$gemm.txt" 2>&1
        echo "ncu lora-step $gemm: exit $? ($(grep -c 'Duration' "$OUT/ncu-lora-step-$gemm.txt") kernel reports)"
        grep -E "^  [A-Za-z_].*Context|Duration|DRAM Throughput|Compute \(SM\) Throughput" \
          "$OUT/ncu-lora-step-$gemm.txt" | cut -c1-120
      done
      ;;
    ncu-kconcat)
      # Nsight Compute on that benchmark's GEMMs launched once at the r16 target shapes: cuBLAS's kernel (nvjet_*, its
      # name giving tile, stages and cluster) beside CUTLASS's (device_kernel), to find the 2-7 % between them.
      sections=("${ncu_sections[@]}" --section LaunchStats)
      build_kconcat && ncu --clock-control none --kernel-name regex:'nvjet|device_kernel' --launch-count 40 \
        "${sections[@]}" /tmp/kconcat ncu > "$OUT/ncu_kconcat.txt" 2>&1
      echo "ncu kconcat: exit $? ($(grep -c 'Duration' "$OUT/ncu_kconcat.txt") kernel reports)"
      grep -E "^  (void )?[A-Za-z_:]*(nvjet|device_kernel)|Duration|Memory Throughput|Compute \(SM\) Throughput" \
        "$OUT/ncu_kconcat.txt" | cut -c1-160
      ;;
    ncu)
      # Hardware counters (Nsight Compute reads them on the Firecracker machines; clocks left alone): our LoRA
      # kernels' first launches at 8192x4096->4096 r16, and the forward row kernels at 8192x4096 bf16 beside
      # Liger's RMSNorm forward, to explain the gaps the timings show (docs/cuda.md).
      sections=("${ncu_sections[@]}" --section SchedulerStats --section LaunchStats)
      build_lorak && ncu --clock-control none --kernel-name regex:lora_ --launch-count 5 "${sections[@]}" \
        /tmp/lorak 1 ncu > "$OUT/ncu_lora.txt" 2>&1
      echo "ncu lora: exit $? ($(grep -c 'Duration' "$OUT/ncu_lora.txt") kernel reports)"
      build_rowbench && ncu --clock-control none "${sections[@]}" /tmp/rowbench ncu-fwd > "$OUT/ncu_rows.txt" 2>&1
      echo "ncu rows: exit $? ($(grep -c 'Duration' "$OUT/ncu_rows.txt") kernel reports)"
      ncu --clock-control none --kernel-name regex:rms_norm_forward --launch-count 1 "${sections[@]}" python3 -c "
import torch; from liger_kernel.ops import rms_norm as lr
x = torch.randn(8192, 4096, device='cuda', dtype=torch.bfloat16); w = torch.rand(4096, device='cuda', dtype=x.dtype)
lr.rms_norm_forward(x, w, 1e-6, 0.0, 'llama', None); torch.cuda.synchronize()" > "$OUT/ncu_liger_rms.txt" 2>&1
      echo "ncu liger rmsnorm: exit $? ($(grep -c 'Duration' "$OUT/ncu_liger_rms.txt") kernel reports)"
      ;;
    rowstores)
      # The row kernels' outputs with streaming stores (__stcs, the build's) against default write-back stores
      # (-DTMF_ROW_STORE_WB, as Liger's RMSNorm and softmax backward write), #14's target shapes, Liger beside them.
      build_rowbench && nvcc -O3 -std=c++20 -arch=sm_90 -DTMF_ROW_STORE_WB -I csrc/cuda benchmarks/cuda_rowbench.cu \
        -o /tmp/rowbench_wb || exit 1
      /tmp/rowbench 30 targets > "$OUT/rowbench_stcs.txt" 2>&1
      /tmp/rowbench_wb 30 targets > "$OUT/rowbench_wb.txt" 2>&1
      python3 benchmarks/cuda_liger_rows.py > "$OUT/liger_rows.txt" 2>&1
      echo "streaming stores:"; grep -E "PROD|fused" "$OUT/rowbench_stcs.txt"
      echo "write-back stores:"; grep -E "PROD|fused" "$OUT/rowbench_wb.txt"
      echo "Liger:"; cat "$OUT/liger_rows.txt"
      ;;
    lora-f32)
      # #30: float32 adapters on 16-bit activations (PEFT's default): the CUDA tests, then the composition's error
      python3 -m pytest -q tests/test_lora_linear.py tests/test_patch.py tests/test_glu.py -k "cuda" -p no:cacheprovider 2>&1 \
        | tee "$OUT/tests-lora.log" | tail -8
      python3 benchmarks/cuda_lora_float32_adapters.py 2>&1 | tee "$OUT/lora_f32.txt"
      ;;
    attention)
      # the contract, then the Hugging Face models patched with attention=True (20-step convergence included); the
      # suite selects the CUDA backend only with the extension built (step build first)
      python3 -c "from torch_metal_fused import _C" 2>/dev/null || { echo "attention: no extension: run build first"; clock_log_stop; continue; }
      python3 -m pytest -q tests/test_attention.py tests/test_attention_hf.py -k "cuda" -p no:cacheprovider 2>&1 \
        | tee "$OUT/tests-attention.log" | tail -8
      ;;
    train)
      # #30's table: whole training steps, llama-1b, 4 x 2048 tokens (needs PEFT and Liger in .whl/)
      # Ledger rows to $OUT/train (merge: tail -n +2 "$OUT"/train/ledger.csv >> benchmarks/results/ledger.csv)
      # TRAIN_MODES / TRAIN_PROVIDERS: part of the table (a short device session)
      python3 -m torch_metal_fused.bench --train --modes "${TRAIN_MODES:-lora,lora-bf16,full}" \
        --providers "${TRAIN_PROVIDERS:-hf,tmf,liger}" --out "$OUT/train" --record "$OUT/train/ledger.csv"
      ;;
    memory)
      # #30's peak-memory gap to Liger: one more step per provider with what it saves for backward and what is alive at
      # its peak, by call site (torch.cuda.memory's allocation history); bf16 adapters and full mode, ours and Liger
      python3 -m torch_metal_fused.bench --train --modes "${TRAIN_MODES:-lora-bf16,full}" \
        --providers "${TRAIN_PROVIDERS:-tmf,liger}" --steps 3 --warmup 2 --memory --out "$OUT/memory" 2>&1 | tail -40
      ;;
    profile)
      # #30's float32-adapter gap: one profiled step per provider (device busy against wall time, the top kernels and
      # host ops), LoRA with PEFT's defaults and with bf16 adapters, ours and Liger
      python3 -m torch_metal_fused.bench --train --modes "${TRAIN_MODES:-lora,lora-bf16}" \
        --providers "${TRAIN_PROVIDERS:-tmf,liger}" --steps 3 --warmup 2 --profile --out "$OUT/profile" 2>&1 | tail -40
      ;;
    fit)
      python3 -m torch_metal_fused.bench --train --modes lora --providers hf,tmf --fit 24 --steps 3 --out "$OUT/fit" \
        --record "$OUT/fit/ledger.csv"
      ;;
    overhead)
      python3 -m torch_metal_fused.bench --overhead --device cuda 2>&1 | tee "$OUT/overhead.txt"
      ;;
    bench-quick)
      python3 -m torch_metal_fused.bench --device cuda --quick --dtypes bfloat16 --out "$OUT/bench" --no-plots \
        2>"$OUT/bench.err" | tail -40
      ;;
  esac
  clock_log_stop
done
