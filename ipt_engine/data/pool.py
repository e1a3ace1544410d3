"""The task pool on disk, and few-shot tasks drawn from it.

Layout of a pool directory:
    index.json          one entry per usable task (name, kind, metric, sizes, label set, source path), a
                        summary, and every task that was not converted with the reason
    skipped.json        the skipped tasks alone
    tasks/<name>.json   a usable task with all its (kept) examples

Few-shot sampling follows the paper: K = 16 per class (classification) or 32 (other kinds) for train and
again for dev. The test set is fixed per task (it does not depend on the seed) and disjoint from every
seed's train and dev, so the "unseen data" challenge can draw another seed's train/dev and keep the test.

Splits are disjoint by normalised text (`text_key`): duplicates are dropped when the pool is prepared (and
again when a task is loaded, for pools prepared before that), dev excludes train by text, and
`few_shot(..., exclude=texts_of(other.train + other.dev))` keeps a second seed's train/dev off the first's.
A classification test set is balanced across labels as far as the data allows (see `split_test`).
"""

from __future__ import annotations

import json
import logging
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable
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
TRAIN_DEV_DRAWS = 2  # disjoint train + dev draws the non-test examples leave room for (main and unseen data)
MIN_TEST = 20  # a non-classification test set is never cut below this for a second draw (ConversionRules.min_test)


def normalise_text(s: str) -> str:
    """Text as compared for duplicates: Unicode NFKC, casefolded, runs of whitespace made one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def text_key(example: Example) -> str:
    """What makes two examples the same: the normalised input, plus for an example with its own options
    (multiple choice) its normalised options, sorted, since one stem asked with other options is another
    question. The output plays no part: one input with two outputs counts once (the first is kept)."""
    key = normalise_text(example.input)
    if example.options is not None:
        key += " [options: " + " | ".join(sorted(normalise_text(o) for o in example.options)) + "]"
    return key


def texts_of(examples: Iterable[Example]) -> set[str]:
    """The normalised texts (`text_key`) of examples, e.g. one seed's train + dev, to pass as `exclude`."""
    return {text_key(e) for e in examples}


def dedupe_examples(examples: Iterable[Example]) -> tuple[list[Example], int]:
    """(the first example of each normalised text (`text_key`), in order; how many examples were dropped)."""
    kept: list[Example] = []
    seen: set[str] = set()
    dropped = 0
    for ex in examples:
        key = text_key(ex)
        if key in seen:
            dropped += 1
        else:
            seen.add(key)
            kept.append(ex)
    return kept, dropped


