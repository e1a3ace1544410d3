"""The benchmarks' shared parts that need no model: the docs section writer and the refusal to put --quick figures
into docs/benchmarks.md."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.report import DOCS, Report, finish, write_section


def test_write_section_replaces_its_own_section_and_appends_others(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    write_section(path, "serving_bench:cpu", "Serving (cpu)", "first")
    write_section(path, "store_bench:cpu", "Store (cpu)", "other")
    write_section(path, "serving_bench:cpu", "Serving (cpu)", "second")
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert text.count("<!-- serving_bench:cpu start -->") == 1 and "second" in text and "first" not in text
    assert "other" in text and text.index("## Serving (cpu)") < text.index("## Store (cpu)")  # replaced in place


def test_quick_figures_never_go_into_the_docs(capsys: pytest.CaptureFixture[str]) -> None:
    before = DOCS.read_text() if DOCS.is_file() else None
    report = Report("x_bench", "X", "cpu", context=[], header=["measure", "value"])
    report.add("a", "1")
    with pytest.raises(SystemExit, match=r"not written into docs/benchmarks\.md"):
        finish(report, argparse.Namespace(write_docs=str(DOCS), quick=True), ["--quick"])
    assert (DOCS.read_text() if DOCS.is_file() else None) == before
    assert "| a       | 1     |" in capsys.readouterr().out
