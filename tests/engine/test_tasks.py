"""Task format: validation errors, formatting, splits, few-shot sampling, JSONL round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipt_engine.errors import InvalidTaskError
from ipt_engine.metrics import MetricName
from ipt_engine.tasks import (
    Example,
    Task,
    TaskKind,
    few_shot_sample,
    infer_kind,
    load_tasks,
    save_tasks,
    split_off,
    to_text_pair,
)
from tests.conftest import make_task


def test_empty_task_is_rejected() -> None:
    with pytest.raises(InvalidTaskError, match="0 training example"):
        Task("t", TaskKind.GENERATION, [])


def test_single_example_task_is_rejected() -> None:
    with pytest.raises(InvalidTaskError, match="1 training example"):
        Task("t", TaskKind.GENERATION, [Example("a", "b")])


def test_classification_without_options_is_rejected() -> None:
    with pytest.raises(InvalidTaskError, match="label set"):
        Task("t", TaskKind.CLASSIFICATION, [Example("a", "x"), Example("b", "y")], labels=None)


def test_classification_output_outside_labels_is_rejected() -> None:
    with pytest.raises(InvalidTaskError, match="not one of the labels"):
        Task("t", TaskKind.CLASSIFICATION, [Example("a", "x"), Example("b", "z")], labels=("x", "y"))


def test_multiple_choice_example_without_options_is_rejected() -> None:
    with pytest.raises(InvalidTaskError, match="without at least 2 options"):
        Task("t", TaskKind.MULTIPLE_CHOICE, [Example("a", "x", ("x", "y")), Example("b", "y")])


def test_text_pair_prefixes_task_name_and_lists_mc_options() -> None:
    pair = to_text_pair("my_task", TaskKind.MULTIPLE_CHOICE, " 2+2? ", "4", ["3", "4"])
    assert pair.source == "my_task: 2+2?\nOptions: 3 | 4\nAnswer:"
    assert pair.target == " 4"
    assert to_text_pair("c", TaskKind.CLASSIFICATION, "x", "y", ["y", "z"]).source == "c: x\nAnswer:"


def test_default_metric_follows_kind() -> None:
    assert make_task(kind=TaskKind.GENERATION).metric is MetricName.ROUGE_L
    assert make_task().metric is MetricName.ACCURACY


def test_with_dev_split_keeps_every_label_in_train() -> None:
    exs = [Example(f"in {i}", "a" if i % 3 else "b") for i in range(12)]
    task = Task("t", TaskKind.CLASSIFICATION, exs, labels=("a", "b")).with_dev_split(0.25, seed=1)
    assert task.dev and {e.output for e in task.train} == {"a", "b"}
    assert len(task.train) + len(task.dev) == 12
    assert not set(map(id, task.train)) & set(map(id, task.dev))


def test_split_off_needs_two_examples() -> None:
    with pytest.raises(InvalidTaskError, match="at least 2"):
        split_off([Example("a", "b")], 0.5, seed=0)


def test_few_shot_sample_is_k_per_class_and_deterministic() -> None:
    exs = [Example(f"x{i}", label) for i in range(40) for label in ("a", "b", "c")]
    first = few_shot_sample(exs, TaskKind.CLASSIFICATION, 16, seed=3)
    assert len(first) == 48
    assert {label: sum(e.output == label for e in first) for label in "abc"} == {"a": 16, "b": 16, "c": 16}
    assert first == few_shot_sample(exs, TaskKind.CLASSIFICATION, 16, seed=3)
    assert first != few_shot_sample(exs, TaskKind.CLASSIFICATION, 16, seed=4)
    assert len(few_shot_sample(exs, TaskKind.GENERATION, 32, seed=0)) == 32


def test_infer_kind() -> None:
    assert infer_kind([Example("a", "x", ("x", "y")), Example("b", "y", ("x", "y"))]) is TaskKind.MULTIPLE_CHOICE
    assert infer_kind([Example(str(i), "yes" if i % 2 else "no") for i in range(6)]) is TaskKind.CLASSIFICATION
    assert infer_kind([Example(str(i), f"free text {i}") for i in range(6)]) is TaskKind.GENERATION


def test_jsonl_round_trip(tmp_path: Path) -> None:
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE), make_task("c", TaskKind.GENERATION)]
    path = tmp_path / "tasks.jsonl"
    save_tasks(tasks, path)
    loaded = load_tasks(path)
    assert [t.to_dict() for t in loaded] == [t.to_dict() for t in tasks]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"name": "ok", "kind": "generation", "train": [{"input": "a", "output": "b"}, '
                    '{"input": "c", "output": "d"}]}\n{not json}\n')
    with pytest.raises(InvalidTaskError, match=r"bad.jsonl:2: not valid JSON"):
        load_tasks(path)
    path.write_text('{"name": "x", "train": [{"input": "a"}]}\n')
    with pytest.raises(InvalidTaskError, match="missing the field 'output'"):
        load_tasks(path)


def test_malformed_task_dicts_raise_invalid_task_error() -> None:
    with pytest.raises(InvalidTaskError, match="must be an object"):
        Task.from_dict({"name": "x", "train": ["oops", "again"]})
    with pytest.raises(InvalidTaskError, match="kinds:"):
        Task.from_dict({"name": "x", "kind": "regression", "train": []})
    with pytest.raises(InvalidTaskError, match="metrics:"):
        Task.from_dict({"name": "x", "metric": "perplexity", "train": []})
    with pytest.raises(InvalidTaskError, match="must be a list"):
        Task.from_dict({"name": "x", "train": "abc"})


def test_split_off_never_empties_a_class() -> None:
    exs = [Example("a1", "a"), Example("a2", "a"), Example("b1", "b"), Example("b2", "b"), Example("b3", "b")]
    kept, dev = split_off(exs, 0.75, seed=0, by_output=True)
    assert {e.output for e in kept} == {"a", "b"} and dev
