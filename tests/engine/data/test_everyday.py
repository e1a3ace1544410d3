"""The everyday task suite shipped with the engine: it loads, has the promised sizes and labels, repeats no
input, and its test inputs are not near-copies of its train inputs. No model is involved."""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from collections.abc import Sequence
from fnmatch import fnmatch
from itertools import pairwise
from pathlib import Path

import pytest

from ipt_engine.data.everyday import EVERYDAY_TASKS_FILE, everyday_tasks
from ipt_engine.data.pool import text_key
from ipt_engine.metrics import MetricName
from ipt_engine.tasks import Example, Task, TaskKind

EXPECTED_LABELS = {
    "app_review_sentiment": ("positive", "negative", "neutral"),
    "product_category": ("electronics", "clothing", "kitchen", "books"),
    "email_urgency": ("urgent", "normal", "low"),
    "support_intent": ("billing", "shipping", "technical", "account"),
}
PER_LABEL = {"train": 16, "dev": 8, "test": 12}
MAX_TEST_TRAIN_JACCARD = 0.6
SPLITS = tuple(PER_LABEL)


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return everyday_tasks()


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.casefold()))


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


def repeated_inputs(splits: dict[str, Sequence[Example]]) -> list[str]:
    """'split: input' for every example whose normalised input was already seen in this or an earlier split."""
    seen: set[str] = set()
    repeats = []
    for split, examples in splits.items():
        for ex in examples:
            key = text_key(ex)
            if key in seen:
                repeats.append(f"{split}: {ex.input}")
            seen.add(key)
    return repeats


def near_copies(test: Sequence[Example], train: Sequence[Example]) -> list[str]:
    """Test inputs whose closest train input (word-set Jaccard) reaches the limit."""
    found = []
    for ex in test:
        score, closest = max((jaccard(ex.input, tr.input), tr.input) for tr in train)
        if score >= MAX_TEST_TRAIN_JACCARD:
            found.append(f"{score:.2f}: {ex.input!r} ~ {closest!r}")
    return found


def splits_of(task: Task) -> dict[str, list[Example]]:
    return {split: getattr(task, split) for split in SPLITS}


def test_the_file_ships_as_package_data() -> None:
    assert EVERYDAY_TASKS_FILE.is_file()
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["ipt_engine"]
    assert any(fnmatch("data/everyday_tasks.jsonl", p) for p in patterns), patterns


def test_every_task_loads_and_validates(tasks: list[Task]) -> None:
    assert [t.name for t in tasks] == list(EXPECTED_LABELS)
    for task in tasks:
        task.validate()
        assert task.kind is TaskKind.CLASSIFICATION
        assert task.metric is MetricName.ACCURACY
        assert task.labels == EXPECTED_LABELS[task.name]


def test_each_split_has_the_promised_examples_per_label(tasks: list[Task]) -> None:
    for task in tasks:
        for split, examples in splits_of(task).items():
            counts = Counter(ex.output for ex in examples)
            assert counts == dict.fromkeys(task.labels or (), PER_LABEL[split]), (task.name, split, counts)


def test_the_labels_of_each_split_are_the_task_labels(tasks: list[Task]) -> None:
    for task in tasks:
        for split, examples in splits_of(task).items():
            assert {ex.output for ex in examples} == set(task.labels or ()), (task.name, split)


def test_each_split_interleaves_its_labels(tasks: list[Task]) -> None:
    for task in tasks:
        for split, examples in splits_of(task).items():
            changes = sum(a.output != b.output for a, b in pairwise(examples))
            # blocks of one label each would give len(labels) - 1 changes
            assert changes >= 2 * len(task.labels or ()), (task.name, split, changes)


def test_no_input_repeats_within_or_across_splits(tasks: list[Task]) -> None:
    for task in tasks:
        assert repeated_inputs(splits_of(task)) == [], task.name


def test_test_inputs_are_not_near_copies_of_train_inputs(tasks: list[Task]) -> None:
    for task in tasks:
        assert near_copies(task.test, task.train) == [], task.name


def test_the_checks_catch_planted_defects() -> None:
    train = [Example("The app crashes every time I open it.", "negative"),
             Example("Lovely app, works great", "positive")]
    retyped = Example("  the APP crashes every time I open   it. ", "negative")
    assert repeated_inputs({"train": train, "test": [retyped]}) == [f"test: {retyped.input}"]
    assert repeated_inputs({"train": [*train, train[0]]}) == [f"train: {train[0].input}"]
    reworded = Example("The app crashes every time I open it up!", "negative")
    assert len(near_copies([reworded], train)) == 1
    assert near_copies([Example("Nothing in common with those words", "neutral")], train) == []


def test_named_tasks_come_back_in_the_order_named() -> None:
    picked = everyday_tasks(["support_intent", "app_review_sentiment"])
    assert [t.name for t in picked] == ["support_intent", "app_review_sentiment"]
    assert [t.name for t in everyday_tasks("email_urgency")] == ["email_urgency"]


def test_an_unknown_name_raises_value_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="no_such_task") as info:
        everyday_tasks(["product_category", "no_such_task"])
    for name in EXPECTED_LABELS:
        assert name in str(info.value)
