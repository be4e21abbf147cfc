"""The coverage rule (tests/kernel_coverage.py): runs after every other test (conftest.py orders it last)."""

from __future__ import annotations

import kernel_coverage
import pytest

from torch_metal_fused.emulator import runner

pytestmark = pytest.mark.emulated


def test_every_kernel_is_executed_by_a_numerical_test(request):
    why = kernel_coverage.judgeable()
    if why:
        pytest.skip(why)
    if request.session.testsfailed:
        pytest.skip("other tests failed: the coverage they would have recorded is unknown")
    missing = kernel_coverage.uncovered(runner.kernel_names(), kernel_coverage.numerically_tested)
    assert not missing, (
        f"{len(missing)} kernel(s) registered in shaders/ but executed by no test that compares a result with the "
        "float64 reference (torch_metal_fused.testing.assert_matches); add a contract case that dispatches each:\n  "
        + "\n  ".join(missing)
    )


def test_the_rule_names_a_kernel_added_without_a_numerical_test():
    """The test of the test: a new kernel reached only by a test without a numerical check, or by none, is named."""
    registered = [*runner.kernel_names(), "softmax_forward_wide_float", "softmax_forward_wide_half"]
    tested = {k: "tests/x.py::checked" for k in runner.kernel_names()}
    saved = dict(kernel_coverage.numerically_tested)
    try:
        kernel_coverage.numerically_tested.clear()
        kernel_coverage.record("tests/x.py::no_check", {"softmax_forward_wide_half"}, made_numerical_check=False)
        kernel_coverage.record("tests/x.py::checked", set(runner.kernel_names()), made_numerical_check=True)
        assert kernel_coverage.numerically_tested == tested
        assert kernel_coverage.uncovered(registered, kernel_coverage.numerically_tested) == [
            "softmax_forward_wide_float",
            "softmax_forward_wide_half",
        ]
    finally:
        kernel_coverage.numerically_tested.clear()
        kernel_coverage.numerically_tested.update(saved)
