"""`ipt experiment report`: a Markdown report built only from a run directory's summary.json.

E_rel^PT = mean over tasks of score(method) / score(PT); E_abs = mean score. Each carries its task count and a
95% bootstrap interval over tasks (`ipt_engine.experiments.intervals`). Which tasks count is decided on dev
data (`ipt_engine.experiments.selection`): a task whose PT dev score is not above a trivial guess is left out
of both; E_rel also needs a PT test score above 0 (it divides by it). Every task left out is listed with its
reason. Beside IST in the MSF subspace stand its controls: IST in a random Proj_b of the same shapes, z = 0 of
the MSF subspace, and the bare PLM (no prompt).
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np
import yaml

from ipt_engine.experiments.intervals import Estimate, e_abs_estimate, e_rel_estimate, mean_with_interval
from ipt_engine.experiments.report_controls import controls_section, family_section, msf_section, timing_section
from ipt_engine.experiments.report_tables import (
    CHALLENGE_TITLES,
    METHOD_TITLES,
    counted_tasks,
    find_row,
    headline_rows,
    pct,
    reference_of,
)
from ipt_engine.experiments.selection import LEARNABLE_RULE, choose_d, chosen_d
from ipt_engine.named_tensors import load_chunks, load_named


def pca_plot(run_dir: Path, summary: dict[str, Any], out: Path) -> Path | None:
    """Intrinsic vectors at the d_I chosen on dev (train tasks: Proj(P_i); unseen tasks: IST z) on 2 PCA axes;
    None when the run directory has no vectors (a published copy of its summaries)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = chosen_d(summary)
    vectors = run_dir / "msf" / f"dI{d}" / "task_vectors.safetensors"
    if not vectors.is_file():  # a published copy of a run keeps its summaries, not its vectors
        return None
    train = load_named(vectors)
    unseen = load_chunks(run_dir / "ist" / f"dI{d}" / "unseen_tasks")
    names = [*train, *unseen]
    if len(names) < 3:
        return None
    x = np.stack([t.numpy() for t in [*train.values(), *unseen.values()]]).astype(np.float64)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    coords = x @ vt[:2].T if vt.shape[0] >= 2 else np.c_[x @ vt[:1].T, np.zeros(len(x))]
    explained = (s[:2] ** 2 / max(float((s ** 2).sum()), 1e-12)).tolist()
    colours = {"classification": "tab:blue", "multiple_choice": "tab:orange", "generation": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, name in enumerate(names):
        kind = summary["kinds"].get(name, "generation")
        seen = name in train
        ax.scatter(coords[i, 0], coords[i, 1], c=colours[kind], marker="o" if seen else "*",
                   s=40 if seen else 140, edgecolors="black" if not seen else "none")
    for kind, colour in colours.items():
        ax.scatter([], [], c=colour, label=kind)
    ax.scatter([], [], c="white", edgecolors="black", marker="*", s=140, label="unseen task (IST z)")
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% var.)")
    ax.set_ylabel(f"PC2 ({100 * (explained[1] if len(explained) > 1 else 0):.0f}% var.)")
    ax.set_title(f"Intrinsic task vectors, d_I = {d} ({summary['config']['name']})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


PAPER = {  # the paper's headline figures (BART-base, 120 CrossFit tasks, d_I = 250), as DESIGN.md quotes them
    "seen_unseen_data": 0.97, "unseen_tasks": 0.83, "pt_std": 4.19, "ipt_pt_std": 1.65, "ipt_pt_e_rel": 1.034}


def paper_comparison(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (figure, paper, this run) for the paper's headline numbers; the run's d_I = 250 if it has it,
    else its largest d_I. Each of the run's figures names its task count and 95% interval."""
    d = 250 if "250" in summary["per_d"] else max(int(k) for k in summary["per_d"])
    chosen = chosen_d(summary)
    rows = headline_rows(summary)
    out = []
    for challenge, title in (("seen_unseen_data", "E_rel^PT, seen tasks with unseen data"),
                             ("unseen_tasks", "E_rel^PT, unseen tasks")):
        for at in dict.fromkeys((d, chosen)):
            for method in ("ist", "random"):
                r = find_row(rows, challenge, at, method)
                if r is None:
                    continue
                label = title if method == "ist" else f"{title}, random Proj_b (control; not in the paper)"
                which = ", chosen on dev" if at == chosen else ""
                out.append({"figure": f"{label} (d_I = {at}{which})",
                            "paper": f"{100 * PAPER[challenge]:.0f}%" if method == "ist" else "-",
                            "run": r["e_rel"].percent()})
    st = stability_summary(summary)
    if st is not None:
        out.append({"figure": "mean std over seeds, PT (learnable unseen tasks)", "paper": f"{PAPER['pt_std']:.2f}",
                    "run": _points(st["pt_std"])})
        out.append({"figure": f"mean std over seeds, IPT-initialised PT (d_I = {st['d']})",
                    "paper": f"{PAPER['ipt_pt_std']:.2f}", "run": _points(st["ipt_pt_std"])})
        out.append({"figure": "E_rel^PT of IPT-initialised PT", "paper": f"{100 * PAPER['ipt_pt_e_rel']:.1f}%",
                    "run": st["ipt_pt_e_rel"].percent()})
    return out


def _points(e: Estimate) -> str:
    """An Estimate of a std already in points: '4.19 [2.0, 6.1] (k=12)'."""
    if e.value is None:
        return f"n/a (k={e.tasks})"
    if e.low is None or e.high is None:
        return f"{e.value:.2f} (k={e.tasks})"
    return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}] (k={e.tasks})"


