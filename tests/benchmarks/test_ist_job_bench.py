from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import ist_job_bench


def test_ist_job_bench_quick(capsys: pytest.CaptureFixture[str]) -> None:
    report = ist_job_bench.main(["--quick", "--repeats", "1", "--max-iterations", "2", "--patience", "5"])
    out = capsys.readouterr().out
    assert "| run " in out and "POST -> succeeded" in out and "max_iterations 2" in out
    (run,) = report.values["runs"]
    assert 1 <= run["steps"] <= 2 and 0 <= run["dev"] <= 1 and 0 <= run["bare_dev"] <= 1
    assert 0 < run["training"] <= run["total"] and run["queued"] >= 0
    assert run["total"] <= run["seen"] + 1e-3  # the client saw it succeed after the worker finished it
    assert report.values["worker_start_s"] > 0


def test_ist_job_bench_needs_a_subspace(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no subspace artifact at"):
        ist_job_bench.main(["--subspace", str(tmp_path / "missing")])
