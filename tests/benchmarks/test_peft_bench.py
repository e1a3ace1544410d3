from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import peft_bench
from service.settings import Settings
from tests.benchmarks.conftest import finite_positive


def test_peft_bench_needs_a_trained_subspace(tmp_path: Path) -> None:
    # checked before anything loads (no model, no PEFT needed)
    with pytest.raises(SystemExit, match="no subspace artifact at"):
        peft_bench.main(["--subspace", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="not 'random'"):
        peft_bench.main(["--subspace", "random"])


def test_peft_bench_quick(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        peft_bench.import_peft()
    except SystemExit as exc:
        pytest.skip(str(exc))
    report = peft_bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| bytes stored per task" in out and "| 4 requests of 4 different tasks" in out
    v = report.values
    assert 0 <= v["ist_best"] <= 1 and v["target"] == v["ist_best"]
    assert v["ist_time_to_target"] is not None and v["ist_time_to_target"] > 0
    # the PEFT prompt scored by PEFT's own forward and by the project's evaluator: the same rank classification
    assert v["peft_own_dev"] == pytest.approx(v["peft_shared_dev"], abs=1 / 24 + 1e-9)
    # the adapter stores n x d floats; a task of ours d_I floats as the service stores them (and its metadata)
    assert v["adapter_bytes"] > v["z_bytes"] and v["redis_bytes"] > v["z_bytes"] == 8 * {"float16": 2, "float32": 4}[
        Settings().vector_dtype]
    assert finite_positive([v["peft_per_task_throughput"], v["ours_mixed_throughput"]])
