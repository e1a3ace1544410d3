"""Tests for ipt_engine.metrics: known values, dispatch, and input validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest

from ipt_engine.metrics import (
    MetricName,
    Reference,
    accuracy,
    bleu,
    compute_metric,
    e_abs,
    e_rel,
    exact_match,
    macro_f1,
    normalize_text,
    relative_scores,
    rouge_l,
)

Metric = Callable[[Sequence[str], Sequence[Reference]], float]
ALL_METRICS: list[Metric] = [accuracy, exact_match, macro_f1, rouge_l, bleu]


# --------------------------------------------------------------------------- normalisation


def test_normalize_text_strips_lowercases_and_collapses_whitespace() -> None:
    assert normalize_text("  Hello \t  WORLD\n ") == "hello world"


def test_normalize_text_keeps_punctuation() -> None:
    assert normalize_text("Yes, sir!") == "yes, sir!"


# --------------------------------------------------------------------------- accuracy / exact match


@pytest.mark.parametrize("metric", [accuracy, exact_match])
def test_match_known_value(metric: Metric) -> None:
    assert metric(["a", "b"], ["a", "c"]) == pytest.approx(0.5)


@pytest.mark.parametrize("metric", [accuracy, exact_match])
def test_match_normalises_case_and_whitespace(metric: Metric) -> None:
    assert metric(["  Positive ", "very   GOOD"], ["positive", "Very good"]) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [accuracy, exact_match])
def test_match_does_not_strip_punctuation(metric: Metric) -> None:
    assert metric(["yes."], ["yes"]) == pytest.approx(0.0)


@pytest.mark.parametrize("metric", [accuracy, exact_match])
def test_match_multiple_references(metric: Metric) -> None:
    predictions = ["Paris", "rome", "berlin"]
    references: list[Reference] = [["paris", "Paris, France"], ["Roma", "ROME"], ["madrid", "lisbon"]]
    assert metric(predictions, references) == pytest.approx(2 / 3)


def test_match_string_reference_is_not_split_into_characters() -> None:
    # A plain string reference must be treated as one reference, not a sequence of characters.
    assert accuracy(["a"], ["abc"]) == pytest.approx(0.0)


def test_empty_reference_list_raises() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        accuracy(["a"], [[]])


# --------------------------------------------------------------------------- macro F1


def test_macro_f1_hand_computed_three_labels() -> None:
    references = ["a", "a", "b", "b", "c", "c"]
    predictions = ["a", "b", "b", "b", "c", "a"]
    # a: P=1/2 R=1/2 F1=1/2;  b: P=2/3 R=1 F1=4/5;  c: P=1 R=1/2 F1=2/3
    expected = (1 / 2 + 4 / 5 + 2 / 3) / 3  # = 59/90
    assert macro_f1(predictions, references) == pytest.approx(expected)
    assert macro_f1(predictions, references) == pytest.approx(59 / 90)


def test_macro_f1_normalises_predictions_references_and_labels() -> None:
    references = ["A", "a ", "b", "B", "c", "C"]
    predictions = [" a", "B", "b", "b", "C", "A"]
    assert macro_f1(predictions, references, labels=["A", "B", "C"]) == pytest.approx(59 / 90)


def test_macro_f1_unseen_label_counts_as_zero() -> None:
    references = ["a", "a", "b", "b", "c", "c"]
    predictions = ["a", "b", "b", "b", "c", "a"]
    assert macro_f1(predictions, references, labels=["a", "b", "c", "d"]) == pytest.approx(59 / 120)


def test_macro_f1_perfect_and_all_wrong() -> None:
    assert macro_f1(["x", "y"], ["x", "y"]) == pytest.approx(1.0)
    assert macro_f1(["y", "x"], ["x", "y"]) == pytest.approx(0.0)


# --------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_identical_is_one() -> None:
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)


def test_rouge_l_disjoint_is_zero() -> None:
    assert rouge_l(["alpha beta gamma"], ["delta epsilon zeta"]) == pytest.approx(0.0)


def test_rouge_l_partial_overlap_hand_computed() -> None:
    # prediction tokens: the cat sat on the mat (6); reference: the cat lay on a mat (6)
    # LCS = "the cat on mat" (4) -> P = R = 4/6 -> F = 2/3
    score = rouge_l(["the cat sat on the mat"], ["the cat lay on a mat"])
    assert 0.0 < score < 1.0
    assert score == pytest.approx(2 / 3)


def test_rouge_l_multiple_references_takes_max_and_averages() -> None:
    predictions = ["the cat sat on the mat", "alpha beta"]
    references: list[Reference] = [
        ["dogs bark loudly", "the cat lay on a mat"],  # best = 2/3
        ["gamma delta"],  # 0
    ]
    assert rouge_l(predictions, references) == pytest.approx((2 / 3 + 0.0) / 2)


# --------------------------------------------------------------------------- BLEU


def test_bleu_identical_is_one() -> None:
    sentences = ["the quick brown fox jumps over the dog", "a lazy dog sleeps all day"]
    assert bleu(sentences, sentences) == pytest.approx(1.0)


def test_bleu_disjoint_is_zero() -> None:
    assert bleu(["alpha beta gamma delta epsilon"], ["one two three four five"]) == pytest.approx(0.0)


def test_bleu_partial_overlap_hand_computed() -> None:
    # precisions 1..4-gram: 5/6, 3/5, 2/4, 1/3; equal lengths so BP = 1
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4)
    score = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert score == pytest.approx((1 / 12) ** 0.25, rel=1e-6)


def test_bleu_multiple_references_with_padding() -> None:
    predictions = ["the quick brown fox jumps", "a lazy dog sleeps all day"]
    references: list[Reference] = [
        ["something else entirely here", "the quick brown fox jumps"],
        "a lazy dog sleeps all day",  # only one reference: padded by repetition
    ]
    assert bleu(predictions, references) == pytest.approx(1.0)


def test_bleu_repeated_reference_equals_single_reference() -> None:
    predictions = ["the cat sat on the mat"]
    assert bleu(predictions, [["the cat sat on a mat", "the cat sat on a mat"]]) == pytest.approx(
        bleu(predictions, ["the cat sat on a mat"])
    )


def test_bleu_in_unit_interval() -> None:
    score = bleu(["the quick brown fox", "hello there"], ["the slow brown fox", "hello there friend"])
    assert 0.0 < score < 1.0


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (MetricName.ACCURACY, 0.5),
        ("accuracy", 0.5),
        (MetricName.EXACT_MATCH, 0.5),
        ("exact_match", 0.5),
    ],
)
def test_compute_metric_dispatches_match_metrics(name: MetricName | str, expected: float) -> None:
    assert compute_metric(name, ["a", "b"], ["a", "c"]) == pytest.approx(expected)


def test_compute_metric_dispatches_macro_f1_with_labels() -> None:
    references = ["a", "a", "b", "b", "c", "c"]
    predictions = ["a", "b", "b", "b", "c", "a"]
    assert compute_metric("macro_f1", predictions, references) == pytest.approx(59 / 90)
    assert compute_metric(
        MetricName.MACRO_F1, predictions, references, labels=["a", "b", "c", "d"]
    ) == pytest.approx(59 / 120)


def test_compute_metric_dispatches_generation_metrics() -> None:
    assert compute_metric("rouge_l", ["the cat sat on the mat"], ["the cat lay on a mat"]) == pytest.approx(
        2 / 3
    )
    assert compute_metric(
        MetricName.BLEU, ["the cat sat on the mat"], ["the cat sat on a mat"]
    ) == pytest.approx((1 / 12) ** 0.25, rel=1e-6)


def test_compute_metric_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown metric") as excinfo:
        compute_metric("f2", ["a"], ["a"])
    message = str(excinfo.value)
    for name in MetricName:
        assert name.value in message


def test_compute_metric_macro_f1_rejects_multiple_references() -> None:
    with pytest.raises(ValueError, match="one reference"):
        compute_metric("macro_f1", ["a"], [["a", "b"]])


def test_metric_name_values() -> None:
    assert [m.value for m in MetricName] == ["accuracy", "macro_f1", "exact_match", "rouge_l", "bleu"]
    assert MetricName.ROUGE_L == "rouge_l"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_length_mismatch_raises_with_both_lengths(metric: Metric) -> None:
    with pytest.raises(ValueError) as excinfo:
        metric(["a", "b", "c"], ["a", "b"])
    message = str(excinfo.value)
    assert "3" in message
    assert "2" in message


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_empty_inputs_raise(metric: Metric) -> None:
    with pytest.raises(ValueError, match="no examples"):
        metric([], [])


@pytest.mark.parametrize("name", list(MetricName))
def test_compute_metric_validates_inputs(name: MetricName) -> None:
    with pytest.raises(ValueError, match="no examples"):
        compute_metric(name, [], [])
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        compute_metric(name, ["a"], ["a", "b"])


# --------------------------------------------------------------------------- E_abs / E_rel


def test_e_abs_is_mean() -> None:
    assert e_abs({"t1": 0.5, "t2": 0.7, "t3": 0.9}) == pytest.approx(0.7)


def test_e_abs_empty_raises() -> None:
    with pytest.raises(ValueError):
        e_abs({})


def test_relative_scores_and_e_rel_values() -> None:
    scores = {"t1": 0.4, "t2": 0.9}
    reference = {"t1": 0.8, "t2": 0.6}
    ratios = relative_scores(scores, reference)
    assert ratios == pytest.approx({"t1": 0.5, "t2": 1.5})
    assert e_rel(scores, reference) == pytest.approx(1.0)


def test_e_rel_is_mean_of_ratios_not_ratio_of_means() -> None:
    scores = {"t1": 0.1, "t2": 0.9}
    reference = {"t1": 0.2, "t2": 0.9}
    # mean of ratios = (0.5 + 1.0) / 2 = 0.75; ratio of means would be 1.0 / 1.1
    assert e_rel(scores, reference) == pytest.approx(0.75)
    assert not math.isclose(e_rel(scores, reference), e_abs(scores) / e_abs(reference))


def test_e_rel_mismatched_tasks_names_missing() -> None:
    with pytest.raises(ValueError, match="t3") as excinfo:
        e_rel({"t1": 0.5, "t3": 0.5}, {"t1": 0.5, "t2": 0.5})
    assert "t2" in str(excinfo.value)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan")])
def test_e_rel_non_positive_reference_names_task(bad: float) -> None:
    with pytest.raises(ValueError, match="zero_task"):
        e_rel({"ok": 0.5, "zero_task": 0.3}, {"ok": 0.5, "zero_task": bad})
    with pytest.raises(ValueError, match="zero_task"):
        relative_scores({"zero_task": 0.3}, {"zero_task": bad})


def test_e_rel_empty_raises() -> None:
    with pytest.raises(ValueError):
        e_rel({}, {})
