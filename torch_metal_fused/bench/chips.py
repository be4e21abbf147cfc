"""Memory bandwidth and arithmetic peak of Apple GPUs, for the emulated report's floors: bytes moved ÷ copy bandwidth,
and (attention) FLOPs ÷ the GPU's peak matrix rate.

The projection is a model, not a measurement: the time a kernel would take if it moved its bytes at the speed of a
large device-to-device copy on that chip. No Apple GPU ran anything here. Real kernels take longer (dispatch and
synchronisation latency, occupancy, caches), and small shapes are latency-bound, far from this floor.

Figures: the project's notes (`shared/notes/apple-gpus.md` in the folder that holds this repository, research of
2026-12, "Apple GPUs: the numbers our Metal kernels are judged against"), each re-checked against the public source
named beside it:

- measured copy: chsasank/device-benchmarks, README table "Memory Bandwidth (GB/s)", rows "Apple <chip> GPU"
  (https://github.com/chsasank/device-benchmarks; M4 Max added by PR #13, 2025-04). benchmark.py times
  `a.copy_(b)` on the MPS device for tensors up to ~380 MB and counts 2 x the tensor's bytes (read + written),
  as our own `copy_bandwidth_gbps` does.
- measured attainable (M1 Max): Philip Turner's table in llama.cpp PR #1642 ("llama : Metal inference",
  comment of 2023-06-04, https://github.com/ggml-org/llama.cpp/pull/1642): 317.6 GB/s attainable on the M1 Max GPU.
- advertised: Apple's figures (the LPDDR arithmetic where Apple rounds: 68.25, 204.8 for "200", 409.6 for "400",
  102.4 for "100", 819.2 for "800"); M4, M4 Pro and M4 Max from Apple's newsroom of 2024-10-30 ("Apple
  introduces M4 Pro and M4 Max": 120, 273 and up to 546 GB/s; the 32-core-GPU M4 Max has 410). Used only where
  no measured copy figure exists (M4, M4 Pro), which makes those floors optimistic (copies reach 73-88 % of the
  advertised figure on the chips measured).

Compute floor (attention), a model as well: FLOPs ÷ the GPU's peak FP32 rate, cores x clock x 256 FLOPs per
core-cycle. The project's notes (`shared/notes/apple-gpus.md`) have no FLOPS or simdgroup_matrix figures (checked
2026-12), so these come from public sources only:

- 256 FP32 (and FP16: the same rate) FLOPs per core-cycle, 128 FMA lanes, from the M1 (Apple 7) on, and
  `simdgroup_matrix` running on those same FP32 pipelines (no separate matrix unit): philipturner/metal-benchmarks,
  README "Operations per Second" (https://github.com/philipturner/metal-benchmarks). Our attention kernels multiply
  8x8 `simdgroup_float8x8` matrices (float32 in every input dtype), so one rate serves every dtype. The same README
  measured 101.7 FP32 (102.5 FP16) matrix FMAs per core-cycle inside a matmul kernel on M1/A15 (~80 % of the peak);
  metal-flash-attention reports 87 % (FP32) and 93 % (FP16) of the ALU peak for its GEMMs: real kernels sit above
  this floor by at least that factor.
- clocks: philipturner/applegpuinfo (https://github.com/philipturner/applegpuinfo, Sources/AppleGPUInfo/
  AppleGPUInfo.swift): M1 1.278 GHz, M1 Pro/Max 1.296, M2 family 1.398, M3 family 1.380. With them the peaks
  reproduce Apple's advertised ones: M1 2.6 TFLOPS (8-core GPU; Apple, 2020-11-10), M1 Pro 5.2 (16-core) and M1
  Max 10.4 (32-core; Apple, 2021-10-18).
- GPU cores: Apple's specifications (the configuration each bandwidth figure above was measured on where named;
  the largest otherwise: M1 8, M2 10).
- M4, M4 Pro, M4 Max: no clock figure we can cite (Apple publishes none; applegpuinfo treats the M4 generation as the
  M3's, and third-party spec databases disagree), so no compute floor is given for them (None, shown as "–").
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_BENCHMARKS = "chsasank/device-benchmarks"
APPLE = "Apple, 2024-10-30; no public copy measurement"
APPLEGPUINFO = "philipturner/applegpuinfo"
# FP32 FLOPs per GPU core per clock: 128 FMA lanes x 2 (philipturner/metal-benchmarks); simdgroup_matrix runs on them.
FLOPS_PER_CORE_CYCLE = 256


@dataclass(frozen=True)
class Chip:
    name: str
    copy_gbps: float  # what the floor divides by: measured where a public measurement exists, else advertised
    kind: str  # "measured copy", "measured attainable" or "advertised"
    advertised_gbps: float
    source: str
    gpu_cores: int
    gpu_ghz: float | None = None  # None: no clock figure we can cite (no compute floor)
    clock_source: str = ""

    @property
    def key(self) -> str:
        """The chip's name in column names: floor_us_<key>."""
        return self.name.replace(" ", "_")

    def floor_us(self, nbytes: float) -> float:
        """nbytes ÷ copy bandwidth, in µs: a floor from a bandwidth model, not a measurement."""
        return nbytes / (self.copy_gbps * 1e9) * 1e6

    @property
    def peak_tflops(self) -> float | None:
        """cores x clock x 256 FLOPs per core-cycle: the FP32 (= FP16) ALU peak, which simdgroup_matrix shares."""
        return None if self.gpu_ghz is None else self.gpu_cores * self.gpu_ghz * FLOPS_PER_CORE_CYCLE / 1e3

    def compute_floor_us(self, flops: float) -> float | None:
        """flops ÷ the peak matrix rate, in µs: a floor from a compute model, not a measurement (None: no clock)."""
        peak = self.peak_tflops
        return None if peak is None else flops / (peak * 1e12) * 1e6

    def describe_compute(self) -> str:
        if self.peak_tflops is None:
            return f"{self.name} ({self.gpu_cores}-core GPU): no citable GPU clock, no compute floor"
        return (
            f"{self.name}: {self.peak_tflops:.2f} TFLOPS = {self.gpu_cores} cores x {self.gpu_ghz:g} GHz x "
            f"{FLOPS_PER_CORE_CYCLE} FLOPs/core-cycle ({self.clock_source})"
        )

    def describe(self) -> str:
        if self.kind == "advertised":
            return f"{self.name}: {self.copy_gbps:g} GB/s, advertised ({self.source}): an optimistic floor"
        return f"{self.name}: {self.copy_gbps:g} GB/s, {self.kind} ({self.source}); advertised {self.advertised_gbps:g}"


