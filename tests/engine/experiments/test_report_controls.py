"""The report's control sections on a hand-made summary: paired differences recompute by hand, the family
split follows the train tasks' families, and the timing table reads the estimate file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipt_engine.experiments.report_controls import (
    controls_section,
    family_groups,
    paired_difference,
    timing_section,
    verdict,
)


def _summary(ist: dict[str, float], random: dict[str, float]) -> dict:
    names = sorted(ist)
    pt = {n: {"dev": 0.9, "test": 0.8} for n in names}
    pt["fam_a:train"] = {"dev": 0.9, "test": 0.8}
    return {
        "train_tasks": ["fam_a:train"], "test_tasks": names, "seen_ist_tasks": [],
        "pt": {"main": pt, "unseen-data": {}}, "learnable": {n: True for n in pt}, "learnable_unseen_data": {},
        "no_prompt": {n: 0.1 for n in pt},
        "per_d": {"10": {"unseen_tasks": {n: {"test": v} for n, v in ist.items()},
                         "random": {"unseen_tasks": {n: {"test": v} for n, v in random.items()}},
                         "z0": {n: 0.2 for n in pt}, "msf": {"mean_dev_score": 0.5}}},
        "timings": {"pt": 7200.0, "ist": 1800.0},
    }


def test_paired_difference_is_the_mean_per_task_gap() -> None:
    ist = {"fam_a:x": 0.6, "fam_b:y": 0.5, "fam_c:z": 0.9}
    random = {"fam_a:x": 0.5, "fam_b:y": 0.5, "fam_c:z": 0.6}
    s = _summary(ist, random)
    gap = paired_difference(s, "10", "unseen_tasks", "random")
    assert gap is not None and gap.tasks == 3
    assert gap.value == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert gap.low is not None and gap.high is not None and gap.low <= gap.value <= gap.high
    assert paired_difference(s, "10", "unseen_tasks", "no_prompt").value == pytest.approx(2 / 3 - 0.1)
    # an unlearnable task leaves the paired difference as it leaves E_abs
    s["learnable"]["fam_c:z"] = False
    assert paired_difference(s, "10", "unseen_tasks", "random").value == pytest.approx(0.05)


def test_verdicts_follow_the_interval() -> None:
    s = _summary({f"f{i}:t": 0.8 for i in range(8)}, {f"f{i}:t": 0.2 + 0.01 * i for i in range(8)})
    assert verdict(paired_difference(s, "10", "unseen_tasks", "random")) == "above 0"
    s = _summary({f"f{i}:t": 0.2 for i in range(8)}, {f"f{i}:t": 0.8 for i in range(8)})
    assert verdict(paired_difference(s, "10", "unseen_tasks", "random")) == "below 0"
    s = _summary({f"f{i}:t": 0.5 + (0.2 if i % 2 else -0.2) for i in range(8)}, {f"f{i}:t": 0.5 for i in range(8)})
    assert verdict(paired_difference(s, "10", "unseen_tasks", "random")) == "interval includes 0"
    text = "\n".join(controls_section(s))
    assert "IST, random Proj_b (control)" in text and "interval includes 0" in text


def test_family_groups_split_on_the_train_families() -> None:
    s = _summary({"fam_a:x": 0.6, "fam_b:y": 0.5}, {"fam_a:x": 0.5, "fam_b:y": 0.5})
    assert family_groups(s) == {"family seen by MSF": ["fam_a:x"], "family not seen by MSF": ["fam_b:y"]}


def test_timing_table_reads_the_estimate(tmp_path: Path) -> None:
    s = _summary({"fam_a:x": 0.6}, {"fam_a:x": 0.5})
    (tmp_path / "estimate.json").write_text(json.dumps({"pt": 3600.0, "msf": 1800.0, "_note": "from a sample"}))
    text = "\n".join(timing_section(tmp_path, s))
    assert "from a sample" in text
    assert "| pt | 1.00 | 2.00 | 7200.0 |" in text and "| msf | 0.50 | n/a | n/a |" in text
    assert "| total | 1.50 | 2.50 | 9000 |" in text
