from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import api_memory_bench


def test_api_memory_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The app in its own process, more hot tasks than its prefix cache holds: the cache stays within its bound,
    keeps the tasks it admitted (the second pass over them hits), every predict answers, and the API's RSS is
    measured (ready <= peak)."""
    docs = tmp_path / "benchmarks.md"
    bound = 20_000  # bytes: a few of the tiny model's tasks
    report = api_memory_bench.main(["--quick", "--tasks", "32", "--passes", "2", "--concurrency", "4",
                                    "--prefix-cache-bytes", str(bound), "--write-docs", str(docs)])
    out = capsys.readouterr().out
    assert "| API peak RSS while 32 tasks were hot" in out
    v = report.values
    assert v["requests"] == 64 and v["kv_misses"] + v["kv_hits"] >= 64
    assert 0 < v["kv_bytes"] <= bound and v["kv_rejected"] > 0  # more tasks than fit: some not admitted
    assert v["per_task_kv"] * v["kv_held"] == pytest.approx(v["kv_bytes"]) and 0 < v["kv_held"] < 32
    assert v["kv_hits"] >= v["kv_held"]  # the second pass hits on every task held
    assert 1e8 < v["ready_rss"] <= v["peak_rss"]
    assert "<!-- api_memory_bench:cpu start -->" in docs.read_text()
