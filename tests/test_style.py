"""Style, enforced where CI runs the tests (.ci/run): `ruff check` and `ruff format --check` over the tree, with the
settings in pyproject.toml. ruff comes with requirements-dev.txt; without it the test skips, except in CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import harness_required

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("ruff") is None:
        if harness_required():  # CI: tools/setup.sh installed requirements-dev.txt
            pytest.fail("ruff is not installed (pip install -r requirements-dev.txt)")
        pytest.skip("ruff is not installed (pip install -r requirements-dev.txt)")
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check():
    proc = _ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert proc.returncode == 0, f"ruff check (fix with `ruff check --fix .`):\n{proc.stdout[-6000:]}{proc.stderr}"


def test_ruff_format():
    proc = _ruff("format", "--no-cache", "--check", ".")
    assert proc.returncode == 0, f"ruff format --check (fix with `ruff format .`):\n{proc.stdout[-6000:]}{proc.stderr}"