def stability_summary(summary: dict[str, Any]) -> dict[str, Any] | None:
    """Mean std over seeds (ddof 1, in points) of PT and IPT-initialised PT, over the learnable unseen tasks and
    over all of them, with intervals; recomputed from the per-seed scores, so older runs read the same way."""
    st = summary.get("stability") or {}
    per_task = st.get("per_task") or {}
    if not per_task or len(st.get("seeds", [])) < 2:
        return None

    def std(xs: list[float]) -> float:
        return stdev(xs) * 100

    learn = [n for n in per_task if summary["learnable"].get(n)]
    ratios = {n: mean(r["ipt_pt"]) / mean(r["pt"]) for n, r in per_task.items() if n in learn and mean(r["pt"]) > 0}
    kept = [r.get("ipt_pt_kept_start") for r in per_task.values()]
    return {
        "d": st["d_intrinsic"], "seeds": st["seeds"],
        "pt_std": mean_with_interval([std(per_task[n]["pt"]) for n in learn]),
        "ipt_pt_std": mean_with_interval([std(per_task[n]["ipt_pt"]) for n in learn]),
        "pt_std_all": mean_with_interval([std(r["pt"]) for r in per_task.values()]),
        "ipt_pt_std_all": mean_with_interval([std(r["ipt_pt"]) for r in per_task.values()]),
        "ipt_pt_e_rel": mean_with_interval(list(ratios.values())),
        "pt_kept_start": None if None in kept else sum(r["pt_kept_start"] > 0 for r in per_task.values()),
        "ipt_pt_kept_start": None if None in kept else sum(k > 0 for k in kept),
    }


