"""Evaluation metrics for Intrinsic Prompt Tuning (IPT) experiments.

Per-example metrics compare a list of model predictions against a list of
references and return a single score in ``[0, 1]``:

* :func:`accuracy` / :func:`exact_match` -- normalised string equality
  (classification and generation tasks respectively; same semantics).
* :func:`macro_f1` -- scikit-learn macro-averaged F1 over normalised labels.
* :func:`rouge_l` -- mean ROUGE-L F-measure (``rouge_score``).
* :func:`bleu` -- sacrebleu corpus BLEU, rescaled from ``[0, 100]`` to ``[0, 1]``.

A reference is either one string or a sequence of acceptable strings
(:data:`Reference`); metrics that support several references score a
prediction against the best-matching one.

Aggregate metrics summarise per-task scores across tasks:

* :func:`e_abs` -- the mean absolute score over tasks (E_abs).
* :func:`e_rel` -- the mean over tasks of a score relative to a reference
  method's score, e.g. IPT relative to full prompt tuning (E_rel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import TypeAlias

# rouge_score (with nltk), sacrebleu and scikit-learn are imported where they are used: together ~70 MB of
# resident memory that a process only serving classification never needs (the API imports this module)

__all__ = [
    "MetricName",
    "Reference",
    "accuracy",
    "bleu",
    "compute_metric",
    "e_abs",
    "e_rel",
    "exact_match",
    "macro_f1",
    "normalize_text",
    "relative_scores",
    "rouge_l",
]


class MetricName(StrEnum):
    """Names of the per-example metrics understood by :func:`compute_metric`."""

    ACCURACY = "accuracy"
    MACRO_F1 = "macro_f1"
    EXACT_MATCH = "exact_match"
    ROUGE_L = "rouge_l"
    BLEU = "bleu"


Reference: TypeAlias = str | Sequence[str]
"""One reference string, or several acceptable reference strings for one example."""


def normalize_text(text: str) -> str:
    """Normalise ``text`` for string comparison.

    Strips leading/trailing whitespace, lower-cases, and collapses every run of
    internal whitespace to a single space. Punctuation is kept.
    """
    return " ".join(text.split()).lower()


def _check_inputs(name: str, predictions: Sequence[str], references: Sequence[Reference]) -> None:
    """Raise ``ValueError`` unless both sequences are non-empty and of equal length."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{name}: got {len(predictions)} predictions but {len(references)} references; "
            "they must have the same length"
        )
    if len(predictions) == 0:
        raise ValueError(f"{name}: no examples to score (predictions and references are empty)")


def _reference_list(reference: Reference) -> list[str]:
    """Return ``reference`` as a non-empty list of reference strings."""
    if isinstance(reference, str):
        return [reference]
    refs = list(reference)
    if not refs:
        raise ValueError("an example has an empty list of references; give at least one reference")
    for ref in refs:
        if not isinstance(ref, str):
            raise TypeError(f"references must be strings, got {type(ref).__name__}")
    return refs


