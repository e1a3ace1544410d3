"""Report sections that say whether MSF found anything: paired differences against the controls, unseen tasks
split by whether MSF saw their BIG-bench family, what MSF's joint LM steps add, and each stage's time.

A paired difference is the mean over tasks of (IST in the MSF subspace - a control) on the same task's test
set, with a 95% bootstrap interval over tasks: it removes the spread between tasks that an unpaired comparison
of two E_abs intervals keeps, so "the interval excludes 0" is the test of "MSF beats the control".
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from ipt_engine.experiments.intervals import Estimate, e_abs_estimate, e_rel_estimate, mean_with_interval
from ipt_engine.experiments.report_tables import (
    METHOD_TITLES,
    challenge_names,
    counted_tasks,
    method_scores,
    reference_of,
)

CONTROLS = ("random", "z0", "no_prompt")
ESTIMATE_FILE = "estimate.json"  # optional, in the run directory: {stage: estimated seconds, "_note": text}


def family(task: str) -> str:
    """A pool task's BIG-bench family: 'arithmetic:3_digit_addition' -> 'arithmetic'."""
    return task.split(":")[0]


def paired_difference(summary: dict[str, Any], d: str, challenge: str, control: str) -> Estimate | None:
    """Mean over the challenge's counted tasks (those in E_abs) of IST test score - `control` test score, with
    its interval; None when the run did not measure the control."""
    ist = method_scores(summary, d, challenge, "ist") or {}
    other = method_scores(summary, d, challenge, control)
    if other is None:
        return None
    abs_names, _, _ = counted_tasks(summary, challenge, ist)
    return mean_with_interval([ist[n] - other[n] for n in abs_names if n in other])


def verdict(e: Estimate) -> str:
    """'above', 'below' or 'not distinguishable' from 0, by the 95% interval."""
    if e.low is None or e.high is None:
        return "too few tasks"
    if e.low > 0:
        return "above 0"
    if e.high < 0:
        return "below 0"
    return "interval includes 0"


def controls_section(summary: dict[str, Any]) -> list[str]:
    """Per challenge and d_I: IST in the MSF subspace minus each control, paired per task."""
    ds = list(summary["per_d"])
    lines = ["## Does the MSF subspace beat its controls? (paired differences)", "",
             "Mean over tasks of (IST in the MSF subspace - control), test scores in points, with a 95% bootstrap "
             "interval over tasks and the verdict of that interval. Tasks as counted in E_abs.", ""]
    for challenge in ("unseen_tasks", "seen_unseen_data", "seen_same_data"):
        if not all(challenge in summary["per_d"][d] for d in ds):
            continue
        lines += [f"| {challenge.replace('_', ' ')}: IST minus | " + " | ".join(f"d_I={d}" for d in ds) + " |",
                  "|---|" + "---|" * len(ds)]
        for control in CONTROLS:
            cells = [paired_difference(summary, d, challenge, control) for d in ds]
            if all(c is None for c in cells):
                continue
            lines.append(f"| {METHOD_TITLES[control]} | "
                         + " | ".join("n/a" if c is None else f"{_signed(c)}: {verdict(c)}" for c in cells) + " |")
        lines.append("")
    return lines


def _signed(e: Estimate) -> str:
    if e.value is None:
        return f"n/a (k={e.tasks})"
    if e.low is None or e.high is None:
        return f"{100 * e.value:+.1f} (k={e.tasks})"
    return f"{100 * e.value:+.1f} [{100 * e.low:+.1f}, {100 * e.high:+.1f}] (k={e.tasks})"


def family_groups(summary: dict[str, Any]) -> dict[str, list[str]]:
    """The unseen tasks split by whether a train task of the same BIG-bench family was in MSF's training."""
    seen = {family(n) for n in summary["train_tasks"]}
    unseen = challenge_names(summary, "unseen_tasks")
    return {"family seen by MSF": [n for n in unseen if family(n) in seen],
            "family not seen by MSF": [n for n in unseen if family(n) not in seen]}


