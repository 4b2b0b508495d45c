"""A CI-sized run of tools/fault_suite.py: kills, a full disk, damage and races end cleanly."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fault_suite


def test_fault_suite_quick(tmp_path: Path) -> None:
    tally = fault_suite.run_suite(tmp_path / "work", n_kills=3, quick=True)
    total = tally.total()
    assert total["tries"] >= 25
    assert {k: total[k] for k in fault_suite.COLUMNS[2:]} == {k: 0 for k in fault_suite.COLUMNS[2:]}, tally.notes
