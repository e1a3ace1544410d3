"""The BIG-bench conversion, the pool on disk, few-shot sampling and task splits, on a fake sdist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipt_engine.data.bigbench import ConversionRules, convert_task
from ipt_engine.data.pool import TaskPool, prepare_pool
from ipt_engine.data.splits import TRAIN_FRACTIONS, load_split, make_splits, save_splits
from ipt_engine.metrics import MetricName
from ipt_engine.model_loading import default_cache_dir
from ipt_engine.tasks import TaskKind
from tests.engine.data.fixtures import TASKS, write_fake_sdist


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> TaskPool:
    root = tmp_path_factory.mktemp("pool")
    summary = prepare_pool(write_fake_sdist(root / "bigbench-1.0.0.tar.gz"), root / "pool")
    assert summary["usable"] == 5
    return TaskPool(root / "pool")


def test_kinds_labels_and_metrics_are_converted(pool: TaskPool) -> None:
    entries = pool.entries
    assert sorted(entries) == ["family:sub_a", "larger", "parity", "repeat", "sentiment"]
    assert entries["parity"]["kind"] == "classification" and entries["parity"]["labels"] == ["no", "yes"]
    assert entries["larger"]["kind"] == "multiple_choice"
    assert entries["sentiment"]["kind"] == "classification"  # few distinct short targets
    assert entries["repeat"]["kind"] == "generation" and entries["repeat"]["metric"] == "bleu"
    assert entries["family:sub_a"]["metric"] == "rouge_l"
    data = pool.load("repeat")
    assert data["examples"][0]["references"] == ["the word 0"]


def test_every_skip_has_a_reason(pool: TaskPool) -> None:
    skipped = {s["name"]: s["reason"] for s in json.loads((pool.root / "skipped.json").read_text())}
    assert "has subtasks" in skipped["family"]
    assert "needed" in skipped["tiny"]
    assert "not English-only" in skipped["french"]
    assert "programmatic" in skipped["program"]
    assert "unreadable JSON" in skipped["broken"]


def test_few_shot_sampling_is_k_per_class_and_deterministic(pool: TaskPool) -> None:
    task = pool.few_shot("parity", seed=1)
    assert task.kind is TaskKind.CLASSIFICATION and task.metric is MetricName.ACCURACY
    assert sorted(e.output for e in task.train).count("yes") == 16 and len(task.train) == 32
    assert len(task.dev) == 32 and task.test
    again = pool.few_shot("parity", seed=1)
    assert [e.input for e in again.train] == [e.input for e in task.train]
    other = pool.few_shot("parity", seed=2)
    assert [e.input for e in other.train] != [e.input for e in task.train]
    assert [e.input for e in other.test] == [e.input for e in task.test]  # same test for every seed
    for t in (task, other):
        seen = {e.input for e in t.train} | {e.input for e in t.dev}
        assert not seen & {e.input for e in t.test}
        assert not {e.input for e in t.train} & {e.input for e in t.dev}


def test_a_smaller_dev_set_leaves_train_and_test_alone(pool: TaskPool) -> None:
    full = pool.few_shot("parity", seed=1)
    small = pool.few_shot("parity", seed=1, dev_k_per_class=4, dev_k_other=8)
    assert [e.input for e in small.train] == [e.input for e in full.train]
    assert [e.input for e in small.test] == [e.input for e in full.test]
    assert sorted(e.output for e in small.dev) == ["no"] * 4 + ["yes"] * 4
    assert not {e.input for e in small.dev} & ({e.input for e in small.train} | {e.input for e in small.test})
    assert len(pool.few_shot("larger", seed=0, dev_k_other=8).dev) == 8


def test_non_classification_tasks_take_32_shots(pool: TaskPool) -> None:
    task = pool.few_shot("larger", seed=0)
    assert len(task.train) == 32 and len(task.dev) == 32 and len(task.test) == 120 - 64
    assert all(e.options and e.output in e.options for e in task.train)


def test_splits_are_consistent_and_saved(pool: TaskPool, tmp_path: Path) -> None:
    splits = make_splits(pool, seed=0, test_fraction=0.4)
    random_split = splits["random"]
    assert not set(random_split["train"]) & set(random_split["test"])
    assert sorted(random_split["train"] + random_split["test"]) == pool.names
    assert set(splits["cls-only"]["train"]) == {"parity", "sentiment"}
    assert set(splits["non-cls-only"]["test"]) == {"parity", "sentiment"}
    sizes = [len(splits[f"random-train-{p}"]["train"]) for p in TRAIN_FRACTIONS]
    assert sizes == sorted(sizes) and sizes[-1] == len(random_split["train"])
    save_splits(splits, tmp_path)
    assert load_split(tmp_path / "random.json") == random_split
    with pytest.raises(FileNotFoundError, match="ipt data prepare"):
        load_split(tmp_path / "nope.json")


def test_unknown_task_is_a_clear_error(pool: TaskPool) -> None:
    from ipt_engine.errors import InvalidTaskError

    with pytest.raises(InvalidTaskError, match="not in the pool"):
        pool.few_shot("nope", 0)


def test_convert_rejects_too_many_options() -> None:
    data = {"examples": [{"input": "q", "target_scores": {str(i): int(i == 0) for i in range(12)}}] * 200}
    result = convert_task("many/task.json", data, ConversionRules())
    assert getattr(result, "reason", "").startswith("more than 10 answer options")


@pytest.mark.real_data
def test_real_bigbench_sdist_gives_a_pool_of_all_kinds(tmp_path: Path) -> None:
    sdist = default_cache_dir() / "bigbench" / "bigbench-1.0.0.tar.gz"
    if not sdist.is_file():
        pytest.skip(f"the BIG-bench sdist is not in the cache ({sdist}); `ipt data prepare` downloads it")
    summary = prepare_pool(sdist, tmp_path / "pool")
    assert summary["usable"] >= 100
    assert set(summary["by_kind"]) == {"classification", "multiple_choice", "generation"}
    assert summary["skipped"] > 0 and "programmatic task: needs code to generate examples" in summary["skip_reasons"]


def test_fixture_covers_the_formats() -> None:
    assert any("target_scores" in t.get("examples", [{}])[0] for t in TASKS.values() if t.get("examples"))


def test_index_says_why_tasks_were_skipped(pool: TaskPool) -> None:
    index = json.loads((pool.root / "index.json").read_text())
    assert index["summary"]["usable"] == len(index["tasks"]) == 5
    reasons = {s["name"]: s["reason"] for s in index["skipped"]}
    assert set(reasons) == {"family", "tiny", "french", "program", "broken"}
