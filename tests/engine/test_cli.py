"""The `ipt` CLI end to end on a tiny backbone: pt -> msf -> ist -> eval, and clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ipt_engine.cli import app, main
from ipt_engine.tasks import TaskKind, save_tasks
from tests.conftest import make_task

runner = CliRunner()
STEPS = ["--max-steps", "2", "--eval-every", "1", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture()
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.jsonl"
    save_tasks([make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE), make_task("c", TaskKind.GENERATION)], path)
    return path


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_pt_msf_ist_eval_pipeline(tmp_path: Path, task_file: Path, tiny_model_dirs: dict,
                                  caplog: pytest.LogCaptureFixture) -> None:
    bb = ["--backbone", str(tiny_model_dirs["llama"])]
    out = _ok(["pt", str(task_file), "--out", str(tmp_path / "pt"), "--n-prompt", "3", *STEPS, *bb])
    assert "Prompt tuning" in out and "mean best dev" in out
    assert (tmp_path / "pt" / "prompts.safetensors").is_file()
    assert json.loads((tmp_path / "pt" / "results.json").read_text())["tasks"][0]["task"] == "a"

    _ok(["msf", str(task_file), "--prompts", str(tmp_path / "pt" / "prompts.safetensors"), "--out",
         str(tmp_path / "sub"), "--d-intrinsic", "4", "--d-hidden", "8", *STEPS, *bb])
    meta = json.loads((tmp_path / "sub" / "subspace.json").read_text())
    assert meta["config"]["d_intrinsic"] == 4 and meta["provenance"]["tasks"] == ["a", "b", "c"]
    assert "reconstruction_mse" in meta["eval_summary"]

    out = _ok(["ist", str(task_file), "--subspace", str(tmp_path / "sub"), "--out", str(tmp_path / "ist"),
               "--optimizer", "adamw", "--init", "mean", *STEPS, *bb])
    assert "Intrinsic subspace tuning" in out
    assert (tmp_path / "ist" / "task_vectors.safetensors").is_file()
    # the default optimiser starts from the best of z = 0, the mean and MSF's task vectors (beside the subspace)
    with caplog.at_level(logging.INFO, logger="ipt_engine.ist_gauss_newton"):
        _ok(["ist", str(task_file), "--subspace", str(tmp_path / "sub"), "--out", str(tmp_path / "ist-gn"),
             "--max-iterations", "2", *bb])
    results = json.loads((tmp_path / "ist-gn" / "results.json").read_text())["tasks"]
    assert all(r["steps"] <= 2 and r["history"][0]["step"] == 0 for r in results)
    scored = [r.getMessage() for r in caplog.records if "start candidates" in r.getMessage()]
    # per task, all 5 starts (z=0, the mean, 3 vectors) scored on the same rows (few candidates: no screening)
    assert [m.rsplit(" ", 1)[1] for m in scored] == ["5"] * 3

    _ok(["eval", str(task_file), "--subspace", str(tmp_path / "sub"), "--vectors",
         str(tmp_path / "ist" / "task_vectors.safetensors"), "--out", str(tmp_path / "scores.json"), *bb,
         "--device", "cpu"])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["mode"] == "IST vectors" and set(scores["scores"]) == {"a", "b", "c"}
    _ok(["eval", str(task_file), "--split", "dev", *bb, "--device", "cpu"])


def test_pt_shared_start_starts_every_task_from_one_draw(tmp_path: Path, task_file: Path,
                                                        tiny_model_dirs: dict) -> None:
    from ipt_engine.named_tensors import load_named

    bb = ["--backbone", str(tiny_model_dirs["llama"])]
    tiny = ["--max-steps", "1", "--eval-every", "1", "--batch-size", "2", "--lr", "1e-6", "--device", "cpu"]
    prompts = {}
    for flag in ("--shared-start", "--no-shared-start"):
        _ok(["pt", str(task_file), "--out", str(tmp_path / flag), "--n-prompt", "3", *tiny, *bb, flag])
        prompts[flag] = load_named(tmp_path / flag / "prompts.safetensors")
    shared, own = prompts["--shared-start"], prompts["--no-shared-start"]
    assert torch.allclose(shared["a"], shared["b"], atol=1e-4) and torch.allclose(shared["a"], shared["c"], atol=1e-4)
    assert not torch.allclose(own["a"], own["b"], atol=1e-2)  # by default each task draws its own start


def test_msf_without_proj_needs_no_prompts(tmp_path: Path, task_file: Path, tiny_model_dirs: dict) -> None:
    _ok(["msf", str(task_file), "--no-proj", "--n-prompt", "2", "--out", str(tmp_path / "sub"),
         "--d-intrinsic", "3", "--d-hidden", "8", *STEPS, "--backbone", str(tiny_model_dirs["bart"])])
    assert json.loads((tmp_path / "sub" / "subspace.json").read_text())["config"]["with_proj"] is False


def test_bad_task_file_exits_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x", "kind": "classification", "train": [{"input": "a", "output": "b"}]}\n')
    monkeypatch.setattr("sys.argv", ["ipt", "eval", str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "1 training example" in capsys.readouterr().err


def test_eval_rejects_conflicting_options(task_file: Path) -> None:
    result = runner.invoke(app, ["eval", str(task_file), "--subspace", "x"])
    assert result.exit_code != 0 and "go together" in result.output


def test_data_prepare_writes_pool_and_splits(tmp_path: Path) -> None:
    from tests.engine.data.fixtures import write_fake_sdist

    sdist = write_fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    out = _ok(["data", "prepare", "--sdist", str(sdist), "--pool", str(tmp_path / "pool"), "--test-fraction", "0.4"])
    assert "total usable" in out and "programmatic task" in out
    assert (tmp_path / "pool" / "index.json").is_file() and (tmp_path / "pool" / "splits" / "random.json").is_file()
    index = json.loads((tmp_path / "pool" / "index.json").read_text())
    assert len(index["tasks"]) == 5


def test_data_fetch_keeps_an_sdist_already_in_the_cache(tmp_path: Path) -> None:
    from tests.engine.data.fixtures import write_fake_sdist

    sdist = write_fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    before = sdist.stat().st_mtime_ns
    out = _ok(["data", "fetch", "--cache-dir", str(tmp_path)])
    assert str(sdist) in out.replace("\n", "") and sdist.stat().st_mtime_ns == before  # found, not fetched again


def test_data_fetch_that_pip_cannot_serve_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pip offline, with nothing to find: it answers at once as an index without the sdist would
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONSTRAINT", "")
    result = runner.invoke(app, ["data", "fetch", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # no traceback
    flat = " ".join(result.output.split())
    assert "bigbench==1.0.0" in flat and "No matching distribution" in flat and "--sdist" in flat


def test_experiment_report_without_a_run_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["experiment", "report", str(tmp_path)])
    assert result.exit_code != 0 and "summary.json is missing" in str(result.exception)


def test_experiment_run_prints_the_headline_of_a_finished_run() -> None:
    """What `ipt experiment run` prints at the end, on the committed summary of the published run."""
    import json
    from pathlib import Path

    from ipt_engine.cli_experiment import headline_lines

    published = Path(__file__).resolve().parents[2] / "docs" / "results" / "paper-small-cpu" / "summary.json"
    summary = json.loads(published.read_text())
    lines = headline_lines(summary)
    assert any("unseen_tasks" in line and "d_I=250" in line and "84.8 [" in line and "(k=4)" in line
               for line in lines)
