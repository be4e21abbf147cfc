"""The Metal-on-CPU harness's own semantics: SIMD-group operations (partial groups, divergence), barrier
ordering, half/bfloat conversions, vector swizzles and constructors, grid positions and threadgroup
arguments, and the limits it enforces."""

import math
from pathlib import Path

import pytest
import torch

from torch_metal_fused.emulator import runner
from torch_metal_fused.emulator.build import compile_libraries

pytestmark = pytest.mark.emulated
SHADER = Path(__file__).parent / "emulator_shaders" / "semantics.metal"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return runner.Harness(compile_libraries(tmp_path_factory.mktemp("semantics"), [SHADER]))


@pytest.fixture(params=[False, True], ids=["plain", "checked"])
def mode(request):
    with runner.checking(request.param):
        yield request.param


def _groups(n):
    return [list(range(s, min(s + 32, n))) for s in range(0, n, 32)]


def test_simd_ops_on_full_and_partial_groups(harness, mode):
    n = 40  # one full SIMD-group and one of 8 lanes
    inp = torch.arange(n, dtype=torch.float32) * 0.5 + 1.0
    inp[3] = -2.0
    out = torch.full((n, 10), float("nan"))
    harness.dispatch("simd_ops", {0: inp, 1: out}, (1, 1, 1), (n, 1, 1))
    for lanes in _groups(n):
        vals = inp[lanes]
        for k, t in enumerate(lanes):
            lane = k
            assert out[t, 0] == pytest.approx(vals.sum().item())
            assert out[t, 1] == vals.max()
            assert out[t, 2] == vals.min()
            assert out[t, 3] == pytest.approx(vals[:lane].sum().item())
            assert out[t, 4] == pytest.approx(vals[: lane + 1].sum().item())
            assert out[t, 5] == vals[lane ^ 1]
            assert out[t, 6] == vals[2]
            assert out[t, 7] == (1.0 if lane == 0 else 0.0)
            assert out[t, 8] == float(bool((vals > 30.5).any()))
            assert out[t, 9] == float(bool((vals >= 0).all()))


def _same(got: float, expected: float) -> bool:
    return got == expected or (math.isnan(expected) and math.isnan(got))


def _max_dropping_nan(values: torch.Tensor, largest: bool) -> float:
    finite = values[~torch.isnan(values)]
    if finite.numel() == 0:
        return float("nan")
    return float(finite.max() if largest else finite.min())


def test_max_min_and_simd_max_min_drop_nan(harness, mode):
    """max/min/fmax/fmin (scalar, float2, half), clamp and simd_max/simd_min return the other operand where one is
    NaN, NaN only where all are: Metal's documented fmax/fmin semantics. A kernel that needs a NaN to reach its
    output must carry it through a sum (tests/nan_inf.py: every kernel checked against torch's NaN/inf)."""
    nan, inf = float("nan"), float("inf")
    n = 72  # SIMD-group 0: a NaN among finite lanes; 1: NaN in every lane; 2 (8 lanes, partial): NaN and +-inf
    g = torch.Generator().manual_seed(5)
    a = torch.randn(n, generator=g)
    a[[3, 17, 31]] = nan
    a[32:64] = nan
    a[64:72] = torch.tensor([nan, -inf, 0.5, nan, inf, -2.0, nan, 0.25])
    b = torch.randn(n, generator=g)
    b[[0, 3, 40]] = nan  # lane 3: both NaN
    b[65] = inf
    out = torch.full((n, 10), 123.0)
    out_h = torch.full((n, 2), 123.0, dtype=torch.float16)
    harness.dispatch("nan_max_min", {0: a, 1: b, 2: out, 3: out_h}, (1, 1, 1), (n, 1, 1))
    for t in range(n):
        pair = torch.tensor([a[t].item(), b[t].item()])
        hi, lo = _max_dropping_nan(pair, True), _max_dropping_nan(pair, False)
        got = out[t].tolist()
        expected = [hi, lo, hi, lo, hi, lo]
        for k, e in enumerate(expected):
            assert _same(got[k], e), f"thread {t}, output {k}: {got[k]} != {e}"
        half_hi = _max_dropping_nan(pair.half().float(), True)
        assert _same(got[8], half_hi), f"thread {t}: half max {got[8]}"
        clamped = -1.0 if math.isnan(a[t]) else min(max(a[t].item(), -1.0), 1.0)
        assert got[9] == clamped, f"thread {t}: clamp {got[9]}"
    for lanes in _groups(n):
        vals = a[lanes]
        hi, lo = _max_dropping_nan(vals, True), _max_dropping_nan(vals, False)
        for t in lanes:
            for k, e in ((6, hi), (7, lo)):
                got = out[t, k].item()
                assert _same(got, e), f"thread {t}, simd output {k}: {got} != {e}"
            halves = vals.half().float()
            for k, e in ((0, _max_dropping_nan(halves, True)), (1, _max_dropping_nan(halves, False))):
                got = out_h[t, k].item()
                assert _same(got, e), f"thread {t}, half simd output {k}: {got} != {e}"


def test_simd_shuffle_down_up_keep_values_outside_the_group(harness, mode):
    inp = torch.randn(64)
    out = torch.empty(64, 2)
    harness.dispatch("simd_shifts", {0: inp, 1: out}, (1, 1, 1), (64, 1, 1))
    for t in range(64):
        lane = t % 32
        assert out[t, 0] == (inp[t + 3] if lane + 3 < 32 else inp[t])
        assert out[t, 1] == (inp[t - 5] if lane >= 5 else inp[t])