def _normalized_match_rate(name: str, predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Fraction of predictions equal (after normalisation) to any of their references."""
    _check_inputs(name, predictions, references)
    hits = 0
    for prediction, reference in zip(predictions, references, strict=True):
        pred = normalize_text(prediction)
        if any(pred == normalize_text(ref) for ref in _reference_list(reference)):
            hits += 1
    return hits / len(predictions)


def accuracy(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Return the fraction of predictions matching their reference(s).

    Strings are compared after :func:`normalize_text`; with several references
    for an example, matching any one of them counts as correct.

    Raises:
        ValueError: if the lengths differ or there are no examples.
    """
    return _normalized_match_rate("accuracy", predictions, references)


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Return the exact-match rate of generated predictions against their reference(s).

    Same semantics as :func:`accuracy` (normalised equality with any reference);
    kept as a separate name for generation tasks.

    Raises:
        ValueError: if the lengths differ or there are no examples.
    """
    return _normalized_match_rate("exact_match", predictions, references)


def macro_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
) -> float:
    """Return the macro-averaged F1 score over normalised labels.

    Uses ``sklearn.metrics.f1_score(average="macro", zero_division=0)`` on the
    :func:`normalize_text`-ed predictions and references. If ``labels`` is
    given, the average is taken over exactly those (normalised) labels, so a
    label that never occurs contributes an F1 of 0; otherwise over the labels
    that occur in either predictions or references.

    Raises:
        ValueError: if the lengths differ, there are no examples, ``labels`` is
            empty, or a reference is not a single string.
    """
    _check_inputs("macro_f1", predictions, references)
    for reference in references:
        if not isinstance(reference, str):
            raise ValueError("macro_f1 needs exactly one reference label (a string) per example")
    y_pred = [normalize_text(p) for p in predictions]
    y_true = [normalize_text(r) for r in references]
    label_list: list[str] | None = None
    if labels is not None:
        label_list = list(dict.fromkeys(normalize_text(label) for label in labels))
        if not label_list:
            raise ValueError("macro_f1: labels must not be empty when given")
    from sklearn.metrics import f1_score

    score = f1_score(y_true, y_pred, labels=label_list, average="macro", zero_division=0)
    return float(score)


def rouge_l(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Return the mean ROUGE-L F-measure of the predictions, in ``[0, 1]``.

    Scores are computed with ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])``
    (its default tokenizer lower-cases and splits on non-alphanumerics). With
    several references for an example, the best F-measure is used.

    Raises:
        ValueError: if the lengths differ or there are no examples.
    """
    _check_inputs("rouge_l", predictions, references)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    total = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        total += max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _reference_list(reference))
    return total / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Return sacrebleu corpus BLEU divided by 100, so the result lies in ``[0, 1]``.

    Uses ``sacrebleu.metrics.BLEU(effective_order=True)`` with its default
    13a tokenisation (case-sensitive), so short outputs without 4-grams are
    still scored. sacrebleu wants reference *streams* of equal length, so
    examples with fewer references than the maximum repeat their last
    reference to fill the missing streams.

    Raises:
        ValueError: if the lengths differ or there are no examples.
    """
    _check_inputs("bleu", predictions, references)
    ref_lists = [_reference_list(reference) for reference in references]
    n_streams = max(len(refs) for refs in ref_lists)
    streams = [[refs[min(i, len(refs) - 1)] for refs in ref_lists] for i in range(n_streams)]
    from sacrebleu.metrics import BLEU

    score = BLEU(effective_order=True).corpus_score(list(predictions), streams).score
    return min(1.0, max(0.0, score / 100.0))


def _macro_f1_dispatch(
    predictions: Sequence[str], references: Sequence[Reference], labels: Sequence[str] | None
) -> float:
    """Call :func:`macro_f1`, checking that each reference is a single string."""
    single: list[str] = []
    for reference in references:
        if not isinstance(reference, str):
            raise ValueError("macro_f1 needs exactly one reference label (a string) per example")
        single.append(reference)
    return macro_f1(predictions, single, labels=labels)


_METRICS: dict[MetricName, Callable[[Sequence[str], Sequence[Reference]], float]] = {
    MetricName.ACCURACY: accuracy,
    MetricName.EXACT_MATCH: exact_match,
    MetricName.ROUGE_L: rouge_l,
    MetricName.BLEU: bleu,
}


def compute_metric(
    name: MetricName | str,
    predictions: Sequence[str],
    references: Sequence[Reference],
    labels: Sequence[str] | None = None,
) -> float:
    """Compute the metric called ``name`` on ``predictions`` against ``references``.

    ``labels`` is passed to :func:`macro_f1` and ignored by the other metrics.

    Raises:
        ValueError: if ``name`` is not a known metric (the message lists the
            valid names), or if the chosen metric rejects its inputs.
    """
    try:
        metric = MetricName(name)
    except ValueError:
        valid = ", ".join(m.value for m in MetricName)
        raise ValueError(f"unknown metric {name!r}; valid metrics are: {valid}") from None
    if metric is MetricName.MACRO_F1:
        return _macro_f1_dispatch(predictions, references, labels)
    return _METRICS[metric](predictions, references)


def e_abs(scores: Mapping[str, float]) -> float:
    """Return E_abs, the mean of the per-task scores in ``scores``.

    Raises:
        ValueError: if ``scores`` is empty.
    """
    if not scores:
        raise ValueError("e_abs: no task scores to average")
    return math.fsum(scores.values()) / len(scores)


def relative_scores(scores: Mapping[str, float], reference_scores: Mapping[str, float]) -> dict[str, float]:
    """Return the per-task ratios ``scores[t] / reference_scores[t]``.

    These are the terms averaged by :func:`e_rel` (e.g. IPT score relative to
    prompt-tuning score on each task).

    Raises:
        ValueError: if the two mappings do not have the same tasks (the message
            names the missing ones), or if a reference score is not a finite
            positive number (the message names the task); filter such tasks
            out before calling.
    """
    missing_ref = sorted(set(scores) - set(reference_scores))
    missing_scores = sorted(set(reference_scores) - set(scores))
    if missing_ref or missing_scores:
        parts = []
        if missing_ref:
            parts.append(f"missing from reference_scores: {missing_ref}")
        if missing_scores:
            parts.append(f"missing from scores: {missing_scores}")
        raise ValueError("scores and reference_scores must cover the same tasks; " + "; ".join(parts))
    ratios: dict[str, float] = {}
    for task, score in scores.items():
        ref = reference_scores[task]
        if not math.isfinite(ref) or ref <= 0:
            raise ValueError(
                f"reference score for task {task!r} is {ref}; a relative score needs a finite "
                "reference score > 0 (filter such tasks out first)"
            )
        ratios[task] = score / ref
    return ratios


def e_rel(scores: Mapping[str, float], reference_scores: Mapping[str, float]) -> float:
    """Return E_rel, the mean over tasks of ``scores[t] / reference_scores[t]``.

    Used e.g. for IPT performance relative to prompt tuning (PT).

    Raises:
        ValueError: if there are no tasks, the task sets differ, or a reference
            score is not a finite positive number (see :func:`relative_scores`).
    """
    ratios = relative_scores(scores, reference_scores)
    if not ratios:
        raise ValueError("e_rel: no task scores to average")
    return math.fsum(ratios.values()) / len(ratios)
