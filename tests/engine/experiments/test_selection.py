"""Choices a study makes read dev data only: the same dev scores with other test scores give the same choice."""

from __future__ import annotations

import copy
from typing import Any

from ipt_engine.experiments.selection import choose_d, chosen_d, learnable


def _study(dev: dict[str, dict[str, float]], test: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A minimal summary: two unseen tasks, IST dev/test per d_I, PT dev/test per task."""
    names = ["a", "b"]
    return {
        "test_tasks": names,
        "pt": {"main": {"a": {"dev": 0.8, "test": 0.7}, "b": {"dev": 0.5, "test": 0.6}}},
        "learnable": {"a": True, "b": True},
        "per_d": {d: {"unseen_tasks": {n: {"dev": dev[d][n], "test": test[d][n]} for n in names}} for d in dev},
    }


DEV = {"5": {"a": 0.4, "b": 0.45}, "50": {"a": 0.7, "b": 0.5}, "250": {"a": 0.6, "b": 0.5}}
TEST = {"5": {"a": 0.9, "b": 0.9}, "50": {"a": 0.1, "b": 0.1}, "250": {"a": 0.2, "b": 0.2}}


def test_d_is_chosen_by_dev_e_rel() -> None:
    s = _study(DEV, TEST)
    choice = choose_d(s["per_d"], s["pt"]["main"], s["learnable"], s["test_tasks"])
    # dev E_rel: d=5: (0.4/0.8 + 0.45/0.5)/2 = 0.70; d=50: (0.875 + 1.0)/2 = 0.9375; d=250: (0.75 + 1.0)/2 = 0.875
    assert choice["d"] == 50 and choice["criterion"] == "dev_e_rel" and choice["tasks"] == 2
    assert abs(choice["by_d"]["5"] - 0.70) < 1e-9 and abs(choice["by_d"]["50"] - 0.9375) < 1e-9
    assert chosen_d(s) == 50  # the test scores favour d=5 by far: they are not read


def test_same_dev_different_test_gives_the_same_choice() -> None:
    s = _study(DEV, TEST)
    flipped = copy.deepcopy(s)
    for d, entry in flipped["per_d"].items():
        for n, r in entry["unseen_tasks"].items():
            r["test"] = 1.0 - TEST[d][n]
    flipped["pt"]["main"]["a"]["test"] = 0.01
    assert chosen_d(flipped) == chosen_d(s) == 50
    # while another dev does change it
    other = _study({**DEV, "250": {"a": 0.8, "b": 0.5}}, TEST)
    assert chosen_d(other) == 250


def test_ties_go_to_the_smaller_d_and_unlearnable_tasks_do_not_count() -> None:
    s = _study({"10": {"a": 0.4, "b": 0.5}, "50": {"a": 0.4, "b": 0.5}}, TEST | {"10": TEST["5"]})
    assert chosen_d(s) == 10
    s = _study({"10": {"a": 0.8, "b": 0.0}, "50": {"a": 0.1, "b": 0.5}}, {"10": TEST["5"], "50": TEST["50"]})
    assert chosen_d(s) == 50  # both tasks: (1.0 + 0)/2 = 0.5 against (0.125 + 1)/2 = 0.5625
    s["learnable"]["b"] = False  # only task a counts: 1.0 against 0.125
    assert chosen_d(s) == 10
    s["learnable"]["b"] = True
    s["learnable"]["a"] = False  # only task b counts: 0.0 against 1.0
    assert chosen_d(s) == 50


def test_without_learnable_tasks_the_mean_ist_dev_score_decides() -> None:
    s = _study({"10": {"a": 0.3, "b": 0.3}, "50": {"a": 0.2, "b": 0.6}}, {"10": TEST["5"], "50": TEST["50"]})
    s["learnable"] = {"a": False, "b": False}
    choice = choose_d(s["per_d"], s["pt"]["main"], s["learnable"], s["test_tasks"])
    assert choice["criterion"] == "dev_e_abs" and choice["d"] == 50


def test_learnable_compares_pt_dev_with_the_trivial_guess_of_the_same_draw() -> None:
    pt = {"a": {"dev": 0.6, "test": 0.0}, "b": {"dev": 0.5, "test": 1.0}}
    baselines = {"a@0": 0.5, "b@0": 0.5, "a@1": 0.7, "b@1": 0.4}
    assert learnable(pt, baselines, ["a", "b"], 0) == {"a": True, "b": False}  # ties are not learnable
    assert learnable(pt, baselines, ["a", "b"], 1) == {"a": False, "b": True}