CHIPS: tuple[Chip, ...] = (
    Chip("M1", 56, "measured copy", 68.25, DEVICE_BENCHMARKS, 8, 1.278, APPLEGPUINFO),
    Chip("M1 Pro", 176, "measured copy", 204.8, f"{DEVICE_BENCHMARKS}, 16-core GPU", 16, 1.296, APPLEGPUINFO),
    Chip("M1 Max", 317.6, "measured attainable", 409.6, "llama.cpp PR #1642", 32, 1.296, APPLEGPUINFO),
    Chip("M2", 90, "measured copy", 102.4, DEVICE_BENCHMARKS, 10, 1.398, APPLEGPUINFO),
    Chip("M2 Ultra", 636, "measured copy", 819.2, f"{DEVICE_BENCHMARKS}, 76-core GPU", 76, 1.398, APPLEGPUINFO),
    Chip("M3 Max", 318, "measured copy", 400, f"{DEVICE_BENCHMARKS}, 40-core GPU", 40, 1.380, APPLEGPUINFO),
    Chip("M4", 120, "advertised", 120, APPLE, 10),
    Chip("M4 Pro", 273, "advertised", 273, APPLE, 20),
    Chip("M4 Max", 396, "measured copy", 546, f"{DEVICE_BENCHMARKS}, 40-core GPU", 40),
)
# The chips whose floors the terminal table shows (all of them are in results.csv/json): a base chip and the
# largest measured Max of two generations, all with measured copy figures.
DEFAULT_TABLE_CHIPS = ("M1", "M3 Max", "M4 Max")


def by_name(name: str) -> Chip:
    for chip in CHIPS:
        if chip.name.lower() == name.strip().lower() or chip.key.lower() == name.strip().lower():
            return chip
    raise KeyError(f"unknown chip {name!r} (choose from {', '.join(c.name for c in CHIPS)})")
