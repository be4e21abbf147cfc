"""Memory bandwidth of Apple GPUs, for the emulated report's floor projection: bytes moved ÷ copy bandwidth.

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
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_BENCHMARKS = "chsasank/device-benchmarks"
APPLE = "Apple, 2024-10-30; no public copy measurement"


@dataclass(frozen=True)
class Chip:
    name: str
    copy_gbps: float  # what the floor divides by: measured where a public measurement exists, else advertised
    kind: str  # "measured copy", "measured attainable" or "advertised"
    advertised_gbps: float
    source: str

    @property
    def key(self) -> str:
        """The chip's name in column names: floor_us_<key>."""
        return self.name.replace(" ", "_")

    def floor_us(self, nbytes: float) -> float:
        """nbytes ÷ copy bandwidth, in µs: a floor from a bandwidth model, not a measurement."""
        return nbytes / (self.copy_gbps * 1e9) * 1e6

    def describe(self) -> str:
        if self.kind == "advertised":
            return f"{self.name}: {self.copy_gbps:g} GB/s, advertised ({self.source}): an optimistic floor"
        return f"{self.name}: {self.copy_gbps:g} GB/s, {self.kind} ({self.source}); advertised {self.advertised_gbps:g}"


CHIPS: tuple[Chip, ...] = (
    Chip("M1", 56, "measured copy", 68.25, DEVICE_BENCHMARKS),
    Chip("M1 Pro", 176, "measured copy", 204.8, f"{DEVICE_BENCHMARKS}, 16-core GPU"),
    Chip("M1 Max", 317.6, "measured attainable", 409.6, "llama.cpp PR #1642"),
    Chip("M2", 90, "measured copy", 102.4, DEVICE_BENCHMARKS),
    Chip("M2 Ultra", 636, "measured copy", 819.2, f"{DEVICE_BENCHMARKS}, 76-core GPU"),
    Chip("M3 Max", 318, "measured copy", 400, f"{DEVICE_BENCHMARKS}, 40-core GPU"),
    Chip("M4", 120, "advertised", 120, APPLE),
    Chip("M4 Pro", 273, "advertised", 273, APPLE),
    Chip("M4 Max", 396, "measured copy", 546, f"{DEVICE_BENCHMARKS}, 40-core GPU"),
)
# The chips whose floors the terminal table shows (all of them are in results.csv/json): a base chip and the
# largest measured Max of two generations, all with measured copy figures.
DEFAULT_TABLE_CHIPS = ("M1", "M3 Max", "M4 Max")


def by_name(name: str) -> Chip:
    for chip in CHIPS:
        if chip.name.lower() == name.strip().lower() or chip.key.lower() == name.strip().lower():
            return chip
    raise KeyError(f"unknown chip {name!r} (choose from {', '.join(c.name for c in CHIPS)})")
