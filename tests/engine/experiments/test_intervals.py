"""Aggregates with their bootstrap intervals and task counts."""

from __future__ import annotations

import pytest

from ipt_engine.experiments.intervals import Estimate, e_abs_estimate, e_rel_estimate, mean_with_interval


def test_interval_brackets_the_mean_and_narrows_with_more_tasks() -> None:
    few = mean_with_interval([0.2, 0.9, 0.5, 0.6])
    many = mean_with_interval([0.2, 0.9, 0.5, 0.6] * 25)
    assert few.value == pytest.approx(0.55) and many.value == pytest.approx(0.55)
    assert few.low < 0.55 < few.high and many.low < 0.55 < many.high
    assert (many.high - many.low) < 0.5 * (few.high - few.low)
    assert few.tasks == 4 and many.tasks == 100
    # the percentile bootstrap of the mean of {0, 1} x 50 has a ~95% range of about +-0.1 around 0.5
    half = mean_with_interval([0.0, 1.0] * 50)
    assert 0.38 < half.low < 0.42 and 0.58 < half.high < 0.62


def test_degenerate_cases_say_so() -> None:
    assert mean_with_interval([]) == Estimate(None, None, None, 0)
    assert mean_with_interval([0.4]) == Estimate(0.4, None, None, 1)
    same = mean_with_interval([0.3, 0.3, 0.3])
    assert same.low == pytest.approx(0.3) and same.high == pytest.approx(0.3)
    assert mean_with_interval([float("nan"), 0.5, 0.7]).tasks == 2
    assert mean_with_interval([0.1, 0.9]) == mean_with_interval([0.1, 0.9])  # seeded: reports repeat
    assert Estimate(None, None, None, 0).percent() == "n/a (k=0)"
    assert Estimate(0.5, None, None, 1).percent() == "50.0 (k=1)"
    assert Estimate(0.831, 0.702, 0.95, 4).percent() == "83.1 [70.2, 95.0] (k=4)"


def test_e_rel_and_e_abs() -> None:
    rel = e_rel_estimate({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9})
    assert rel.value == pytest.approx(0.75) and rel.tasks == 2
    assert e_abs_estimate({"a": 0.4, "b": 0.9}).value == pytest.approx(0.65)
    assert e_rel_estimate({}, {}).tasks == 0
    with pytest.raises(ValueError):
        e_rel_estimate({"a": 0.4}, {"a": 0.0})  # E_rel is undefined against a PT score of 0
