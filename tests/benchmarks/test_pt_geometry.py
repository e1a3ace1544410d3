from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import pt_geometry
from benchmarks.pt_geometry import Geometry
from benchmarks.report import Report
from ipt_engine.prompt_tuning import sample_vocab_prompts


def test_geometry_tells_shared_moves_from_unrelated_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    starts = torch.randn(6, 3, 8, generator=gen)
    common = torch.randn(1, 3, 8, generator=gen)
    shared = Geometry.of(starts + common, starts)  # every task moved the same way
    assert shared.move_cosine == pytest.approx(1.0, abs=1e-5)
    unrelated = Geometry.of(starts + torch.randn(6, 3, 8, generator=gen), starts)
    assert abs(unrelated.move_cosine) < 0.5 and unrelated.move_cosine < shared.move_cosine
    assert unrelated.top_share[1] < 0.9 and unrelated.top_share[5] == pytest.approx(1.0)  # 6 centred moves: rank 5
    assert Geometry.of(starts, starts).move_norm == 0.0 and Geometry.of(starts, starts).start_kept == pytest.approx(1.0)


def test_a_run_directorys_starts_are_rebuilt_as_pt_drew_them(tmp_path: Path) -> None:
    """The starts are drawn per task from (seed, name) as PT drew them: against them the prompts keep their
    start wholly (1.0); against another seed's draw they do not."""
    emb = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    names = ["a", "b", "c"]
    starts = sample_vocab_prompts(emb, 3, 4, 7, task_names=names)
    (tmp_path / "pt" / "main").mkdir(parents=True)
    save_file({n: starts[i] + 0.01 * (i + 1) for i, n in enumerate(names)},
              str(tmp_path / "pt" / "main" / "chunk000.safetensors"))
    (tmp_path / "tasks.json").write_text(json.dumps({"train": {n: "classification" for n in names}}))
    (tmp_path / "config.yaml").write_text("data_seed: 7\n")
    report = Report("pt_geometry", "t", "cpu", [], ["prompts", *pt_geometry.GEOMETRY_HEADER])
    values = pt_geometry.run_geometry(tmp_path, emb, report)
    assert values["geometry"]["start_kept"] == pytest.approx(1.0, abs=0.05)
    assert values["check_other_seed"]["start_kept"] < 0.8
    assert len(report.rows) == 2 and values["msf"] == {}


def test_pt_geometry_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "benchmarks.md"
    report = pt_geometry.main(["--quick", "--lrs", "0.3,0.01", "--write-docs", str(docs)])
    out = capsys.readouterr().out
    assert "one shared start" in out and "own start per task" in out
    runs = report.values["everyday"]
    assert len(runs) == 4 and all(0.0 <= r["mean"]["value"] <= 1.0 for r in runs.values())
    # a smaller learning rate moves the prompts less, from either start
    assert runs["lr0.01/own start per task"]["geometry"]["move_norm"] < runs["lr0.3/own start per task"]["geometry"][
        "move_norm"]
    assert "<!-- pt_geometry:cpu start -->" in docs.read_text()
