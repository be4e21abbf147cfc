"""The NaN and ±inf contract: NaN and ±inf at every kernel variant of every public op, forward and backward, against
torch's unfused float64 composition (issue 31): the NaN and ±inf positions of every output and every gradient equal
torch's, finite values match within the contract's tolerance, and a row's NaN never reaches another row. Each test
puts one placement per row (NaN at the first, middle and last column, at the row's maximum, among -inf, ±inf, ...)
into one tensor with clean rows before and after, so one call covers them all.

Kernels must not rely on a max carrying a NaN: Metal's fmax/fmin (and the harness's max, min, simd_max, simd_min:
tests/test_emulator_semantics.py) drop it, so a NaN reaches a row's statistics through its sums only. The bug this
contract was written for: a cross-entropy (and looped softmax) thread whose elements were all NaN or -inf kept m = -inf
and threw its NaN sum away, so the loss of a row holding a NaN logit came out finite.

Decided semantics where torch's own result is an artifact: an ignored cross-entropy row (target == ignore_index)
has loss 0 and a zero gradient even when it holds NaN (torch's log_softmax backward gives it 0·NaN = NaN, which would
poison linear_cross_entropy's dweight through rows nobody trains on).

Each op's contract file holds its NaN/inf tests (`test_nan_inf*` in tests/test_<op>.py), marked with
`nan_inf_contract(op)`; tests/test_nan_inf.py checks through the manifest that every public op has one. This module
holds what they share."""

from __future__ import annotations

import torch
from helpers import randn

from torch_metal_fused.testing import assert_matches

NAN, INF = float("nan"), float("inf")
# A width per variant of the row kernels (plan_rows: simd_rows <= 256, single_row <= 8192): 1023 gives a tail thread
# with 7 of its 8 elements.
VARIANT_WIDTHS = {"simd_rows": 200, "single_row": 1023, "looped": 9000}
# Cross-entropy has one kernel (looped) whose thread count follows the vocabulary: 32, 64 and 320 threads hold at most
# one logit each (8, 33, 300), 1024 threads hold ~5 (5000).
VOCABS = (8, 33, 300, 5000)


def nan_inf_contract(*ops: str):
    """Marks a test as the NaN/inf contract of `ops` (tests/test_nan_inf.py checks that every public op has one)."""

    def mark(fn):
        fn.nan_inf_ops = (*getattr(fn, "nan_inf_ops", ()), *ops)
        return fn

    return mark


def row_cases(cols: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """One float64 row per placement, clean rows first and last."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(cols, generator=g, dtype=torch.float64)  # noqa: E731

    def put(row, *pairs):
        for col, value in pairs:
            row[col] = value
        return row

    at_max = r()
    at_max[int(at_max.argmax())] = NAN
    among_neg_inf = torch.full((cols,), -INF, dtype=torch.float64)
    among_neg_inf[0] = 0.5  # one finite logit: every other thread holds only -inf, and one of them the NaN
    among_neg_inf[cols // 2] = NAN
    one_finite = torch.full((cols,), -INF, dtype=torch.float64)
    one_finite[cols // 3] = 1.5
    return [
        ("clean", r()),
        ("nan_first", put(r(), (0, NAN))),
        ("nan_middle", put(r(), (cols // 2, NAN))),
        ("nan_last", put(r(), (cols - 1, NAN))),
        ("nan_at_max", at_max),
        ("nan_among_neg_inf", among_neg_inf),
        ("all_nan", torch.full((cols,), NAN, dtype=torch.float64)),
        ("pos_inf", put(r(), (cols // 3, INF))),
        ("neg_inf", put(r(), (cols // 3, -INF))),
        ("pos_and_neg_inf", put(r(), (1, INF), (cols - 2, -INF))),
        ("neg_inf_but_one", one_finite),
        ("all_neg_inf", torch.full((cols,), -INF, dtype=torch.float64)),
        ("clean_last", r()),
    ]


def random_row(cols: int, seed: int) -> torch.Tensor:
    return torch.randn(cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_rows(out, ref, dtype, what, clean, baseline=None):
    """out against ref everywhere (NaN/inf masks equal, finite values within tolerance), and again on the clean rows
    alone (so a small leak into a clean row is not diluted by the other rows' norm)."""
    assert_matches(out, ref, dtype, what, baseline=baseline)
    if clean:
        rows = torch.tensor(clean)
        assert_matches(out.detach().cpu()[rows], ref.detach().cpu()[rows], dtype, f"{what} (clean rows)")


def grad_with_nan(shape, dtype, device, rows_with_nan, seed):
    """An incoming gradient with a NaN in the middle of each of `rows_with_nan`."""
    dy = randn(shape, dtype, device, seed=seed)
    for row in rows_with_nan:
        dy[row, shape[-1] // 2] = NAN
    return dy


def weight_with(cols, dtype, device, placements):
    w = randn((cols,), dtype, device, seed=2) + 1.0
    for col, value in placements:
        w[col] = value
    return w
