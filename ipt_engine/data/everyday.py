"""The everyday suite: four small, hand-written few-shot classification tasks shipped with the engine.

Users of the service upload about 16 examples per label of ordinary tasks. This suite stands in for such
uploads so that benchmarks and real-model tests can judge whether a learned task beats the bare language
model on realistic data rather than on toy tasks:

    app_review_sentiment   positive / negative / neutral         mobile app store reviews
    product_category       electronics / clothing / kitchen / books   shop product titles
    email_urgency          urgent / normal / low                 short work emails
    support_intent         billing / shipping / technical / account   customer support messages

Every task has exactly 16 train, 8 dev and 12 test examples per label (K = 16 as in the paper), with the
examples of each split interleaved across labels. No input repeats (after Unicode normalisation, casefolding
and whitespace collapse) within or across the splits of a task. The test inputs are written apart from the
train inputs: other products, apps and topics, other vocabulary and sentence shapes, some longer or more
indirect, so that a model cannot pass test by matching the surface of train (every test input shares less
than 0.6 word-set Jaccard similarity with every train input of its task).

The tasks live in `everyday_tasks.jsonl` next to this module (one `Task.to_dict()` object per line), shipped
as package data.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable

from ipt_engine.tasks import Task, load_tasks

EVERYDAY_TASKS_FILE: Traversable = files("ipt_engine.data") / "everyday_tasks.jsonl"
"""The suite's task file (JSON Lines, one task per line)."""


def everyday_tasks(names: Sequence[str] | None = None) -> list[Task]:
    """The everyday tasks, all of them in file order, or the named ones in the order named.

    A single string counts as one name. Raises ValueError, naming the known tasks, for an unknown name.
    """
    with as_file(EVERYDAY_TASKS_FILE) as path:
        tasks = load_tasks(path)
    if names is None:
        return tasks
    if isinstance(names, str):
        names = [names]
    by_name = {task.name: task for task in tasks}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown everyday task(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[name] for name in names]
