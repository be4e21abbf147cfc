"""Tolerances and error measures of the correctness contract, in one place (used by the tests and by
anyone validating a new backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

# Relative error ‖out − ref‖ / ‖ref‖ allowed against a float64 reference, per input dtype.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64, over the finite entries of ref (NaN/inf positions are compared
    separately by `assert_matches`)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    finite = torch.isfinite(ref64)
    diff = torch.linalg.vector_norm((out64 - ref64)[finite])
    norm = torch.linalg.vector_norm(ref64[finite])
    if norm == 0:
        return float(diff)
    return float(diff / norm)


_numerical_checks = 0


def numerical_check_count() -> int:
    """How many assert_matches comparisons have passed in this process (the test suite's kernel-coverage rule
    counts a kernel as numerically tested when a test that dispatched it made one: tests/kernel_coverage.py)."""
    return _numerical_checks


def assert_matches(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str = "output",
    baseline: torch.Tensor | None = None,
) -> None:
    """out (computed in `dtype`) matches the float64 reference: same shape, same NaN and ±inf positions,
    relative error within REL_TOL[dtype] — or, where the quantity is ill-conditioned (e.g. RMSNorm's dx on
    one-element rows cancels to ~eps), within twice the error of PyTorch's own eager computation `baseline`
    in the same precision (flash-attention's rule)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    assert torch.equal(torch.isnan(out64), torch.isnan(ref64)), f"{what}: NaN positions differ from the reference"
    ref_inf = torch.isinf(ref64)
    assert torch.equal(out64[ref_inf], ref64[ref_inf]), f"{what}: ±inf entries differ from the reference"
    assert not torch.isinf(out64[~ref_inf & ~torch.isnan(ref64)]).any(), f"{what}: overflow to inf"
    err = rel_error(out64, ref64)
    tol = REL_TOL[dtype]
    if baseline is not None:
        tol = max(tol, 2.0 * rel_error(baseline, ref64))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} for {dtype}"
    global _numerical_checks
    _numerical_checks += 1


class SelfTestCase(NamedTuple):
    """One case of the doctor's self-test, declared by each op module (`self_test_cases(dtype, device)`): fn(inputs)
    runs our op, reference(inputs) the same in plain PyTorch on float64 CPU copies of the inputs."""

    fn: Callable[[list[torch.Tensor]], torch.Tensor]
    reference: Callable[[list[torch.Tensor]], torch.Tensor]
    inputs: list[torch.Tensor]


def sample(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device, seed: int) -> torch.Tensor:
    """Standard-normal values drawn in float64 on the CPU (the same on every device), then cast and moved."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