def e_rel_plot(summary: dict[str, Any], out: Path) -> Path | None:
    """E_rel^PT against d_I for each challenge (the paper's Figure 3), with 95% intervals as error bars; the
    random-subspace control dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in headline_rows(summary) if r["e_rel"].value is not None and r["method"] in ("ist", "random")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (challenge, title) in enumerate(CHALLENGE_TITLES.items()):
        for method, style in (("ist", "-"), ("random", "--")):
            pts = sorted(((r["d"], r["e_rel"]) for r in rows if r["challenge"] == challenge and r["method"] == method),
                         key=lambda p: p[0])
            if not pts:
                continue
            ys = [100 * e.value for _, e in pts]
            err = [[100 * (e.value - e.low) if e.low is not None else 0 for _, e in pts],
                   [100 * (e.high - e.value) if e.high is not None else 0 for _, e in pts]]
            label = f"{title} (k={pts[0][1].tasks})" + (", random Proj_b" if method == "random" else "")
            ax.errorbar([d for d, _ in pts], ys, yerr=err, marker="o", linestyle=style, color=f"C{i}", capsize=3,
                        label=label)
    ax.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ds = sorted({r["d"] for r in rows})
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set_xlabel("intrinsic dimension d_I")
    ax.set_ylabel("E_rel^PT (%), 95% bootstrap interval over tasks")
    ax.set_title(f"IST relative to PT ({summary['config']['name']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(run_dir: Path, out: Path | None = None, notes: Path | None = None) -> Path:
    """Write the Markdown report (and its plots next to it); returns the report path. `notes`, a Markdown
    file, is included as the discussion after the comparison with the paper."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} is missing: run `ipt experiment run` to completion first")
    summary = _with_kept_start(run_dir, json.loads(summary_path.read_text()))
    out = out or run_dir / "report.md"
    plot = pca_plot(run_dir, summary, out.parent / f"{out.stem}-pca.png")
    rel_plot = e_rel_plot(summary, out.parent / f"{out.stem}-e-rel.png")
    cfg = summary["config"]
    ds = [int(d) for d in summary["per_d"]]
    rows = headline_rows(summary)
    lines = [f"# IPT experiment report: {cfg['name']}", "",
             f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from `{run_dir}` by "
             f"`ipt experiment report`. Every number below is read from the run directory. Aggregates read "
             f"`value [95% bootstrap interval over tasks] (k = tasks counted)`.", ""]
    if summary.get("partial"):
        lines += [f"**Partial run** (`--until {summary['partial']}`): the seen-task challenges, the reconstruction "
                  "scores and the stability study have not run yet; their sections are absent.", ""]
    command = (run_dir / "command.txt").read_text().strip() if (run_dir / "command.txt").is_file() else "n/a"
    all_names = sorted(set(summary["train_tasks"]) | set(summary["test_tasks"]))
    filtered = [n for n in all_names if not summary["learnable"][n]]
    lines += ["## Setup", "",
              f"- Command: `{command}`",
              f"- Backbone: {cfg['backbone']} ({cfg['dtype']}); soft prompt n = {cfg['n_prompt']}, "
              f"d_I' = {cfg['d_hidden']}, alpha = {cfg['alpha']}, d_I in {ds}",
              f"- Split `{cfg['split']}`: {len(summary['train_tasks'])} train (seen) tasks, "
              f"{len(summary['test_tasks'])} held-out (unseen) tasks; K = {cfg['k_per_class']} per class / "
              f"{cfg['k_other']} otherwise; up to {cfg['max_test']} test examples per task",
              f"- Learnability filter (dev only): {LEARNABLE_RULE}. {len(filtered)} of {len(all_names)} tasks "
              f"fail it and are left out of E_rel and E_abs: {', '.join(filtered) or 'none'}", ""]
    lines += _d_choice_section(summary)
    lines += ["## Comparison with the paper's headline figures", "",
              "| figure | paper (BART-base, 120 tasks) | this run |", "|---|---|---|"]
    lines += [f"| {r['figure']} | {r['paper']} | {r['run']} |" for r in paper_comparison(summary)]
    lines += [""]
    if notes is not None:
        lines += [notes.read_text().strip(), ""]
    lines += ["## E_rel^PT and E_abs by intrinsic dimension, with controls (cf. the paper's Figure 3 and Table 2)",
              "", "E_rel^PT (%) = mean over tasks of test score / PT test score; E_abs (%) = mean test score. "
              "Controls: IST in a random Proj_b of the same shapes that MSF never trained (seeded), the MSF "
              f"subspace's z = 0, and the bare PLM without a prompt. {_start_sentence(summary)} A control not "
              "measured by this run is absent.", ""]
    for challenge, title in CHALLENGE_TITLES.items():
        pt_cells = [find_row(rows, challenge, d) for d in ds]
        if all(c is None for c in pt_cells):
            continue
        lines += [f"### {title}", "", "| figure | " + " | ".join(f"d_I={d}" for d in ds) + " |",
                  "|---|" + "---|" * len(ds)]
        for metric, metric_title in (("e_rel", "E_rel^PT"), ("e_abs", "E_abs")):
            for method, method_title in METHOD_TITLES.items():
                cells = [find_row(rows, challenge, d, method) for d in ds]
                if any(c is not None for c in cells):
                    lines.append(f"| {metric_title}: {method_title} | "
                                 + " | ".join(c[metric].percent() if c else "n/a" for c in cells) + " |")
        lines.append("| E_abs: PT (reference) | " + " | ".join(c["pt_e_abs"].percent() if c else "n/a"
                                                              for c in pt_cells) + " |")
        dropped = next((c["dropped"] for c in pt_cells if c), {})
        if dropped:
            lines += ["", "Left out: " + "; ".join(f"`{n}`: {why}" for n, why in sorted(dropped.items()))]
        lines += [""]
    if rel_plot is not None:
        lines += [f"![E_rel^PT by d_I]({rel_plot.name})", ""]
    lines += controls_section(summary)
    lines += family_section(summary)
    lines += msf_section(summary)
    lines += _stability_section(summary) if summary.get("stability") else []
    lines += _levers_section(run_dir, summary)
    if plot is not None:
        lines += ["## Intrinsic vectors (PCA)", "", f"![PCA of intrinsic vectors]({plot.name})", "",
                  f"Train tasks: Proj(P_i) from MSF; unseen tasks (stars): their IST z; d_I = {chosen_d(summary)} "
                  "(chosen on dev).", ""]
    lines += timing_section(run_dir, summary)
    lines += ["## Task lists", "",
              "Train (seen): " + ", ".join(f"`{n}` ({summary['kinds'][n]})" for n in summary["train_tasks"]), "",
              "Held out (unseen): " + ", ".join(f"`{n}` ({summary['kinds'][n]})" for n in summary["test_tasks"]),
              ""]
    lines += _appendix(summary, ds)
    lines += ["## Config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    out.write_text("\n".join(lines))
    return out


def _start_sentence(summary: dict[str, Any]) -> str:
    """Where the run's IST started, in words (z = 0, or the start candidates Gauss-Newton chooses among)."""
    if summary["config"]["ist"].get("optimizer", "adamw") != "gauss_newton":
        return "IST starts at z = 0 in both subspaces."
    return ("IST (Gauss-Newton) starts at the best, by train loss on 16 rows, of z = 0, the mean of the train "
            "tasks' vectors and their medoids in prompt space (at most 12 candidates); in the random control the "
            "same vectors are decoded by the random Proj_b and chosen among the same way.")


def _with_kept_start(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Runs made before the stability table counted the seeds that kept their starting prompt: count them from
    the stage files (each chunk records each task's best step), when the run directory has them."""
    st = summary.get("stability") or {}
    if not st.get("per_task") or all("pt_kept_start" in r for r in st["per_task"].values()):
        return summary
    first, d = st["seeds"][0], st["d_intrinsic"]
    dirs = {"pt": [run_dir / "pt" / ("main" if s == first else f"stability-seed{s}") for s in st["seeds"]],
            "ipt_pt": [run_dir / "ipt_pt" / f"dI{d}-seed{s}" for s in st["seeds"]]}
    if not all(p.is_dir() for paths in dirs.values() for p in paths):
        return summary
    for method, paths in dirs.items():
        runs = [{n: r for chunk in sorted(p.glob("chunk*.json")) for n, r in json.loads(chunk.read_text()).items()}
                for p in paths]
        for name, r in st["per_task"].items():
            r[f"{method}_kept_start"] = sum(run[name]["best_step"] == 0 for run in runs if name in run)
    return summary


def _d_choice_section(summary: dict[str, Any]) -> list[str]:
    choice = choose_d(summary["per_d"], summary["pt"]["main"], summary["learnable"], summary["test_tasks"])
    values = ", ".join(f"d_I={d}: {pct(v)}" for d, v in choice["by_d"].items())
    lines = ["## The d_I carried forward", "",
             f"{choice['rule']}. Criterion `{choice['criterion']}` over {choice['tasks']} unseen task(s): {values}. "
             f"Chosen: **d_I = {choice['d']}** (stability runs, ablations, the PCA plot and `ipt experiment export` "
             f"use it).", ""]
    stored = summary.get("best_d")
    if stored is not None and int(stored) != choice["d"]:
        lines += [f"This run was made before the dev rule: it carried d_I = {stored} forward, chosen on the unseen "
                  f"tasks' test scores. Its stability runs (and any ablations) are at d_I = {stored}, not at the "
                  f"dev choice.", ""]
    return lines


def _stability_section(summary: dict[str, Any]) -> list[str]:
    st = summary["stability"]
    agg = stability_summary(summary)
    lines = [f"## Stability: PT vs IPT-initialised PT over seeds {st['seeds']} (cf. the paper's Table 4)", "",
             f"IPT-initialised PT starts from Proj_b(z) of IST at d_I = {st['d_intrinsic']}. Std in points "
             f"(x100, ddof 1) over {len(st['seeds'])} training seeds, test scores. 'kept start': seeds whose best "
             f"dev was the starting prompt (step 0), whose std is 0 by construction.", "",
             "| unseen task | learnable | PT mean | PT std | PT kept start | IPT-init PT mean | IPT-init PT std | "
             "IPT-init kept start |", "|---|---|---|---|---|---|---|---|"]

    def std(xs: list[float]) -> str:
        return f"{stdev(xs) * 100:.2f}" if len(xs) >= 2 else "n/a"

    for name, r in st["per_task"].items():
        lines.append(f"| {name} | {'yes' if summary['learnable'].get(name) else 'no'} | {pct(mean(r['pt']))} | "
                     f"{std(r['pt'])} | {r.get('pt_kept_start', 'n/a')} | {pct(mean(r['ipt_pt']))} | "
                     f"{std(r['ipt_pt'])} | {r.get('ipt_pt_kept_start', 'n/a')} |")
    if agg is not None:
        lines += ["", "| mean std over seeds | learnable unseen tasks | all unseen tasks |", "|---|---|---|",
                  f"| PT | {_points(agg['pt_std'])} | {_points(agg['pt_std_all'])} |",
                  f"| IPT-initialised PT | {_points(agg['ipt_pt_std'])} | {_points(agg['ipt_pt_std_all'])} |", "",
                  f"E_rel^PT of IPT-initialised PT (learnable unseen tasks): {agg['ipt_pt_e_rel'].percent()}.",
                  "Tasks with at least one seed that kept its starting prompt: "
                  + ("n/a (not recorded by this run)" if agg["pt_kept_start"] is None else
                     f"PT {agg['pt_kept_start']}, IPT-initialised PT {agg['ipt_pt_kept_start']}") + "."]
    if len(st["seeds"]) < 5:
        lines += ["", f"Only {len(st['seeds'])} seeds: too few to support a claim about stability (at least 5)."]
    return [*lines, ""]


def copy_summaries(run_dir: Path, dest: Path) -> list[Path]:
    """Copy a run's small result files (JSON, YAML, text; not the prompts, vectors or subspace weights) to
    `dest`, keeping the layout, so that a report can be committed with the numbers it was built from."""
    if dest.exists():
        shutil.rmtree(dest)
    copied = []
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".yaml", ".txt"):
            target = dest / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied.append(target)
    return copied


def _levers_section(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """The levers tried by `ipt experiment ablate` (ablations/*.json), against the run's own IST; every row
    recomputed from the lever's per-task test scores over the tasks the report counts."""
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "ablations").glob("*.json"))]
    if not results:
        return []
    d = results[0]["d_intrinsic"]
    lines = [f"## Levers tried on the unseen tasks at d_I = {d}", "",
             "Each row changes one thing against the run's own IST (first row) and re-learns the unseen tasks; "
             "computed by `ipt experiment ablate`.", "",
             "| lever | what changes | E_rel^PT % | E_abs % | best step (median; max) | seconds |",
             "|---|---|---|---|---|---|"]
    ref = find_row(headline_rows(summary), "unseen_tasks", d)
    if ref:
        ist_cfg = summary["config"]["ist"]
        how = (f"{ist_cfg['optimizer']}, up to {ist_cfg['max_iterations']} iterations, multi-start"
               if ist_cfg.get("optimizer", "adamw") != "adamw" else f"AdamW lr {ist_cfg['learning_rate']}, z from 0")
        lines.append(f"| (run) | IST as configured: {how} | "
                     f"{ref['e_rel'].percent()} | {ref['e_abs'].percent()} | | |")
    pt, _ = reference_of(summary, "unseen_tasks")
    for r in sorted(results, key=lambda r: r["lever"]):
        scores = {n: v["test"] for n, v in r["per_task"].items()}
        abs_names, rel_names, _ = counted_tasks(summary, "unseen_tasks", scores)
        rel = e_rel_estimate({n: scores[n] for n in rel_names}, {n: pt[n]["test"] for n in rel_names})
        best = sorted(v["best_step"] for v in r["per_task"].values())
        steps = f"{best[(len(best) - 1) // 2]}; {best[-1]}" if best else ""
        lines.append(f"| {r['lever']} | {r['description']} | {rel.percent()} | "
                     f"{e_abs_estimate({n: scores[n] for n in abs_names}).percent()} | {steps} | {r['seconds']} |")
    return [*lines, ""]


