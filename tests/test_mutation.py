"""The CI subset of the mutation check (tools/mutate.py --ci): bugs planted in a copy of the shaders and of the
launch code must each fail the tests that guard them, and a control edit must not. The full set is run by hand
(python3 tools/mutate.py); its last result is in docs/metal-on-cpu.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.emulated


def test_the_ci_subset_of_planted_bugs_is_caught():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "mutate.py"), "--ci"], capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "mutation score 100 %" in proc.stdout


def test_every_mutant_still_applies_and_is_listed():
    """A mutant whose text no longer occurs exactly once in its file is stale: fail here, not in a long run."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import mutate
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert len([m for m in mutate.MUTANTS if not m.control]) >= 25
    families = {m.path for m in mutate.MUTANTS if not m.control}
    assert {"shaders/softmax.metal", "shaders/rms_norm.metal", "shaders/lora_linear.metal"} <= families
    for m in mutate.MUTANTS:
        text = (ROOT / m.path).read_text()
        assert text.count(m.find) == 1, f"{m.name}: its text occurs {text.count(m.find)} times in {m.path}"
        assert m.find != m.replace, m.name
    assert len({m.name for m in mutate.MUTANTS}) == len(mutate.MUTANTS)
