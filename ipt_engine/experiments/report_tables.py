"""The study's figures as table rows: which tasks each challenge counts, each method's per-task test scores, and
E_rel^PT / E_abs with their intervals (read from a run's summary.json; shared by the report and the export)."""

from __future__ import annotations

from typing import Any

from ipt_engine.experiments.intervals import e_abs_estimate, e_rel_estimate


def pct(x: float | None) -> str:
    """A fraction in percent with one decimal, 'n/a' for None."""
    return "n/a" if x is None else f"{100 * x:.1f}"


CHALLENGE_TITLES = {
    "seen_same_data": "seen tasks, same data",
    "seen_unseen_data": "seen tasks, unseen data",
    "unseen_tasks": "unseen tasks",
    "recon": "MSF reconstruction (train tasks)",
}
METHOD_TITLES = {
    "ist": "IST, MSF subspace",
    "random": "IST, random Proj_b (control)",
    "z0": "z = 0 of the MSF subspace (control)",
    "no_prompt": "no prompt, bare PLM (control)",
}


def challenge_names(summary: dict[str, Any], challenge: str) -> list[str]:
    """The tasks a challenge is about (before any filter)."""
    if challenge == "recon":
        return list(summary["train_tasks"])
    if challenge in ("seen_same_data", "seen_unseen_data"):
        return list(summary.get("seen_ist_tasks") or summary["train_tasks"])
    return list(summary["test_tasks"])


def reference_of(summary: dict[str, Any], challenge: str) -> tuple[dict[str, Any], dict[str, bool]]:
    """(PT results, learnable flags) of the few-shot draw the challenge trains on."""
    if challenge == "seen_unseen_data":
        return summary["pt"]["unseen-data"], summary["learnable_unseen_data"]
    return summary["pt"]["main"], summary["learnable"]


def method_scores(summary: dict[str, Any], d: str, challenge: str, method: str) -> dict[str, float] | None:
    """{task: test score} of `method` in `challenge` at d_I = d, or None when the run did not measure it."""
    entry = summary["per_d"][d]
    if challenge == "recon":
        return dict(entry["recon"]) if method == "ist" and entry.get("recon") else None
    names = set(challenge_names(summary, challenge))
    if method == "ist":
        runs = entry.get(challenge)  # absent from a partial run (`ipt experiment run --until unseen`)
        return {n: r["test"] for n, r in runs.items() if n in names} if runs is not None else None
    if method == "random":
        runs = entry.get("random", {}).get(challenge)
        return {n: r["test"] for n, r in runs.items() if n in names} if runs else None
    if method == "z0":
        return {n: v for n, v in entry["z0"].items() if n in names} if entry.get("z0") else None
    if method == "no_prompt":
        return {n: v for n, v in summary["no_prompt"].items() if n in names} if summary.get("no_prompt") else None
    raise ValueError(f"unknown method {method!r}")


def counted_tasks(summary: dict[str, Any], challenge: str, scores: dict[str, float]
                  ) -> tuple[list[str], list[str], dict[str, str]]:
    """(tasks counted in E_abs, tasks counted in E_rel, {task left out: why}) for one challenge's scores."""
    pt, ok = reference_of(summary, challenge)
    dropped: dict[str, str] = {}
    for n in challenge_names(summary, challenge):
        if n not in scores:
            dropped[n] = "no result"
        elif not ok.get(n):
            dropped[n] = f"not learnable (PT dev {pct(pt[n]['dev'])} <= trivial guess)"
    if challenge == "seen_unseen_data":
        dropped.update(summary.get("no_second_draw", {}))
    abs_names = [n for n in challenge_names(summary, challenge) if n not in dropped]
    rel_names = [n for n in abs_names if pt[n]["test"] > 0]
    for n in abs_names:
        if n not in rel_names:
            dropped[n] = "PT test score 0 (E_rel undefined; still in E_abs)"
    return abs_names, rel_names, dropped


def challenge_scores(summary: dict[str, Any], d: str, challenge: str) -> tuple[dict[str, float], dict[str, float]]:
    """(IST test scores, PT test scores) over the tasks E_rel counts in this challenge."""
    scores = method_scores(summary, d, challenge, "ist") or {}
    _, rel_names, _ = counted_tasks(summary, challenge, scores)
    pt, _ = reference_of(summary, challenge)
    return {n: scores[n] for n in rel_names}, {n: pt[n]["test"] for n in rel_names}


def headline_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (challenge, d_I, method) the run measured: E_rel and E_abs as Estimates, PT's E_abs over the
    same tasks, and the tasks left out with their reasons."""
    rows = []
    for challenge in CHALLENGE_TITLES:
        pt, _ = reference_of(summary, challenge)
        for d in summary["per_d"]:
            if method_scores(summary, d, challenge, "ist") is None:
                continue  # the challenge did not run (a partial run): no controls either
            for method in METHOD_TITLES:
                scores = method_scores(summary, d, challenge, method)
                if scores is None:
                    continue
                abs_names, rel_names, dropped = counted_tasks(summary, challenge, scores)
                rows.append({
                    "challenge": challenge, "d": int(d), "method": method,
                    "e_rel": e_rel_estimate({n: scores[n] for n in rel_names}, {n: pt[n]["test"] for n in rel_names}),
                    "e_abs": e_abs_estimate({n: scores[n] for n in abs_names}),
                    "pt_e_abs": e_abs_estimate({n: pt[n]["test"] for n in abs_names}),
                    "dropped": dropped})
    return rows


def find_row(rows: list[dict[str, Any]], challenge: str, d: int, method: str = "ist") -> dict[str, Any] | None:
    return next((r for r in rows if (r["challenge"], r["d"], r["method"]) == (challenge, d, method)), None)