def file_stem(name: str) -> str:
    """A file name for a task name ('arithmetic:1_digit_addition' -> 'arithmetic__1_digit_addition')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace(":", "__"))


def prepare_pool(sdist: Path, out: Path, rules: ConversionRules | None = None) -> dict[str, Any]:
    """Convert every task.json in the sdist and write the pool; returns a summary (counts by kind, by skip
    reason, and of duplicate examples dropped). Each task keeps the first example of each normalised text."""
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
        result.examples, dropped = dedupe_examples(result.examples)
        if len(result.examples) > rules.max_examples_kept:
            rng = random.Random(f"keep:{result.name}")
            result.examples = rng.sample(result.examples, rules.max_examples_kept)
        _write_task(out, result)
        index.append(_index_entry(result, dropped))
    index.sort(key=lambda e: e["name"])
    summary = {
        "usable": len(index),
        "by_kind": dict(Counter(e["kind"] for e in index)),
        "skipped": len(skipped),
        "skip_reasons": dict(Counter(_reason_class(s.reason) for s in skipped).most_common()),
        "duplicates_dropped": sum(e["duplicates_dropped"] for e in index),
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


def _index_entry(task: ConvertedTask, duplicates_dropped: int) -> dict[str, Any]:
    return {"name": task.name, "kind": task.kind.value, "metric": task.metric.value,
            "num_examples": len(task.examples), "duplicates_dropped": duplicates_dropped,
            "labels": list(task.labels) if task.labels else None, "source": task.source,
            "keywords": task.keywords[:8]}


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
                 dev_k_other: int | None = None, *, exclude: Collection[str] = ()) -> Task:
        """The few-shot task for one seed: K-shot train and dev drawn with `seed`, and the task's fixed test set.

        The dev set has the train set's K unless `dev_k_per_class` / `dev_k_other` ask for fewer (a cheaper
        model selection for CPU runs); it never changes the train or test examples. `exclude` holds
        normalised texts (`texts_of`) that train and dev must not use, e.g. another seed's train + dev; a
        label left with fewer than K gives what it has. Examples are deduplicated first (`dedupe_examples`),
        so train, dev and test never share a normalised text, in pools prepared before deduplication too."""
        data = self.load(name)
        kind = TaskKind(data["kind"])
        examples, _ = dedupe_examples(Example.from_dict(e) for e in data["examples"])
        labels = tuple(data["labels"]) if data.get("labels") else None
        test, rest = split_test(examples, kind, labels, k_per_class, k_other, max_test)
        excluded = set(exclude)
        rest = [e for e in rest if text_key(e) not in excluded]
        k = k_per_class if kind is TaskKind.CLASSIFICATION else k_other
        train = few_shot_sample(rest, kind, k, seed)
        chosen = texts_of(train)
        dev_k = (dev_k_per_class if kind is TaskKind.CLASSIFICATION else dev_k_other) or k
        dev = few_shot_sample([e for e in rest if text_key(e) not in chosen], kind, min(dev_k, k), seed + 100_003)
        return Task(name, kind, train, dev, test, labels, MetricName(data["metric"]))


def split_test(examples: list[Example], kind: TaskKind, labels: tuple[str, ...] | None, k_per_class: int,
               k_other: int, max_test: int, draws: int = TRAIN_DEV_DRAWS) -> tuple[list[Example], list[Example]]:
    """(test, rest): a seed-independent test set of up to `max_test` examples; the rest is for train + dev.

    The rest keeps room for `draws` disjoint train + dev draws (K train + K dev each): a study's main draw and
    its "seen tasks, unseen data" draw, which excludes the main one's texts. The examples are shuffled with the
    fixed TEST_SPLIT_SEED. Non-classification kinds test on the first min(max_test, n - draws * 2 * k_other) of
    them, but on at least min(MIN_TEST, n - 2 * k_other): a small task keeps a test set and room for one draw,
    and its second draw gets what is left. Classification is stratified by label: a label with n examples reserves
    min(draws * 2 * k_per_class, n - 1) for train + dev (all of them when n = 1) and can spare the rest;
    the test set takes equal shares per label, capped by what each label can spare, and what capped labels
    leave goes to the labels with more to spare (`balanced_shares`). So every label with at least 2
    examples is tested and keeps at least one for train + dev (when max_test >= the number of labels).
    `labels` is not needed (the labels are the examples' outputs); it is kept for the callers.
    """
    rng = random.Random(TEST_SPLIT_SEED)
    order = list(examples)
    rng.shuffle(order)
    if kind is not TaskKind.CLASSIFICATION:
        n = len(order)
        n_test = max(0, min(max_test, max(n - draws * 2 * k_other, min(MIN_TEST, n - 2 * k_other))))
        return order[:n_test], order[n_test:]
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(order):
        by_label.setdefault(ex.output, []).append(i)
    reserve = draws * 2 * k_per_class
    spare = {label: len(idx) - min(reserve, max(len(idx) - 1, 1)) for label, idx in by_label.items()}
    shares = balanced_shares(spare, max_test)
    in_test = {i for label, idx in by_label.items() for i in idx[:shares[label]]}
    return [e for i, e in enumerate(order) if i in in_test], [e for i, e in enumerate(order) if i not in in_test]


def balanced_shares(spare: dict[str, int], capacity: int) -> dict[str, int]:
    """Water-filling: how many test examples each label gives. Labels are served from least to most to
    spare (ties by name); each takes min(its spare, capacity left // labels left), so every label gets an
    equal share unless it cannot spare that many, and what it leaves (and the remainder of an uneven
    division) goes to the labels with more. The shares sum to min(capacity, total spare)."""
    shares: dict[str, int] = {}
    left = max(0, capacity)
    order = sorted(spare, key=lambda label: (spare[label], label))
    for served, label in enumerate(order):
        shares[label] = min(spare[label], left // (len(order) - served))
        left -= shares[label]
    return shares
