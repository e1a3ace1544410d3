"""The task format: a named few-shot task of text-to-text examples, its splits, and its formatting.

A task is a name, a kind (classification / multiple choice / generation), examples of (input, output,
optional answer options) and train / dev / test splits. `to_text_pair` is the one formatting function
that turns an example into the (source, target) strings every trainer, scorer and server uses; as in the
paper, the task name is prefixed to the input.

Task files are JSON Lines with one task per line (see `Task.to_dict`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ipt_engine.errors import InvalidTaskError
from ipt_engine.metrics import MetricName

MIN_TRAIN_EXAMPLES = 2
"""Fewer than two training examples cannot define a task (nor leave anything to validate on)."""


class TaskKind(StrEnum):
    """How a task's answers are produced and scored."""

    CLASSIFICATION = "classification"  # one fixed label set for the whole task; rank classification
    MULTIPLE_CHOICE = "multiple_choice"  # options given per example; rank classification
    GENERATION = "generation"  # free text, greedy decoding

    @property
    def has_options(self) -> bool:
        return self is not TaskKind.GENERATION

    @property
    def default_metric(self) -> MetricName:
        return MetricName.ROUGE_L if self is TaskKind.GENERATION else MetricName.ACCURACY


@dataclass(frozen=True)
class Example:
    """One input/output pair. `options` holds per-example answer options (multiple choice only);
    `references` holds further acceptable outputs for scoring generation (the first is `output`)."""

    input: str
    output: str
    options: tuple[str, ...] | None = None
    references: tuple[str, ...] = ()

    @property
    def all_references(self) -> tuple[str, ...]:
        return (self.output, *[r for r in self.references if r != self.output])

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"input": self.input, "output": self.output}
        if self.options is not None:
            data["options"] = list(self.options)
        if self.references:
            data["references"] = list(self.references)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        if not isinstance(data, dict):
            raise InvalidTaskError(f"an example must be an object with 'input' and 'output', got {data!r:.80}")
        options = data.get("options")
        if options is not None and not isinstance(options, list | tuple):
            raise InvalidTaskError(f"example 'options' must be a list of strings, got {options!r:.80}")
        try:
            options = data.get("options")
            return cls(
                input=str(data["input"]),
                output=str(data["output"]),
                options=tuple(str(o) for o in options) if options is not None else None,
                references=tuple(str(r) for r in data.get("references", ())),
            )
        except KeyError as exc:
            raise InvalidTaskError(f"example is missing the field {exc.args[0]!r}: {data!r:.200}") from None


@dataclass(frozen=True)
class TextPair:
    """An example in text-to-text form: the model reads `source` and should continue with `target`."""

    source: str
    target: str


def source_prefix(task_name: str) -> str:
    """The start of every source of a task, before its input: `"{task_name}:"`. Being the same for all of the
    task's examples, a causal LM's keys and values for it can be cached with the task's prompt (`prompt_kv`)."""
    return f"{task_name}:"


def to_text_pair(task_name: str, kind: TaskKind, input_text: str, output_text: str = "",
                 options: Sequence[str] | None = None) -> TextPair:
    """Format one example of a task as (source, target) text. The only formatting function in the project.

    The source is `"{task_name}: {input}"` (`source_prefix`, a space, the input), followed for multiple choice by
    the options, and ends with `"\\nAnswer:"`; the target is the output with a leading space (so that it tokenizes
    like running text).
    """
    source = f"{source_prefix(task_name)} {input_text.strip()}"
    if kind is TaskKind.MULTIPLE_CHOICE and options:
        source += "\nOptions: " + " | ".join(o.strip() for o in options)
    return TextPair(source=source + "\nAnswer:", target=" " + output_text.strip())


@dataclass(frozen=True)
class TaskHead:
    """What answering a task needs without its examples: name, kind, labels (the service holds this)."""

    name: str
    kind: TaskKind
    labels: tuple[str, ...] | None = None

    def options_for(self, example: Example) -> tuple[str, ...] | None:
        if self.kind is TaskKind.CLASSIFICATION:
            return self.labels
        if self.kind is TaskKind.MULTIPLE_CHOICE:
            return example.options
        return None

    def text_pair(self, example: Example) -> TextPair:
        return to_text_pair(self.name, self.kind, example.input, example.output, self.options_for(example))

    @property
    def source_prefix(self) -> str:
        return source_prefix(self.name)


