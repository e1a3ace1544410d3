"""The BIG-bench conversion, the pool on disk, few-shot sampling and task splits, on a fake sdist."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ipt_engine.data.bigbench import ConversionRules, convert_task
from ipt_engine.data.pool import (
    TaskPool,
    dedupe_examples,
    normalise_text,
    prepare_pool,
    split_test,
    texts_of,
)
from ipt_engine.data.splits import TRAIN_FRACTIONS, load_split, make_splits, save_splits
from ipt_engine.errors import InvalidTaskError
from ipt_engine.metrics import MetricName
from ipt_engine.model_loading import default_cache_dir
from ipt_engine.tasks import Example, TaskKind
from tests.engine.data.fixtures import ROOT, TASKS, write_fake_sdist


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> TaskPool:
    root = tmp_path_factory.mktemp("pool")
    summary = prepare_pool(write_fake_sdist(root / "bigbench-1.0.0.tar.gz"), root / "pool")
    assert summary["usable"] == 5
    return TaskPool(root / "pool")


def test_kinds_labels_and_metrics_are_converted(pool: TaskPool) -> None:
    entries = pool.entries
    assert sorted(entries) == ["family:sub_a", "larger", "parity", "repeat", "sentiment"]
    assert entries["parity"]["kind"] == "classification" and entries["parity"]["labels"] == ["no", "yes"]
    assert entries["larger"]["kind"] == "multiple_choice"
    assert entries["sentiment"]["kind"] == "classification"  # few distinct short targets
    assert entries["repeat"]["kind"] == "generation" and entries["repeat"]["metric"] == "bleu"
    assert entries["family:sub_a"]["metric"] == "rouge_l"
    data = pool.load("repeat")
    assert data["examples"][0]["references"] == ["the word 0"]


def test_every_skip_has_a_reason(pool: TaskPool) -> None:
    skipped = {s["name"]: s["reason"] for s in json.loads((pool.root / "skipped.json").read_text())}
    assert "has subtasks" in skipped["family"]
    assert "needed" in skipped["tiny"]
    assert "not English-only" in skipped["french"]
    assert "programmatic" in skipped["program"]
    assert "unreadable JSON" in skipped["broken"]


def test_few_shot_sampling_is_k_per_class_and_deterministic(pool: TaskPool) -> None:
    task = pool.few_shot("parity", seed=1)
    assert task.kind is TaskKind.CLASSIFICATION and task.metric is MetricName.ACCURACY
    assert sorted(e.output for e in task.train).count("yes") == 16 and len(task.train) == 32
    assert len(task.dev) == 32 and task.test
    again = pool.few_shot("parity", seed=1)
    assert [e.input for e in again.train] == [e.input for e in task.train]
    other = pool.few_shot("parity", seed=2)
    assert [e.input for e in other.train] != [e.input for e in task.train]
    assert [e.input for e in other.test] == [e.input for e in task.test]  # same test for every seed
    for t in (task, other):
        seen = {e.input for e in t.train} | {e.input for e in t.dev}
        assert not seen & {e.input for e in t.test}
        assert not {e.input for e in t.train} & {e.input for e in t.dev}


def test_a_smaller_dev_set_leaves_train_and_test_alone(pool: TaskPool) -> None:
    full = pool.few_shot("parity", seed=1)
    small = pool.few_shot("parity", seed=1, dev_k_per_class=4, dev_k_other=8)
    assert [e.input for e in small.train] == [e.input for e in full.train]
    assert [e.input for e in small.test] == [e.input for e in full.test]
    assert sorted(e.output for e in small.dev) == ["no"] * 4 + ["yes"] * 4
    assert not {e.input for e in small.dev} & ({e.input for e in small.train} | {e.input for e in small.test})
    assert len(pool.few_shot("larger", seed=0, dev_k_other=8).dev) == 8


def test_non_classification_tasks_take_32_shots(pool: TaskPool) -> None:
    task = pool.few_shot("larger", seed=0)
    # 120 examples cannot hold a test set and two draws of 64: the test keeps MIN_TEST = 20, one draw fits, and a
    # second, disjoint draw gets the 36 left (32 train + 4 dev)
    assert len(task.train) == 32 and len(task.dev) == 32 and len(task.test) == 20
    second = pool.few_shot("larger", seed=1, exclude=texts_of(task.train + task.dev))
    assert (len(second.train), len(second.dev)) == (32, 4)
    assert all(e.options and e.output in e.options for e in task.train)


def test_splits_are_consistent_and_saved(pool: TaskPool, tmp_path: Path) -> None:
    splits = make_splits(pool, seed=0, test_fraction=0.4)
    random_split = splits["random"]
    assert not set(random_split["train"]) & set(random_split["test"])
    assert sorted(random_split["train"] + random_split["test"]) == pool.names
    assert set(splits["cls-only"]["train"]) == {"parity", "sentiment"}
    assert set(splits["non-cls-only"]["test"]) == {"parity", "sentiment"}
    sizes = [len(splits[f"random-train-{p}"]["train"]) for p in TRAIN_FRACTIONS]
    assert sizes == sorted(sizes) and sizes[-1] == len(random_split["train"])
    save_splits(splits, tmp_path)
    assert load_split(tmp_path / "random.json") == random_split
    with pytest.raises(FileNotFoundError, match="ipt data prepare"):
        load_split(tmp_path / "nope.json")


def test_unknown_task_is_a_clear_error(pool: TaskPool) -> None:
    from ipt_engine.errors import InvalidTaskError

    with pytest.raises(InvalidTaskError, match="not in the pool"):
        pool.few_shot("nope", 0)


def test_convert_rejects_too_many_options() -> None:
    data = {"examples": [{"input": "q", "target_scores": {str(i): int(i == 0) for i in range(12)}}] * 200}
    result = convert_task("many/task.json", data, ConversionRules())
    assert getattr(result, "reason", "").startswith("more than 10 answer options")


@pytest.mark.real_data
def test_real_bigbench_sdist_gives_a_pool_of_all_kinds(tmp_path: Path) -> None:
    sdist = default_cache_dir() / "bigbench" / "bigbench-1.0.0.tar.gz"
    if not sdist.is_file():
        pytest.skip(f"the BIG-bench sdist is not in the cache ({sdist}); `ipt data prepare` downloads it")
    summary = prepare_pool(sdist, tmp_path / "pool")
    assert summary["usable"] >= 100
    assert set(summary["by_kind"]) == {"classification", "multiple_choice", "generation"}
    assert summary["skipped"] > 0 and "programmatic task: needs code to generate examples" in summary["skip_reasons"]


def test_fixture_covers_the_formats() -> None:
    assert any("target_scores" in t.get("examples", [{}])[0] for t in TASKS.values() if t.get("examples"))


def test_index_says_why_tasks_were_skipped(pool: TaskPool) -> None:
    index = json.loads((pool.root / "index.json").read_text())
    assert index["summary"]["usable"] == len(index["tasks"]) == 5
    reasons = {s["name"]: s["reason"] for s in index["skipped"]}
    assert set(reasons) == {"family", "tiny", "french", "program", "broken"}


# A skewed classification task: 150 / 40 / 12 / 3 distinct inputs per label, plus 12 duplicates after them
# (exact, whitespace/case, full-width (NFKC) and one with another label) that preparing the pool drops.
SKEWED_COUNTS = {"alpha": 150, "beta": 40, "gamma": 12, "delta": 3}
SKEWED_DUPLICATES = 12


def _item(label: str, i: int) -> str:
    return f"Item {label} number {i}."


def _skewed_examples() -> list[dict[str, Any]]:
    distinct = [{"input": _item(label, i), "target": label} for label, n in SKEWED_COUNTS.items() for i in range(n)]
    duplicates = (
        [{"input": _item("alpha", i), "target": "alpha"} for i in range(5)]  # exact
        + [{"input": f"  ITEM beta\tnumber {i}.  ", "target": "beta"} for i in range(3)]  # case and whitespace
        + [{"input": _item("gamma", i).upper(), "target": "gamma"} for i in range(2)]  # case
        + [{"input": "\uff29\uff54\uff45\uff4d delta number 0.", "target": "delta"}]  # full-width "Item" (NFKC)
        + [{"input": _item("alpha", 5).lower(), "target": "delta"}]  # same input, another label: the first stays
    )
    assert len(duplicates) == SKEWED_DUPLICATES
    return distinct + duplicates


def _write_sdist(path: Path, tasks: dict[str, dict[str, Any]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in tasks.items():
            payload = json.dumps(data).encode()
            info = tarfile.TarInfo(f"{ROOT}/{rel}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> TaskPool:
    root = tmp_path_factory.mktemp("skewed")
    task = {"name": "skewed", "keywords": ["x"], "metrics": ["exact_str_match"], "examples": _skewed_examples()}
    summary = prepare_pool(_write_sdist(root / "bigbench-1.0.0.tar.gz", {"skewed/task.json": task}), root / "pool")
    assert summary["usable"] == 1
    return TaskPool(root / "pool")


def _label_counts(examples: list[Example]) -> dict[str, int]:
    return dict(Counter(e.output for e in examples))


def test_normalise_text_and_dedupe_examples() -> None:
    assert normalise_text("  \uff28\uff45llo\t \n WORLD  Stra\u00dfe ") == "hello world strasse"
    question = Example("Which?", "a", ("a", "b"))
    same = [Example(" which? ", "b", ("B ", "A")), Example("WHICH?", "a", ("a", "b"))]
    other = [Example("Which?", "a", ("a", "c")), Example("Which one?", "a", ("a", "b"))]
    kept, dropped = dedupe_examples([question, *same, *other])
    assert kept == [question, *other] and dropped == 2
    assert texts_of([Example(" A  b ", "x"), Example("a B", "y")]) == {"a b"}


def test_index_records_the_duplicates_dropped(skewed: TaskPool, pool: TaskPool) -> None:
    index = json.loads((skewed.root / "index.json").read_text())
    assert index["summary"]["duplicates_dropped"] == SKEWED_DUPLICATES
    entry = skewed.entries["skewed"]
    assert entry["duplicates_dropped"] == SKEWED_DUPLICATES and entry["num_examples"] == 205
    written = [Example.from_dict(e) for e in skewed.load("skewed")["examples"]]
    assert _label_counts(written) == SKEWED_COUNTS and dedupe_examples(written)[1] == 0
    assert all(e["duplicates_dropped"] == 0 for e in pool.entries.values())


@pytest.mark.parametrize(("max_test", "expected"), [
    (200, {"alpha": 86, "beta": 1, "gamma": 1, "delta": 1}),  # every label gives all it can spare
    (20, {"alpha": 17, "beta": 1, "gamma": 1, "delta": 1}),  # the rare labels' shares are capped at 1
    (12, {"alpha": 9, "beta": 1, "gamma": 1, "delta": 1}),
    (3, {"alpha": 1, "delta": 1, "gamma": 1}),  # fewer places than labels: beta, first of the least spare, gets 0
])
def test_classification_test_set_is_balanced_across_labels(skewed: TaskPool, max_test: int,
                                                          expected: dict[str, int]) -> None:
    # spare per label (K = 16, room for 2 draws of train + dev: 64): alpha 150 - 64 = 86, beta 40 - 39 = 1,
    # gamma 12 - 11 = 1, delta 3 - 2 = 1
    task = skewed.few_shot("skewed", seed=0, max_test=max_test)
    assert _label_counts(task.test) == expected
    if max_test >= len(SKEWED_COUNTS):
        assert set(_label_counts(task.train)) == set(SKEWED_COUNTS) <= set(expected)  # every train label tested
    left = {label: n - expected.get(label, 0) for label, n in SKEWED_COUNTS.items()}
    assert _label_counts(task.train) == {label: min(16, n) for label, n in left.items()}


def test_splits_share_no_normalised_text_and_test_is_seed_independent(skewed: TaskPool) -> None:
    first = skewed.few_shot("skewed", seed=0)
    for seed in range(4):
        task = skewed.few_shot("skewed", seed=seed)
        train, dev, test = texts_of(task.train), texts_of(task.dev), texts_of(task.test)
        assert len(train) == len(task.train) and len(dev) == len(task.dev) and len(test) == len(task.test)
        assert not train & dev and not train & test and not dev & test
        assert [e.input for e in task.test] == [e.input for e in first.test]
    assert [e.input for e in skewed.few_shot("skewed", 5, exclude=texts_of(first.train)).test] == \
        [e.input for e in first.test]


def test_an_unseen_data_seed_excludes_the_main_seeds_train_and_dev(skewed: TaskPool) -> None:
    main = skewed.few_shot("skewed", seed=0, max_test=20)
    used = texts_of(main.train + main.dev)
    assert used & texts_of(skewed.few_shot("skewed", seed=1, max_test=20).train)  # overlap unless excluded
    unseen = skewed.few_shot("skewed", seed=1, max_test=20, exclude=used)
    assert not used & texts_of(unseen.train + unseen.dev)
    assert not texts_of(unseen.train) & texts_of(unseen.dev)
    # left for train + dev after test (17 / 1 / 1 / 1): 133 / 39 / 11 / 2; main took 32 / 32 / 11 / 2
    assert _label_counts(unseen.train) == {"alpha": 16, "beta": 7} and _label_counts(unseen.dev) == {"alpha": 16}
    assert [e.input for e in unseen.test] == [e.input for e in main.test]


def test_a_pool_prepared_before_dedup_is_deduplicated_when_sampled(tmp_path: Path) -> None:
    distinct = [{"input": f"Is {i} big?", "output": ["no", "yes"][i % 2]} for i in range(80)]
    variants = [{"input": f"  IS {e['input'][3:]} ", "output": e["output"]} for e in distinct]
    (tmp_path / "tasks").mkdir()
    entry = {"name": "old", "kind": "classification", "metric": "accuracy", "labels": ["no", "yes"]}
    (tmp_path / "index.json").write_text(json.dumps({"tasks": [entry]}))
    (tmp_path / "tasks" / "old.json").write_text(json.dumps({**entry, "examples": distinct + variants}))
    for seed in range(3):
        task = TaskPool(tmp_path).few_shot("old", seed=seed)
        assert _label_counts(task.test) == {"no": 1, "yes": 1}  # 40 distinct per label, 39 kept for train + dev
        splits = [texts_of(task.train), texts_of(task.dev), texts_of(task.test)]
        assert sum(map(len, splits)) == len(set().union(*splits)) == len(task.train + task.dev + task.test)


def test_exclusion_that_leaves_too_little_is_a_clear_error(skewed: TaskPool) -> None:
    everything = texts_of(Example.from_dict(e) for e in skewed.load("skewed")["examples"])
    with pytest.raises(InvalidTaskError, match="training example"):
        skewed.few_shot("skewed", seed=0, exclude=everything)


def test_split_test_keeps_the_old_rule_for_other_kinds() -> None:
    examples = [Example(f"q{i}", "a", ("a", "b")) for i in range(200)]
    test, rest = split_test(examples, TaskKind.MULTIPLE_CHOICE, None, 16, 32, 200)
    assert len(test) == 200 - 128 and len(rest) == 128 and not texts_of(test) & texts_of(rest)  # 2 draws x 64