def _appendix(summary: dict[str, Any], ds: list[int]) -> list[str]:
    controls = [("no prompt", summary.get("no_prompt"))]
    controls += [(f"z=0 d_I={d}", summary["per_d"][str(d)].get("z0")) for d in ds]
    controls = [(title, values) for title, values in controls if values]
    lines = ["## Appendix: per-task scores (test, %)", "",
             "| task | kind | trivial (dev) | PT dev | PT test | learnable | "
             + " | ".join(f"IST d_I={d}" for d in ds) + " | recon d_I=" + str(ds[-1]) + " | "
             + "".join(f"{title} | " for title, _ in controls),
             "|---|---|---|---|---|---|" + "---|" * (len(ds) + 1 + len(controls))]
    seed = summary["config"]["data_seed"]
    for name in [*summary["train_tasks"], *summary["test_tasks"]]:
        pt = summary["pt"]["main"][name]
        challenge = "seen_same_data" if name in summary["train_tasks"] else "unseen_tasks"
        ist = [pct(summary["per_d"][str(d)].get(challenge, {}).get(name, {}).get("test")) for d in ds]
        recon = summary["per_d"][str(ds[-1])].get("recon", {}).get(name)
        lines.append(f"| {name} | {summary['kinds'][name]} | {pct(summary['baselines'][f'{name}@{seed}'])} | "
                     f"{pct(pt['dev'])} | {pct(pt['test'])} | {'yes' if summary['learnable'][name] else 'no'} | "
                     + " | ".join(ist) + f" | {pct(recon)} | "
                     + "".join(f"{pct(values.get(name))} | " for _, values in controls))
    return [*lines, ""]
