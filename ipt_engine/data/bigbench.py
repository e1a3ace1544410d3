"""Reading BIG-bench JSON tasks from its PyPI sdist and converting them to the engine's task format.

The sdist (`bigbench==1.0.0`, 358 MB) is fetched with `pip download --no-deps` into a cache directory and
never installed; only its `benchmark_tasks/**/task.json` files are read, straight from the tarball.
Programmatic tasks (a `task.py` and no `task.json`) are skipped, as are tasks that do not fit few-shot use
here, each with its reason.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from ipt_engine.errors import DataUnavailableError
from ipt_engine.metrics import MetricName
from ipt_engine.tasks import Example, TaskKind

log = logging.getLogger(__name__)

SDIST_NAME = "bigbench"
SDIST_VERSION = "1.0.0"
TASKS_DIR_MARKER = "/bigbench/benchmark_tasks/"
NON_ENGLISH_KEYWORDS = frozenset({"non-English", "low-resource language", "translation", "multilingual"})
# Some non-English tasks carry none of those keywords; their description names the language.
NON_ENGLISH_LANGUAGES = ("German", "French", "Spanish", "Italian", "Portuguese", "Dutch", "Russian", "Hindi",
                         "Chinese", "Japanese", "Korean", "Arabic", "Persian", "Swahili", "Turkish", "Polish",
                         "Hebrew", "Bengali", "Kannada", "Tamil", "Telugu", "Urdu", "Vietnamese", "Indonesian")
_SCORE_TO_METRIC = {
    "multiple_choice_grade": MetricName.ACCURACY,
    "exact_str_match": MetricName.EXACT_MATCH,
    "macro_f1": MetricName.MACRO_F1,
    "rouge": MetricName.ROUGE_L,
    "rougeLsum": MetricName.ROUGE_L,
    "rougeL": MetricName.ROUGE_L,
    "bleu": MetricName.BLEU,
}


@dataclass(frozen=True)
class ConversionRules:
    """What makes a BIG-bench task usable for few-shot IPT here."""

    k_per_class: int = 16  # few-shot K per class (classification), for train and again for dev
    k_other: int = 32  # few-shot K for multiple choice and generation, for train and again for dev
    min_test: int = 20  # at least this many examples must be left for testing
    max_labels: int = 10  # a fixed output set larger than this is not treated as classification
    max_options: int = 10  # multiple-choice examples with more options are too costly to rank
    max_median_input_chars: int = 1500  # longer inputs make CPU experiments impractical
    max_median_output_chars: int = 300
    max_examples_kept: int = 2000  # larger tasks keep a fixed random sample (the test set needs a few hundred)


@dataclass
class ConvertedTask:
    """A usable task with all its examples (few-shot splits are drawn later, per seed)."""

    name: str
    kind: TaskKind
    metric: MetricName
    examples: list[Example]
    labels: tuple[str, ...] | None
    source: str  # path inside the sdist
    keywords: list[str] = field(default_factory=list)
    description: str = ""


@dataclass(frozen=True)
class Skipped:
    name: str
    source: str
    reason: str


def download_sdist(cache_dir: Path) -> Path:
    """The sdist in `cache_dir`, fetched with `pip download --no-deps` when missing (never installed)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(cache_dir.glob(f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(cache_dir)]
    log.info("downloading the BIG-bench sdist (358 MB) into %s", cache_dir)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(cache_dir.glob(f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"))
    if not found:  # pip may fail after saving (metadata step); the file is all we need
        reasons = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or [result.stderr[-500:]]
        raise DataUnavailableError(
            f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip (exit {result.returncode}): "
            + " / ".join(reasons)
            + f". The package index this machine reaches does not serve it; copy a {SDIST_NAME}-{SDIST_VERSION}.tar.gz "
            f"into {cache_dir} or pass it with --sdist")
    return found[0]


def iter_task_files(sdist: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Yield (path relative to benchmark_tasks/, parsed task.json or None, error) for every task.json,
    and (path, None, 'programmatic') for every task.py directory without a task.json."""
    json_dirs: set[str] = set()
    py_dirs: set[str] = set()
    with tarfile.open(sdist) as tar:
        for member in tar:
            if TASKS_DIR_MARKER not in member.name or not member.isfile():
                continue
            rel = member.name.split(TASKS_DIR_MARKER, 1)[1]
            if rel.endswith("/task.py"):
                py_dirs.add(rel.rsplit("/", 1)[0])
            if not rel.endswith("/task.json"):
                continue
            json_dirs.add(rel.rsplit("/", 1)[0])
            handle = tar.extractfile(member)
            try:
                data = json.load(handle) if handle is not None else None
                yield rel, data, None
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield rel, None, f"unreadable JSON ({exc})"
    for d in sorted(py_dirs - json_dirs):
        yield f"{d}/task.py", None, "programmatic task (task.py): needs code to generate examples"


def task_name(rel_path: str) -> str:
    """'arithmetic/1_digit_addition/task.json' -> 'arithmetic:1_digit_addition'."""
    return ":".join(rel_path.split("/")[:-1])


def convert_task(rel_path: str, data: dict[str, Any], rules: ConversionRules,
                 has_subtasks: bool = False) -> ConvertedTask | Skipped:
    """Convert one BIG-bench task.json, or say why it is skipped."""
    name = task_name(rel_path)

    def skip(reason: str) -> Skipped:
        return Skipped(name, rel_path, reason)

    raw = data.get("examples")
    if not raw:
        return skip("has subtasks; they are converted one by one" if has_subtasks else "no examples")
    keywords = list(data.get("keywords") or [])
    foreign = sorted(NON_ENGLISH_KEYWORDS & set(keywords))
    if foreign:
        return skip(f"not English-only (keywords {foreign})")
    description = str(data.get("description", ""))
    named = [lang for lang in NON_ENGLISH_LANGUAGES if re.search(rf"\b{lang}\b", description)]
    if named:
        return skip(f"not English-only (description names {named})")
    mc = [e for e in raw if isinstance(e, dict) and isinstance(e.get("target_scores"), dict) and e["target_scores"]]
    gen = [e for e in raw if isinstance(e, dict) and "target" in e and "target_scores" not in e]
    if mc and len(mc) >= len(gen):
        examples, kind, labels = _from_target_scores(mc, rules)
    elif gen:
        examples, kind, labels = _from_targets(gen, rules)
    else:
        return skip("examples have neither 'target' nor 'target_scores'")
    if kind is None:
        return skip(labels)  # type: ignore[arg-type]  # _from_* return the reason in place of labels
    if _non_latin_share(examples) > 0.2:
        return skip("not English-only (mostly non-Latin script)")
    if median(len(e.input) for e in examples) > rules.max_median_input_chars:
        return skip(f"inputs too long for few-shot runs here (median > {rules.max_median_input_chars} chars)")
    if median(len(e.output) for e in examples) > rules.max_median_output_chars:
        return skip(f"outputs too long (median > {rules.max_median_output_chars} chars)")
    need = _needed_examples(kind, labels, rules)
    if len(examples) < need:
        return skip(f"{len(examples)} examples; {need} needed for {_k(kind, rules)}-shot train + dev and "
                    f"{rules.min_test} test")
    return ConvertedTask(name, kind, _metric(data, kind), examples, labels, rel_path, keywords,
                         str(data.get("description", ""))[:300])


def _non_latin_share(examples: list[Example], sample: int = 200) -> float:
    """Share of letters outside the Latin script in inputs and outputs (catches untagged non-English tasks)."""
    text = "".join(e.input + e.output for e in examples[:sample])
    letters = [c for c in text if c.isalpha()]
    return sum(not ("a" <= c.lower() <= "z" or "\u00c0" <= c <= "\u024f") for c in letters) / max(len(letters), 1)


def _k(kind: TaskKind, rules: ConversionRules) -> int:
    return rules.k_per_class if kind is TaskKind.CLASSIFICATION else rules.k_other


def _needed_examples(kind: TaskKind, labels: tuple[str, ...] | None, rules: ConversionRules) -> int:
    per_split = rules.k_per_class * len(labels or ()) if kind is TaskKind.CLASSIFICATION else rules.k_other
    return 2 * per_split + rules.min_test


def _from_target_scores(raw: list[dict[str, Any]], rules: ConversionRules
                        ) -> tuple[list[Example], TaskKind | None, Any]:
    examples = []
    for e in raw:
        scores = {str(k): float(v) for k, v in e["target_scores"].items()}
        best = max(scores.values())
        correct = [o for o, s in scores.items() if s == best]
        options = tuple(scores)
        if len(options) < 2 or len(correct) == len(options):
            continue  # no distinguishable answer
        examples.append(Example(str(e.get("input", "")), correct[0], options, tuple(correct[1:])))
    if not examples:
        return [], None, "no example has a single best option"
    if max(len(e.options or ()) for e in examples) > rules.max_options:
        return [], None, f"more than {rules.max_options} answer options per example"
    option_sets = {frozenset(e.options or ()) for e in examples}
    if len(option_sets) == 1 and all(not e.references for e in examples):
        labels = tuple(sorted(next(iter(option_sets))))
        return [Example(e.input, e.output) for e in examples], TaskKind.CLASSIFICATION, labels
    return examples, TaskKind.MULTIPLE_CHOICE, None


def _from_targets(raw: list[dict[str, Any]], rules: ConversionRules) -> tuple[list[Example], TaskKind | None, Any]:
    examples = []
    for e in raw:
        target = e["target"]
        targets = [str(t) for t in target] if isinstance(target, list) else [str(target)]
        targets = [t for t in targets if t.strip()]
        if targets:
            examples.append(Example(str(e.get("input", "")), targets[0], None, tuple(targets[1:])))
    if not examples:
        return [], None, "no example has a non-empty target"
    counts = Counter(e.output for e in examples)
    single_answer = all(not e.references for e in examples)
    if (single_answer and 2 <= len(counts) <= rules.max_labels and min(counts.values()) >= 2
            and all(len(o.split()) <= 3 for o in counts)):
        return examples, TaskKind.CLASSIFICATION, tuple(sorted(counts))
    return examples, TaskKind.GENERATION, None


def _metric(data: dict[str, Any], kind: TaskKind) -> MetricName:
    """The task's own preferred score where the engine has it; accuracy for option tasks."""
    if kind is not TaskKind.GENERATION:
        return MetricName.ACCURACY
    for score in [data.get("preferred_score"), *(data.get("metrics") or [])]:
        if score in _SCORE_TO_METRIC and _SCORE_TO_METRIC[score] is not MetricName.ACCURACY:
            return _SCORE_TO_METRIC[score]
    return MetricName.ROUGE_L
