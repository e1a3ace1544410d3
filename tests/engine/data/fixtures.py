"""A small fake BIG-bench sdist, in BIG-bench's own JSON task format, for the data tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def _cls_examples(n: int) -> list[dict[str, Any]]:
    return [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}}
            for i in range(n)]


def _mc_examples(n: int) -> list[dict[str, Any]]:
    return [{"input": f"Which is larger than {i}?", "target_scores": {str(i + 1): 1, str(i - 1): 0, str(i - 2): 0}}
            for i in range(n)]


def _gen_examples(n: int) -> list[dict[str, Any]]:
    return [{"input": f"Repeat the word number {i}.", "target": [f"word {i}", f"the word {i}"]} for i in range(n)]


def _label_gen_examples(n: int) -> list[dict[str, Any]]:
    return [{"input": f"Sentiment of review {i}", "target": ["positive", "negative", "neutral"][i % 3]}
            for i in range(n)]


TASKS: dict[str, dict[str, Any]] = {
    "parity/task.json": {"name": "parity", "keywords": ["logic"], "metrics": ["multiple_choice_grade"],
                         "examples": _cls_examples(100)},
    "larger/task.json": {"name": "larger", "keywords": ["math"], "metrics": ["multiple_choice_grade"],
                         "examples": _mc_examples(120)},
    "repeat/task.json": {"name": "repeat", "keywords": ["memory"], "metrics": ["exact_str_match", "bleu"],
                         "preferred_score": "bleu", "examples": _gen_examples(120)},
    "sentiment/task.json": {"name": "sentiment", "keywords": ["emotion"], "metrics": ["exact_str_match"],
                            "examples": _label_gen_examples(200)},
    "family/task.json": {"name": "family", "keywords": ["x"]},
    "family/sub_a/task.json": {"name": "sub_a", "keywords": ["x"], "metrics": ["rouge"],
                               "preferred_score": "rougeLsum", "examples": _gen_examples(90)},
    "tiny/task.json": {"name": "tiny", "keywords": ["x"], "metrics": ["exact_str_match"],
                       "examples": _gen_examples(10)},
    "french/task.json": {"name": "french", "keywords": ["non-English"], "examples": _gen_examples(200)},
}


def write_fake_sdist(path: Path) -> Path:
    """A tar.gz laid out like the bigbench sdist: the tasks above plus one programmatic task."""
    with tarfile.open(path, "w:gz") as tar:
        files = {f"{ROOT}/{rel}": json.dumps(data).encode() for rel, data in TASKS.items()}
        files[f"{ROOT}/program/task.py"] = b"# a programmatic task\n"
        files[f"{ROOT}/broken/task.json"] = b"{not json"
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path
