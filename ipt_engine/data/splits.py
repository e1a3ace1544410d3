"""Task splits: which pool tasks train the subspace (MSF) and which are held out as unseen tasks.

- `random`: a seeded shuffle; about `test_fraction` of the tasks are held out.
- `cls-only`: MSF sees classification tasks only; the held-out tasks are the non-classification ones.
- `non-cls-only`: the reverse.
- `random-train-20` ... `random-train-100`: nested prefixes (20/40/60/80/100%) of the random split's train
  tasks, with the same held-out tasks (how the number of train tasks matters).
Each split is a JSON file {"name", "description", "train": [...], "test": [...]} that experiments name.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ipt_engine.data.pool import TaskPool
from ipt_engine.tasks import TaskKind

TRAIN_FRACTIONS = (20, 40, 60, 80, 100)


def make_splits(pool: TaskPool, seed: int = 0, test_fraction: float = 0.2) -> dict[str, dict[str, Any]]:
    """Build every split of the pool's tasks."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    names = pool.names
    shuffled = list(names)
    random.Random(seed).shuffle(shuffled)
    n_test = max(1, round(len(shuffled) * test_fraction))
    test, train = sorted(shuffled[:n_test]), shuffled[n_test:]
    cls = [n for n in names if pool.kind(n) is TaskKind.CLASSIFICATION]
    non_cls = [n for n in names if pool.kind(n) is not TaskKind.CLASSIFICATION]
    splits = {
        "random": _split("random", f"seeded shuffle (seed {seed}); {n_test} held-out tasks", sorted(train), test),
        "cls-only": _split("cls-only", "train on classification tasks, hold out the rest", cls, non_cls),
        "non-cls-only": _split("non-cls-only", "train on non-classification tasks, hold out classification",
                               non_cls, cls),
    }
    for pct in TRAIN_FRACTIONS:
        k = max(1, round(len(train) * pct / 100))
        splits[f"random-train-{pct}"] = _split(f"random-train-{pct}", f"the first {pct}% of the random split's "
                                               f"shuffled train tasks; same held-out tasks", sorted(train[:k]), test)
    return splits


def _split(name: str, description: str, train: list[str], test: list[str]) -> dict[str, Any]:
    return {"name": name, "description": description, "train": train, "test": test}


def save_splits(splits: dict[str, dict[str, Any]], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        (directory / f"{name}.json").write_text(json.dumps(split, indent=1) + "\n")


def load_split(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist; run `ipt data prepare` first")
    split = json.loads(path.read_text())
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "test")):
        raise ValueError(f"{path} is not a split file (needs 'train' and 'test' lists)")
    return split