def family_section(summary: dict[str, Any]) -> list[str]:
    """E_rel^PT and E_abs of IST (MSF subspace and random control) on the unseen tasks, per family group."""
    ds = list(summary["per_d"])
    pt, _ = reference_of(summary, "unseen_tasks")
    lines = ["## Unseen tasks by whether MSF saw their family", "",
             "A held-out subtask may share its BIG-bench family (e.g. `arithmetic`) with a train subtask; the "
             "random split does not prevent it. Both groups, and both subspaces:", "",
             "| group | tasks | method | " + " | ".join(f"E_rel^PT d_I={d}" for d in ds) + " | "
             + " | ".join(f"E_abs d_I={d}" for d in ds) + " |", "|---|---|---|" + "---|" * (2 * len(ds))]
    for group, names in family_groups(summary).items():
        for method in ("ist", "random"):
            rel, absolute = [], []
            for d in ds:
                scores = method_scores(summary, d, "unseen_tasks", method)
                if scores is None:
                    rel.append("n/a")
                    absolute.append("n/a")
                    continue
                abs_names, rel_names, _ = counted_tasks(summary, "unseen_tasks", scores)
                rel.append(e_rel_estimate({n: scores[n] for n in rel_names if n in names},
                                          {n: pt[n]["test"] for n in rel_names if n in names}).percent())
                absolute.append(e_abs_estimate({n: scores[n] for n in abs_names if n in names}).percent())
            lines.append(f"| {group} | {len(names)} | {METHOD_TITLES[method]} | " + " | ".join(rel) + " | "
                         + " | ".join(absolute) + " |")
    return [*lines, ""]


def msf_section(summary: dict[str, Any]) -> list[str]:
    """MSF's mean dev score over the train tasks after the reconstruction warm-up alone and after the joint
    LM steps (what the LM loss adds), and the reconstruction error."""
    lines = ["## MSF: what the joint LM steps add", "",
             "Mean dev score over the train tasks of their reconstructed prompts Proj_b(Proj(P_i)): after the "
             "reconstruction warm-up alone (no PLM in the loss) and after MSF's joint steps (LM loss + alpha x "
             "reconstruction): at their last evaluation, and the best evaluation, whose weights MSF keeps (the "
             "warm-up's when the joint steps only lowered dev).", "",
             "| d_I | warm-up only | last joint evaluation | kept (best) | joint steps | reconstruction MSE |",
             "|---|---|---|---|---|---|"]
    for d, entry in summary["per_d"].items():
        msf = entry["msf"]
        warm, joint = msf.get("warmup_mean_dev_score"), msf.get("joint_mean_dev_score")
        mse = msf.get("reconstruction_mse")
        lines.append(f"| {d} | {'n/a' if warm is None else f'{100 * warm:.1f}'} | "
                     f"{'n/a' if joint is None else f'{100 * joint:.1f}'} | {100 * msf['mean_dev_score']:.1f} | "
                     f"{msf.get('steps', 'n/a')} | {'n/a' if mse is None else f'{mse:.4g}'} |")
    return [*lines, ""]


def timing_section(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """Seconds per stage as measured, beside the estimate made before the run (estimate.json), if any."""
    path = run_dir / ESTIMATE_FILE
    estimate = json.loads(path.read_text()) if path.is_file() else {}
    timings = summary["timings"]
    lines = ["## Stage timings", ""]
    if estimate.get("_note"):
        lines += [estimate["_note"], ""]
    lines += ["| stage | estimated (h) | measured (h) | seconds |", "|---|---|---|---|"]
    for stage in sorted(set(timings) | {k for k in estimate if not k.startswith("_")}):
        est = estimate.get(stage)
        got = timings.get(stage)
        lines.append(f"| {stage} | {'n/a' if est is None else f'{est / 3600:.2f}'} | "
                     f"{'n/a' if got is None else f'{got / 3600:.2f}'} | {got if got is not None else 'n/a'} |")
    total = sum(timings.values())
    estimated = sum(v for k, v in estimate.items() if not k.startswith("_"))
    lines += [f"| total | {f'{estimated / 3600:.2f}' if estimate else 'n/a'} | {total / 3600:.2f} | {total:.0f} |", ""]
    return lines


def seconds_per_task(summary: dict[str, Any], challenge: str = "unseen_tasks") -> dict[str, float]:
    """{d_I: mean IST seconds per task in the MSF subspace} where the run recorded them."""
    out = {}
    for d, entry in summary["per_d"].items():
        secs = [r["seconds"] for r in entry.get(challenge, {}).values() if "seconds" in r]
        if secs:
            out[d] = mean(secs)
    return out
