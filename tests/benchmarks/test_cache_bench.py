from __future__ import annotations

import pytest

from benchmarks import cache_bench
from tests.benchmarks.conftest import finite_positive


def test_cache_bench_quick(capsys: pytest.CaptureFixture[str]) -> None:
    report = cache_bench.main(["--quick", "--requests", "6", "--projb-repeats", "5"])
    out = capsys.readouterr().out
    assert ("| predict, cache miss (a task's first request: Proj_b(z) and the keys and values of the prompt and the "
            "task's source prefix computed)") in out
    assert "| predict, cache hit (the task's second request)" in out
    v = report.values
    assert v["misses"] == v["hits"] == v["pairs"] == 6  # counted by the app itself, for both caches
    assert v["prefix_misses"] == v["prefix_hits"] == 6
    assert finite_positive([v["miss_p50"], v["hit_p50"], v["miss_p99"], v["hit_p99"], v["projb_s"], v["prompt_kv_s"]])
    assert v["miss_p50"] <= v["miss_p99"] and v["hit_p50"] <= v["hit_p99"]
    assert 0 < v["projb_share"] < 1