@dataclass
class Task:
    """A few-shot task: examples split into train / dev / test, plus what is needed to score answers.

    `labels` is the label set of a classification task (the options of every example); `metric` is the
    score used for dev selection and reports.
    """

    name: str
    kind: TaskKind
    train: list[Example]
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    labels: tuple[str, ...] | None = None
    metric: MetricName | None = None

    def __post_init__(self) -> None:
        self.kind = TaskKind(self.kind)
        self.metric = MetricName(self.metric) if self.metric else self.kind.default_metric
        if self.labels is not None:
            self.labels = tuple(self.labels)
        self.validate()

    def validate(self) -> None:
        """Raise InvalidTaskError naming the first problem found."""
        if not self.name or not self.name.strip():
            raise InvalidTaskError("a task needs a non-empty name")
        if len(self.train) < MIN_TRAIN_EXAMPLES:
            raise InvalidTaskError(
                f"task {self.name!r} has {len(self.train)} training example(s); at least "
                f"{MIN_TRAIN_EXAMPLES} are needed to learn anything (give more examples)"
            )
        if self.kind is TaskKind.CLASSIFICATION:
            if not self.labels or len(self.labels) < 2:
                raise InvalidTaskError(
                    f"classification task {self.name!r} needs a label set of at least 2 options "
                    f"(got {list(self.labels or [])}); pass labels, or use kind 'generation'"
                )
            if len(set(self.labels)) != len(self.labels):
                raise InvalidTaskError(f"task {self.name!r} has duplicate labels: {list(self.labels)}")
            for split, ex in self._all_examples():
                if ex.output not in self.labels:
                    raise InvalidTaskError(
                        f"task {self.name!r} {split} example output {ex.output!r} is not one of the labels "
                        f"{list(self.labels)}"
                    )
        elif self.kind is TaskKind.MULTIPLE_CHOICE:
            for split, ex in self._all_examples():
                if not ex.options or len(ex.options) < 2:
                    raise InvalidTaskError(
                        f"multiple-choice task {self.name!r} has a {split} example without at least 2 "
                        f"options: {ex.input!r:.80}"
                    )
                if ex.output not in ex.options:
                    raise InvalidTaskError(
                        f"task {self.name!r} {split} example output {ex.output!r} is not among its options "
                        f"{list(ex.options)}"
                    )

    def _all_examples(self) -> Iterator[tuple[str, Example]]:
        for split in ("train", "dev", "test"):
            for ex in getattr(self, split):
                yield split, ex

    @property
    def head(self) -> TaskHead:
        """What answering this task needs: name, kind, labels."""
        return TaskHead(self.name, self.kind, self.labels)

    def options_for(self, example: Example) -> tuple[str, ...] | None:
        """The answer options of an example: the task's labels, the example's options, or None."""
        return self.head.options_for(example)

    def text_pair(self, example: Example) -> TextPair:
        """The (source, target) text of an example of this task."""
        return self.head.text_pair(example)

    @property
    def source_prefix(self) -> str:
        """The start of every source of this task (`source_prefix`)."""
        return self.head.source_prefix

    def with_dev_split(self, dev_fraction: float = 0.25, seed: int = 0) -> Task:
        """Return a copy whose dev set is split off the train set when it has none (stratified by output
        for classification, so every label keeps training examples)."""
        if self.dev:
            return self
        train, dev = split_off(self.train, dev_fraction, seed, by_output=self.kind is TaskKind.CLASSIFICATION)
        return Task(self.name, self.kind, train, dev, list(self.test), self.labels, self.metric)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "metric": str(self.metric),
            "labels": list(self.labels) if self.labels is not None else None,
            "train": [e.to_dict() for e in self.train],
            "dev": [e.to_dict() for e in self.dev],
            "test": [e.to_dict() for e in self.test],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        """Build a task from a dict; `kind` is inferred when missing and `labels` of a classification task
        default to the distinct outputs of its examples."""
        if not isinstance(data, dict) or "name" not in data:
            raise InvalidTaskError("a task needs at least the fields 'name' and 'train'")
        for split in ("train", "dev", "test"):
            if not isinstance(data.get(split) or [], list):
                raise InvalidTaskError(f"task {data['name']!r}: '{split}' must be a list of examples")
        splits = {s: [Example.from_dict(e) for e in data.get(s) or []] for s in ("train", "dev", "test")}
        try:
            kind = TaskKind(data["kind"]) if data.get("kind") else infer_kind(splits["train"])
            metric = MetricName(data["metric"]) if data.get("metric") else None
        except ValueError as exc:
            raise InvalidTaskError(f"task {data['name']!r}: {exc}; kinds: {[k.value for k in TaskKind]}, "
                                   f"metrics: {[m.value for m in MetricName]}") from None
        labels = data.get("labels")
        if kind is TaskKind.CLASSIFICATION and not labels:
            labels = sorted({e.output for split in splits.values() for e in split})
        return cls(str(data["name"]), kind, splits["train"], splits["dev"], splits["test"],
                   tuple(str(label) for label in labels) if labels else None, metric)


