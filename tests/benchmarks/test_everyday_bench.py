from __future__ import annotations

import pytest

from benchmarks import everyday_bench


def test_everyday_bench_quick(capsys: pytest.CaptureFixture[str]) -> None:
    report = everyday_bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| app_review_sentiment (3 labels, 4 test)" in out and "mean over tasks" in out
    scores = report.values["scores"]
    assert set(scores) == set(everyday_bench.METHODS)
    assert all(0 <= v <= 1 and v * 4 == round(v * 4) for per in scores.values() for v in per.values())
    (detail,) = report.values["details"].values()
    assert 1 <= detail["ist_iterations"] <= 2 and detail["ist_history"][0]["step"] == 0
    # AdamW IST and PT were stopped at the default IST's wall time (at their first evaluation past it)
    assert detail["adamw_seconds"] >= detail["ist_seconds"] and detail["pt_seconds"] >= detail["ist_seconds"]


def test_wilson_interval_brackets_the_proportion() -> None:
    low, high = everyday_bench.wilson(9, 12)
    assert 0.4 < low < 0.75 < high < 0.95
    assert everyday_bench.wilson(0, 10)[0] == 0.0 and everyday_bench.wilson(10, 10)[1] == 1.0