def test_simd_ops_under_divergence_group_by_call_site(harness, mode):
    n = 50
    inp = torch.randn(n)
    out = torch.empty(n)
    harness.dispatch("simd_divergent", {0: inp, 1: out}, (1, 1, 1), (n, 1, 1))
    for lanes in _groups(n):
        low = [t for k, t in enumerate(lanes) if k < 12]
        high = [t for k, t in enumerate(lanes) if k >= 12]
        for t in low:
            assert out[t] == pytest.approx(inp[low].sum().item(), abs=1e-5)
        for t in high:
            assert out[t] == pytest.approx(2 * inp[high].sum().item(), abs=1e-5)


@pytest.mark.parametrize("n", [1, 31, 33, 1024])
def test_barriers_order_threadgroup_memory(harness, mode, n):
    out = torch.empty(n)
    harness.dispatch("barrier_rotate", {0: out}, (1, 1, 1), (n, 1, 1))
    assert torch.equal(out, torch.arange(n, dtype=torch.float32) * 2 + 1)


def test_half_and_bfloat_conversions_round_like_torch(harness, mode):
    special = [
        0.0,
        -0.0,
        1.0,
        1 / 3,
        65504.0,
        65520.0,
        70000.0,
        1e-8,
        6e-5,
        3.0e38,
        float("inf"),
        float("-inf"),
        float("nan"),
        1.00390625,
        1.005859375,
    ]
    inp = torch.cat([torch.tensor(special), torch.randn(500) * 100, torch.randn(100) * 1e-6])
    n = inp.numel()
    h, b, back = torch.empty(n, dtype=torch.float16), torch.empty(n, dtype=torch.bfloat16), torch.empty(2 * n)
    harness.dispatch("conversions", {0: inp, 1: h, 2: b, 3: back}, (n, 1, 1), (1, 1, 1))
    torch.testing.assert_close(h, inp.half(), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(b, inp.bfloat16(), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(back[0::2], inp.half().float(), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(back[1::2], inp.bfloat16().float(), equal_nan=True, rtol=0, atol=0)


def test_vector_swizzles_and_constructors(harness, mode):
    inp = torch.randn(7, 4)
    out, out2, out_h = torch.empty(7, 4), torch.empty(7, 2), torch.empty(7, 4, dtype=torch.float16)
    harness.dispatch("swizzles", {0: inp, 1: out, 2: out2, 3: out_h}, (7, 1, 1), (1, 1, 1))
    assert torch.equal(out, inp.flip(1) + 1)
    assert torch.equal(out2, inp[:, :2] * inp[:, 2:])
    assert torch.equal(out_h, inp[:, [1, 0, 3, 2]].half())


def test_grid_positions_and_threadgroup_arguments(harness, mode):
    groups, threads = (3, 2, 1), (4, 5, 1)
    width, height = groups[0] * threads[0], groups[1] * threads[1]
    out = torch.zeros(height * width, dtype=torch.int32)
    harness.dispatch("grid_positions_uint", {0: out}, groups, threads, threadgroup_memory={0: 4 * 20})
    out = out.view(height, width)
    for gy in range(height):
        for gx in range(width):
            tx, ty = gx % threads[0], gy % threads[1]
            local = (ty * threads[0] + tx + 1) % 20
            nx, ny = local % threads[0], local // threads[0]
            ox, oy = gx - tx + nx, gy - ty + ny
            assert out[gy, gx] == ox + 1000 * oy


def test_limits_are_reported(harness):
    out = torch.empty(1056)
    with runner.checking(), pytest.raises(runner.KernelCheckError, match="1056 threads per threadgroup exceed"):
        harness.dispatch("barrier_rotate", {0: out}, (1, 1, 1), (1056, 1, 1))
    with (
        runner.checking(),
        pytest.raises(runner.KernelCheckError, match=r"semantics.metal:\d+: threadgroup-memory-limit"),
    ):
        harness.dispatch("too_much_threadgroup_memory", {0: out}, (1, 1, 1), (32, 1, 1))
    with pytest.raises(RuntimeError, match="no Metal kernel named nope"):
        harness.dispatch("nope", {0: out}, (1, 1, 1), (32, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_simdgroup_matrix_multiply_accumulate_is_a_matmul(harness, mode, dtype):
    """d = a·bᵀ + c through simdgroup_load (row-major from device, transposed, from threadgroup memory),
    simdgroup_multiply_accumulate and simdgroup_store at an origin with a row pitch: equal to a plain matmul
    (computed in float, rounded once to the element type); nothing outside the stored block is written."""
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(8, 8, generator=g).to(dtype) for _ in range(3))
    d = torch.full((9, 16), float("nan"), dtype=dtype)
    suffix = "float" if dtype == torch.float32 else "half"
    harness.dispatch(f"simdgroup_mma_{suffix}", {0: a, 1: b, 2: c, 3: d}, (1, 1, 1), (32, 1, 1))
    expected = (a.float() @ b.float().t() + c.float()).to(dtype)
    torch.testing.assert_close(d[1:9, 8:16], expected, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)
    assert torch.isnan(d[0]).all() and torch.isnan(d[1:, :8]).all()


def test_simdgroup_matrix_operation_skipped_by_a_lane_is_reported(harness, mode):
    """A simdgroup_matrix product that one lane does not reach (divergence) is an error naming the line: on the
    GPU the SIMD-group's 32 lanes execute it together, each holding part of the matrices."""
    a, d = torch.randn(8, 8), torch.empty(8, 8)
    text = SHADER.read_text().splitlines()
    line = next(i + 1 for i, ln in enumerate(text) if "simdgroup_multiply(md, ma, ma);" in ln)
    with pytest.raises(runner.KernelCheckError, match=rf"semantics.metal:{line}: simdgroup-matrix-divergence"):
        harness.dispatch("simdgroup_mma_diverged", {0: a, 1: d}, (1, 1, 1), (32, 1, 1))