def infer_kind(examples: Sequence[Example], max_labels: int = 20) -> TaskKind:
    """Guess a task's kind: options on examples -> multiple choice; few distinct short outputs, each seen
    more than once -> classification; else generation."""
    if examples and all(e.options for e in examples):
        return TaskKind.MULTIPLE_CHOICE
    outputs = [e.output for e in examples]
    distinct = set(outputs)
    if 2 <= len(distinct) <= max_labels and len(distinct) < len(outputs) and all(
        len(o.split()) <= 5 for o in distinct
    ):
        return TaskKind.CLASSIFICATION
    return TaskKind.GENERATION


def split_off(examples: Sequence[Example], fraction: float, seed: int,
              by_output: bool = False) -> tuple[list[Example], list[Example]]:
    """Split examples into (kept, split_off) with about `fraction` split off, at least one on each side.

    With `by_output`, the split is stratified per output value so that each class keeps examples.
    """
    if len(examples) < 2:
        raise InvalidTaskError(f"cannot split {len(examples)} example(s) into train and dev; give at least 2")
    if not 0 < fraction < 1:
        raise ValueError(f"dev fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.output if by_output else "", []).append(ex)
    kept: list[Example] = []
    taken: list[Example] = []
    for key in sorted(groups):
        group = list(groups[key])
        rng.shuffle(group)
        k = min(round(len(group) * fraction), len(group) - 1)  # every group keeps at least one
        taken += group[:k]
        kept += group[k:]
    if not taken:  # every group was a singleton: take one example overall
        taken, kept = kept[:1], kept[1:]
    if not kept:
        kept, taken = taken[:1], taken[1:]
    return kept, taken


def few_shot_sample(examples: Sequence[Example], kind: TaskKind, k: int, seed: int) -> list[Example]:
    """Sample K examples per class (classification) or K examples in all (other kinds), deterministically."""
    rng = random.Random(seed)
    if kind is TaskKind.CLASSIFICATION:
        groups: dict[str, list[Example]] = {}
        for ex in examples:
            groups.setdefault(ex.output, []).append(ex)
        picked = [ex for key in sorted(groups) for ex in rng.sample(groups[key], min(k, len(groups[key])))]
        rng.shuffle(picked)
        return picked
    pool = list(examples)
    return rng.sample(pool, min(k, len(pool)))


def load_tasks(path: str | Path) -> list[Task]:
    """Read a JSON Lines task file: one task object per line (blank lines and '#' comments skipped)."""
    tasks = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidTaskError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        try:
            tasks.append(Task.from_dict(data))
        except InvalidTaskError as exc:
            raise InvalidTaskError(f"{path}:{lineno}: {exc}") from None
    if not tasks:
        raise InvalidTaskError(f"{path} holds no tasks")
    return tasks


def save_tasks(tasks: Iterable[Task], path: str | Path) -> None:
    """Write tasks as JSON Lines, one per line."""
    Path(path).write_text("".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in tasks),
                          encoding="utf-8")
