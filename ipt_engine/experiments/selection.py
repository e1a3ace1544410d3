"""Every choice a study makes, made on dev data only: which tasks count (learnability) and which d_I is carried
forward (stability runs, ablations, the PCA plot, the exported artifact).

Test scores are read by the report, never here: a test proves that changing only test scores changes no choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import mean
from typing import Any

D_CHOICE_RULE = ("d_I is chosen on dev: the highest mean over the learnable unseen tasks of IST dev score / PT "
                 "dev score (E_rel on dev), ties to the smaller d_I; without such tasks, the highest mean IST dev "
                 "score; test scores are not read")
LEARNABLE_RULE = "a task counts when its PT dev score is above a task-aware trivial guess on the same dev set"


def learnable(pt: Mapping[str, Mapping[str, Any]], baselines: Mapping[str, float], names: Sequence[str],
              seed: int) -> dict[str, bool]:
    """{task: PT dev score > trivial dev score} for the tasks' few-shot draw `seed` (dev data only)."""
    return {n: pt[n]["dev"] > baselines[f"{n}@{seed}"] for n in names}


def dev_e_rel_by_d(per_d: Mapping[str, Mapping[str, Any]], pt: Mapping[str, Mapping[str, Any]],
                   is_learnable: Mapping[str, bool], names: Sequence[str]) -> dict[str, float | None]:
    """{d: mean over learnable `names` with PT dev > 0 of IST dev / PT dev} (None where no task qualifies)."""
    out: dict[str, float | None] = {}
    for d, entry in per_d.items():
        ist = entry["unseen_tasks"]
        ratios = [ist[n]["dev"] / pt[n]["dev"] for n in names
                  if is_learnable.get(n) and pt[n]["dev"] > 0 and n in ist]
        out[d] = mean(ratios) if ratios else None
    return out


def choose_d(per_d: Mapping[str, Mapping[str, Any]], pt: Mapping[str, Mapping[str, Any]],
             is_learnable: Mapping[str, bool], names: Sequence[str]) -> dict[str, Any]:
    """The d_I a study carries forward, chosen by `D_CHOICE_RULE` on the unseen tasks `names`.

    Returns {"d": int, "rule": str, "criterion": "dev_e_rel" | "dev_e_abs", "by_d": {d: value}, "tasks": int}."""
    by_rel = dev_e_rel_by_d(per_d, pt, is_learnable, names)
    counted = [n for n in names if is_learnable.get(n) and pt[n]["dev"] > 0]
    if any(v is not None for v in by_rel.values()):
        criterion, by_d = "dev_e_rel", by_rel
    else:
        criterion = "dev_e_abs"
        by_d = {d: (mean(e["unseen_tasks"][n]["dev"] for n in names if n in e["unseen_tasks"])
                    if any(n in e["unseen_tasks"] for n in names) else None) for d, e in per_d.items()}
        counted = list(names)
    best = max(per_d, key=lambda d: (by_d[d] if by_d[d] is not None else float("-inf"), -int(d)))
    return {"d": int(best), "rule": D_CHOICE_RULE, "criterion": criterion, "by_d": by_d, "tasks": len(counted)}


def chosen_d(summary: Mapping[str, Any]) -> int:
    """The d_I a finished run carries forward, recomputed from its summary's dev scores by `choose_d`.

    Runs written before the dev rule stored a `best_d` chosen on test scores; this ignores it."""
    return int(choose_d(summary["per_d"], summary["pt"]["main"], summary["learnable"], summary["test_tasks"])["d"])
