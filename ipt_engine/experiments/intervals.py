"""Aggregates over tasks with their uncertainty: a point estimate, a 95% bootstrap interval and the task count.

A study's headline figures (E_rel, E_abs) average a handful to a hundred per-task scores; how much they would
move with another draw of tasks is the first thing a reader needs. The interval is a percentile bootstrap over
tasks (tasks resampled with replacement, the statistic recomputed), seeded so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ipt_engine.metrics import relative_scores

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over `tasks` tasks with its bootstrap interval [low, high] (None when there is one task or none)."""

    value: float | None
    low: float | None
    high: float | None
    tasks: int

    def percent(self) -> str:
        """'83.1 [70.2, 95.0] (k=4)' in percent; 'n/a (k=0)' without tasks."""
        if self.value is None:
            return f"n/a (k={self.tasks})"
        if self.low is None or self.high is None:
            return f"{100 * self.value:.1f} (k={self.tasks})"
        return f"{100 * self.value:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}] (k={self.tasks})"

    def to_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "low": self.low, "high": self.high, "tasks": self.tasks}


def mean_with_interval(values: list[float], *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = LEVEL,
                       seed: int = BOOTSTRAP_SEED) -> Estimate:
    """The mean of per-task `values` with a percentile bootstrap interval over tasks."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return Estimate(None, None, None, 0)
    value = float(x.mean())
    if x.size == 1:
        return Estimate(value, None, None, 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(value, float(low), float(high), int(x.size))


def e_abs_estimate(scores: Mapping[str, float]) -> Estimate:
    """E_abs (the mean score over tasks) with its interval."""
    return mean_with_interval(list(scores.values()))


def e_rel_estimate(scores: Mapping[str, float], reference: Mapping[str, float]) -> Estimate:
    """E_rel (the mean over tasks of score / reference score) with its interval; every reference must be > 0."""
    if not scores:
        return Estimate(None, None, None, 0)
    return mean_with_interval(list(relative_scores(scores, reference).values()))
