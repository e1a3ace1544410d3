"""The task pool on disk, and few-shot tasks drawn from it.

Layout of a pool directory:
    index.json          one entry per usable task (name, kind, metric, sizes, label set, source path), a
                        summary, and every task that was not converted with the reason
    skipped.json        the skipped tasks alone
    tasks/<name>.json   a usable task with all its (kept) examples

Few-shot sampling follows the paper: K = 16 per class (classification) or 32 (other kinds) for train and
again for dev. The test set is fixed per task (it does not depend on the seed) and disjoint from every
seed's train and dev, so the "unseen data" challenge can draw another seed's train/dev and keep the test.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipt_engine.data.bigbench import ConversionRules, ConvertedTask, Skipped, convert_task, iter_task_files
from ipt_engine.errors import InvalidTaskError
from ipt_engine.metrics import MetricName
from ipt_engine.tasks import Example, Task, TaskKind, few_shot_sample

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SKIPPED_FILE = "skipped.json"
TEST_SPLIT_SEED = 12345  # fixes each task's test set, independent of the few-shot seed
DEFAULT_MAX_TEST = 200


def file_stem(name: str) -> str:
    """A file name for a task name ('arithmetic:1_digit_addition' -> 'arithmetic__1_digit_addition')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace(":", "__"))


def prepare_pool(sdist: Path, out: Path, rules: ConversionRules | None = None) -> dict[str, Any]:
    """Convert every task.json in the sdist and write the pool; returns a summary (counts by kind and
    by skip reason)."""
    rules = rules or ConversionRules()
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    files = list(iter_task_files(sdist))
    parents = {rel.split("/")[0] for rel, _, _ in files if rel.count("/") >= 2}
    index: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    for rel, data, error in files:
        if error is not None or data is None:
            skipped.append(Skipped(":".join(rel.split("/")[:-1]), rel, error or "unreadable"))
            continue
        has_subtasks = rel.count("/") == 1 and rel.split("/")[0] in parents
        result = convert_task(rel, data, rules, has_subtasks=has_subtasks)
        if isinstance(result, Skipped):
            skipped.append(result)
            continue
        if len(result.examples) > rules.max_examples_kept:
            rng = random.Random(f"keep:{result.name}")
            result.examples = rng.sample(result.examples, rules.max_examples_kept)
        _write_task(out, result)
        index.append(_index_entry(result))
    index.sort(key=lambda e: e["name"])
    summary = {
        "usable": len(index),
        "by_kind": dict(Counter(e["kind"] for e in index)),
        "skipped": len(skipped),
        "skip_reasons": dict(Counter(_reason_class(s.reason) for s in skipped).most_common()),
    }
    (out / INDEX_FILE).write_text(json.dumps({"rules": rules.__dict__, "summary": summary, "tasks": index,
                                              "skipped": [s.__dict__ for s in skipped]}, indent=1) + "\n")
    (out / SKIPPED_FILE).write_text(json.dumps([s.__dict__ for s in skipped], indent=1) + "\n")
    log.info("task pool: %d usable %s, %d skipped", summary["usable"], summary["by_kind"], summary["skipped"])
    return summary


def _reason_class(reason: str) -> str:
    """Group reasons that differ only in numbers ('12 examples; 84 needed...' -> 'N examples; N needed...')."""
    return re.sub(r"\d+", "N", re.sub(r"\s*\(.*\)", "", reason))


def _write_task(out: Path, task: ConvertedTask) -> None:
    data = {
        "name": task.name, "kind": task.kind.value, "metric": task.metric.value,
        "labels": list(task.labels) if task.labels else None, "source": task.source,
        "keywords": task.keywords, "description": task.description,
        "examples": [e.to_dict() for e in task.examples],
    }
    (out / "tasks" / f"{file_stem(task.name)}.json").write_text(json.dumps(data, ensure_ascii=False) + "\n")


def _index_entry(task: ConvertedTask) -> dict[str, Any]:
    return {"name": task.name, "kind": task.kind.value, "metric": task.metric.value,
            "num_examples": len(task.examples), "labels": list(task.labels) if task.labels else None,
            "source": task.source, "keywords": task.keywords[:8]}


@dataclass
class TaskPool:
    """A prepared pool directory."""

    root: Path

    def __post_init__(self) -> None:
        index = self.root / INDEX_FILE
        if not index.is_file():
            raise FileNotFoundError(f"{self.root} is not a task pool (no {INDEX_FILE}); run `ipt data prepare`")
        self.entries: dict[str, dict[str, Any]] = {e["name"]: e for e in json.loads(index.read_text())["tasks"]}

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    def kind(self, name: str) -> TaskKind:
        return TaskKind(self._entry(name)["kind"])

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self.entries:
            raise InvalidTaskError(f"task {name!r} is not in the pool at {self.root}")
        return self.entries[name]

    def load(self, name: str) -> dict[str, Any]:
        self._entry(name)
        return json.loads((self.root / "tasks" / f"{file_stem(name)}.json").read_text())

    def few_shot(self, name: str, seed: int, k_per_class: int = 16, k_other: int = 32,
                 max_test: int = DEFAULT_MAX_TEST, dev_k_per_class: int | None = None,
                 dev_k_other: int | None = None) -> Task:
        """The few-shot task for one seed: K-shot train and dev drawn with `seed`, and the task's fixed test set.

        The dev set has the train set's K unless `dev_k_per_class` / `dev_k_other` ask for fewer (a cheaper
        model selection for CPU runs); it never changes the train or test examples."""
        data = self.load(name)
        kind = TaskKind(data["kind"])
        examples = [Example.from_dict(e) for e in data["examples"]]
        labels = tuple(data["labels"]) if data.get("labels") else None
        test, rest = split_test(examples, kind, labels, k_per_class, k_other, max_test)
        k = k_per_class if kind is TaskKind.CLASSIFICATION else k_other
        train = few_shot_sample(rest, kind, k, seed)
        chosen = set(map(id, train))
        dev_k = (dev_k_per_class if kind is TaskKind.CLASSIFICATION else dev_k_other) or k
        dev = few_shot_sample([e for e in rest if id(e) not in chosen], kind, min(dev_k, k), seed + 100_003)
        return Task(name, kind, train, dev, test, labels, MetricName(data["metric"]))


def split_test(examples: list[Example], kind: TaskKind, labels: tuple[str, ...] | None, k_per_class: int,
               k_other: int, max_test: int) -> tuple[list[Example], list[Example]]:
    """(test, rest): a seed-independent test set of up to `max_test` examples, leaving enough for
    K-shot train + dev (per class for classification)."""
    rng = random.Random(TEST_SPLIT_SEED)
    order = list(examples)
    rng.shuffle(order)
    if kind is TaskKind.CLASSIFICATION:
        reserve: list[Example] = []
        test_pool: list[Example] = []
        per_label: Counter[str] = Counter()
        for ex in order:  # keep 2K per label for train + dev, the rest may be tested on
            if per_label[ex.output] < 2 * k_per_class:
                per_label[ex.output] += 1
                reserve.append(ex)
            else:
                test_pool.append(ex)
        test = test_pool[:max_test]
        return test, reserve + test_pool[max_test:]
    n_test = max(0, min(max_test, len(order) - 2 * k_other))
    return order[:n_test], order[n_test:]
