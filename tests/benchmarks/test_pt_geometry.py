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
    assert shared.in_others_span == pytest.approx(1.0, abs=1e-6)  # each move is in the others' span
    unrelated = Geometry.of(starts + torch.randn(6, 3, 8, generator=gen), starts)
    assert abs(unrelated.move_cosine) < 0.5 and unrelated.move_cosine < shared.move_cosine
    assert unrelated.in_others_span < 0.99 and unrelated.chance_span == pytest.approx(5 / 24)
    assert unrelated.top_share[1] < 0.9 and unrelated.top_share[5] == pytest.approx(1.0)  # 6 centred moves: rank 5
    assert Geometry.of(starts, starts).move_norm == 0.0 and Geometry.of(starts, starts).start_kept == pytest.approx(1.0)


def test_span_share_is_the_share_of_the_squared_norm_inside_the_span() -> None:
    basis = torch.eye(4)[:2]  # the span of e0, e1
    assert pt_geometry.span_share(torch.tensor([[3.0, 4.0, 0.0, 0.0]]), basis) == pytest.approx(1.0)
    assert pt_geometry.span_share(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), basis) == pytest.approx(0.0)
    assert pt_geometry.span_share(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), basis) == pytest.approx(0.5)
    # a zero row adds no direction to the span (an orthonormalisation by QR would add an arbitrary one)
    with_zero = torch.cat([basis, torch.zeros(1, 4)])
    assert pt_geometry.span_share(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), with_zero) == pytest.approx(0.0)


def test_a_task_that_kept_its_start_is_left_out_of_the_move_statistics() -> None:
    starts = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(3))
    moves = torch.zeros(3, 2, 4)
    moves[0, 0, 0] = moves[1, 0, 0] = 1.0  # two tasks moved the same way, the third kept its start
    g = Geometry.of(starts + moves, starts)
    assert g.unmoved == 1 and g.move_cosine == pytest.approx(1.0) and g.in_others_span == pytest.approx(1.0)
    assert "1 kept the start" in g.cells()[0]
    rounded = Geometry.of(starts + moves + 1e-6 * starts, starts)  # a start kept up to rounding still counts
    assert rounded.unmoved == 1 and rounded.move_cosine == pytest.approx(1.0, abs=1e-4)


def test_a_run_directorys_starts_are_rebuilt_as_pt_drew_them(tmp_path: Path) -> None:
    """The starts are drawn per task from (seed, name) as PT drew them: against them the prompts keep their
    start wholly (1.0); against another seed's draw they do not."""
    emb = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    names = ["a", "b", "c"]
    starts = sample_vocab_prompts(emb, 3, 4, 7, task_names=names)
    (tmp_path / "pt" / "main").mkdir(parents=True)
    save_file({n: starts[i] + 0.01 * (i + 1) for i, n in enumerate(names)},
              str(tmp_path / "pt" / "main" / "chunk000.safetensors"))
    held = sample_vocab_prompts(emb, 1, 4, 7, task_names=["h"])[0]
    save_file({"h": held + 0.01},  # a held-out task whose move (0.01 everywhere) is task a's: in the train span
              str(tmp_path / "pt" / "main" / "chunk001.safetensors"))
    (tmp_path / "tasks.json").write_text(json.dumps({"train": {n: "classification" for n in names},
                                                     "test": {"h": "classification"}}))
    (tmp_path / "config.yaml").write_text("data_seed: 7\n")
    report = Report("pt_geometry", "t", "cpu", [], ["prompts", *pt_geometry.GEOMETRY_HEADER])
    values = pt_geometry.run_geometry(tmp_path, emb, report)
    assert values["geometry"]["start_kept"] == pytest.approx(1.0, abs=0.05)
    assert values["check_other_seed"]["start_kept"] < 0.8
    assert len(report.rows) == 2 and values["msf"] == {}
    assert values["held_out"]["tasks"] == 1 and values["held_out"]["in_train_span"] == pytest.approx(1.0, abs=1e-6)


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
