from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import ist_start_probe


def test_ist_start_probe_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The probe's table: the loss along the gradient at every step length (a tiny step lowers it, to first
    order), the start candidates' losses (z = 0, the mean, each related task), both Gauss-Newton runs and the
    controls, all as accuracies."""
    docs = tmp_path / "benchmarks.md"
    report = ist_start_probe.main(["--quick", "--write-docs", str(docs)])
    out = capsys.readouterr().out
    assert "| chosen start" in out and "| Gauss-Newton from z = 0" in out
    v = report.values
    assert list(v["along"]) == list(ist_start_probe.STEP_LENGTHS)
    assert all(math.isfinite(x) for x in v["along"].values())
    assert v["along"][0.001] < v["loss_at_zero"]  # the step is along the descent direction
    assert len(v["start_losses"]) == 2 + 4  # z = 0, the mean and the four related tasks
    assert all(0.0 <= a <= 1.0 for a in [*v["test"].values(), v["test_zero"], v["test_none"]])
    assert set(v["steps"]) == {"from z = 0", "multi-start (the worker's)"}
    assert "<!-- ist_start_probe:cpu start -->" in docs.read_text()
