from __future__ import annotations

import pytest

from benchmarks import store_bench
from tests.benchmarks.conftest import finite_positive


def test_store_bench_quick(capsys: pytest.CaptureFixture[str]) -> None:
    report = store_bench.main(["--quick", "--counts", "50,300", "--requests", "3", "--owners", "5"])
    out = capsys.readouterr().out
    assert "| 51 " in out and "| 301 " in out and "1,000 at d_I = 250" in out
    v = report.values
    levels = v["levels"]
    assert [lv["tasks"] for lv in levels] == [51, 301]  # the template task + the bulk-written ones
    for lv in levels:
        assert finite_positive([lv["per_task"], lv["hash"], lv["z"], lv["index"], lv["hot"], lv["cold"],
                                lv["lookup_p50"], lv["metrics_s"]])
        assert lv["z"] >= 4 * v["d_intrinsic"]  # the z string holds d_I float32 values
        assert lv["per_task"] == pytest.approx(lv["hash"] + lv["z"] + lv["index"])
    assert 1000 < v["per_task_at_target"] < 10_000  # a 250-float z is 1,000 bytes by itself
