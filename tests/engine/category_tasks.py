"""Small deterministic classification tasks for the real-model tests: name the category of a word.

Each task picks three categories; inputs are template sentences mentioning one item of a category and
the label is the category's name. Tasks over different category triples are related (same format,
overlapping label words) but distinct.
"""

from __future__ import annotations

import random

from ipt_engine.tasks import Example, Task, TaskKind

CATEGORIES: dict[str, list[str]] = {
    "animal": ["dog", "cat", "horse", "rabbit", "lion", "tiger", "elephant", "sheep", "goat", "wolf", "bear", "fox"],
    "fruit": ["apple", "banana", "mango", "pear", "grape", "cherry", "peach", "lemon", "plum", "melon", "kiwi",
              "apricot"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "motorcycle", "van", "tractor", "scooter", "taxi", "tram",
                "jeep"],
    "color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey", "violet",
              "crimson"],
    "sport": ["football", "tennis", "basketball", "golf", "hockey", "baseball", "cricket", "rugby", "volleyball",
              "boxing", "swimming", "skiing"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "saxophone", "clarinet",
                   "banjo", "organ"],
    "profession": ["doctor", "teacher", "lawyer", "nurse", "farmer", "pilot", "chef", "engineer", "plumber",
                   "dentist", "baker", "soldier"],
    "weather": ["rain", "snow", "storm", "fog", "wind", "sunshine", "hail", "thunder", "drizzle", "frost", "sleet",
                "heatwave"],
}
TEMPLATES = [
    "I keep thinking about the {x}.",
    "My friend talked about the {x} all day.",
    "There is something about the {x} in this text.",
    "She wrote a short story about the {x}.",
    "The word of the day is {x}.",
    "Yesterday the news mentioned the {x}.",
]


def category_task(name: str, categories: list[str], seed: int, train_per_label: int = 16, dev_per_label: int = 8,
                  test_per_label: int = 12) -> Task:
    """A 3-way (or k-way) classification task over `categories`, disjoint train / dev / test examples."""
    rng = random.Random(seed)
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for cat in categories:
        pool = [t.format(x=item) for item in CATEGORIES[cat] for t in TEMPLATES]
        rng.shuffle(pool)
        sizes = {"train": train_per_label, "dev": dev_per_label, "test": test_per_label}
        start = 0
        for split, size in sizes.items():
            splits[split] += [Example(text, cat) for text in pool[start:start + size]]
            start += size
    for exs in splits.values():
        rng.shuffle(exs)
    return Task(name, TaskKind.CLASSIFICATION, splits["train"], splits["dev"], splits["test"], tuple(categories))


RELATED = {
    "category_a": ["animal", "fruit", "vehicle"],
    "category_b": ["color", "sport", "weather"],
    "category_c": ["profession", "instrument", "animal"],
    "category_d": ["vehicle", "color", "profession"],
}
TARGET = ("category_target", ["fruit", "sport", "instrument"])


def write_task_files(directory: str) -> None:
    """Write related.jsonl (the related tasks) and target.jsonl (the new task) for the demo."""
    from pathlib import Path

    from ipt_engine.tasks import save_tasks

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_tasks([category_task(n, c, seed=i) for i, (n, c) in enumerate(RELATED.items())], out / "related.jsonl")
    save_tasks([category_task(TARGET[0], TARGET[1], seed=len(RELATED))], out / "target.jsonl")


if __name__ == "__main__":
    import sys

    write_task_files(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
