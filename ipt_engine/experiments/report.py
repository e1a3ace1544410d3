"""`ipt experiment report`: a Markdown report built only from a run directory's summary.json.

E_rel^PT = mean over tasks of score(method) / score(PT); E_abs = mean score. Tasks the PLM cannot learn
(PT dev score not above a trivial baseline) or whose PT test score is 0 are left out of both, and counted.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import yaml

from ipt_engine.metrics import e_abs, e_rel
from ipt_engine.named_tensors import load_chunks, load_named

CHALLENGE_TITLES = {
    "seen_same_data": "seen tasks, same data",
    "seen_unseen_data": "seen tasks, unseen data",
    "unseen_tasks": "unseen tasks",
    "recon": "MSF reconstruction (train tasks)",
}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def challenge_scores(summary: dict[str, Any], d: str, challenge: str) -> tuple[dict[str, float], dict[str, float]]:
    """(method test scores, PT test scores) over the tasks that count for this challenge."""
    per_d = summary["per_d"][d]
    if challenge == "recon":
        names, method = summary["train_tasks"], per_d["recon"]
        pt, ok = summary["pt"]["main"], summary["learnable"]
    elif challenge == "seen_unseen_data":
        names, method = summary["train_tasks"], {n: r["test"] for n, r in per_d[challenge].items()}
        pt, ok = summary["pt"]["unseen-data"], summary["learnable_unseen_data"]
    else:
        names = summary["train_tasks"] if challenge == "seen_same_data" else summary["test_tasks"]
        method = {n: r["test"] for n, r in per_d[challenge].items()}
        pt, ok = summary["pt"]["main"], summary["learnable"]
    keep = [n for n in names if ok.get(n) and pt[n]["test"] > 0 and n in method]
    return {n: method[n] for n in keep}, {n: pt[n]["test"] for n in keep}


def headline_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for challenge in CHALLENGE_TITLES:
        for d in summary["per_d"]:
            if challenge == "recon" and not summary["per_d"][d]["recon"]:
                continue
            method, pt = challenge_scores(summary, d, challenge)
            rows.append({"challenge": challenge, "d": int(d), "tasks": len(method),
                         "e_rel": e_rel(method, pt) if method else None,
                         "e_abs": e_abs(method) if method else None,
                         "pt_e_abs": e_abs(pt) if pt else None})
    return rows


def pca_plot(run_dir: Path, summary: dict[str, Any], out: Path) -> Path | None:
    """Intrinsic vectors at the best d_I (train tasks: Proj(P_i); unseen tasks: IST z) on 2 PCA axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = summary["best_d"]
    train = load_named(run_dir / "msf" / f"dI{d}" / "task_vectors.safetensors")
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
    else its largest d_I."""
    d = 250 if "250" in summary["per_d"] else max(int(k) for k in summary["per_d"])
    rows = {(r["challenge"], r["d"]): r for r in headline_rows(summary)}
    out = []
    for challenge, title in (("seen_unseen_data", "E_rel^PT, seen tasks with unseen data"),
                             ("unseen_tasks", "E_rel^PT, unseen tasks")):
        r = rows.get((challenge, d))
        out.append({"figure": f"{title} (d_I = {d})", "paper": f"{100 * PAPER[challenge]:.0f}%",
                    "run": "n/a" if not r or r["e_rel"] is None else f"{100 * r['e_rel']:.1f}%"})
    st = summary["stability"]
    per_task = list(st["per_task"].values())
    if per_task:
        out.append({"figure": "mean std over seeds, PT", "paper": f"{PAPER['pt_std']:.2f}",
                    "run": f"{mean(r['pt_std'] for r in per_task):.2f}"})
        out.append({"figure": f"mean std over seeds, IPT-initialised PT (d_I = {st['d_intrinsic']})",
                    "paper": f"{PAPER['ipt_pt_std']:.2f}", "run": f"{mean(r['ipt_pt_std'] for r in per_task):.2f}"})
        ratios = [mean(r["ipt_pt"]) / mean(r["pt"]) for n, r in st["per_task"].items()
                  if summary["learnable"].get(n) and mean(r["pt"]) > 0]
        out.append({"figure": "E_rel^PT of IPT-initialised PT", "paper": f"{100 * PAPER['ipt_pt_e_rel']:.1f}%",
                    "run": f"{100 * mean(ratios):.1f}%" if ratios else "n/a"})
    return out


def e_rel_plot(summary: dict[str, Any], out: Path) -> Path | None:
    """E_rel^PT against d_I for each challenge (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in headline_rows(summary) if r["e_rel"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for challenge, title in CHALLENGE_TITLES.items():
        points = sorted((r["d"], 100 * r["e_rel"]) for r in rows if r["challenge"] == challenge)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=title)
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ds = sorted({r["d"] for r in rows})
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set_xlabel("intrinsic dimension d_I")
    ax.set_ylabel("E_rel^PT (%)")
    ax.set_title(f"IST relative to PT ({summary['config']['name']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(run_dir: Path, out: Path | None = None, notes: Path | None = None) -> Path:
    """Write the Markdown report (and its PCA plot next to it); returns the report path. `notes`, a Markdown
    file, is included as the discussion after the comparison with the paper."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} is missing: run `ipt experiment run` to completion first")
    summary = json.loads(summary_path.read_text())
    out = out or run_dir / "report.md"
    plot = pca_plot(run_dir, summary, out.parent / f"{out.stem}-pca.png")
    rel_plot = e_rel_plot(summary, out.parent / f"{out.stem}-e-rel.png")
    cfg = summary["config"]
    ds = [int(d) for d in summary["per_d"]]
    rows = headline_rows(summary)
    lines = [f"# IPT experiment report: {cfg['name']}", "",
             f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from `{run_dir}` by "
             f"`ipt experiment report`. Every number below is read from the run directory.", ""]
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
              f"- Learnability filter: {len(filtered)} of {len(all_names)} tasks have a PT dev score not above "
              f"a trivial baseline and are left out of E_rel and E_abs: {', '.join(filtered) or 'none'}", ""]
    lines += ["## Comparison with the paper's headline figures", "",
              "| figure | paper (BART-base, 120 tasks) | this run |", "|---|---|---|"]
    lines += [f"| {r['figure']} | {r['paper']} | {r['run']} |" for r in paper_comparison(summary)]
    lines += [""]
    if notes is not None:
        lines += [notes.read_text().strip(), ""]
    lines += ["## E_rel^PT and E_abs by intrinsic dimension (cf. the paper's Figure 3 and Table 2)", "",
              "E_rel^PT (%) = mean over tasks of IST test score / PT test score; E_abs (%) = mean IST test "
              "score; (k) = number of tasks counted.", "",
              "| challenge | " + " | ".join(f"d_I={d}" for d in ds) + " | PT E_abs |",
              "|---|" + "---|" * (len(ds) + 1)]
    for challenge, title in CHALLENGE_TITLES.items():
        cells_rel, cells_abs, pt_abs = [], [], None
        for d in ds:
            row = next((r for r in rows if r["challenge"] == challenge and r["d"] == d), None)
            cells_rel.append(f"{_pct(row['e_rel'])} ({row['tasks']})" if row else "n/a")
            cells_abs.append(_pct(row["e_abs"]) if row else "n/a")
            pt_abs = row["pt_e_abs"] if row else pt_abs
        lines.append(f"| {title}: E_rel^PT | " + " | ".join(cells_rel) + f" | {_pct(pt_abs)} |")
        lines.append(f"| {title}: E_abs | " + " | ".join(cells_abs) + " | |")
    if rel_plot is not None:
        lines += ["", f"![E_rel^PT by d_I]({rel_plot.name})"]
    lines += ["", "MSF: " + "; ".join(
        f"d_I={d}: dev {summary['per_d'][str(d)]['msf']['mean_dev_score']:.3f}"
        + (f", reconstruction MSE {summary['per_d'][str(d)]['msf']['reconstruction_mse']:.4g}"
           if "reconstruction_mse" in summary["per_d"][str(d)]["msf"] else "") for d in ds), ""]
    lines += _stability_section(summary)
    lines += _levers_section(run_dir, summary)
    if plot is not None:
        lines += ["## Intrinsic vectors (PCA)", "", f"![PCA of intrinsic vectors]({plot.name})", "",
                  f"Train tasks: Proj(P_i) from MSF; unseen tasks (stars): their IST z; d_I = {summary['best_d']}.", ""]
    lines += ["## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["timings"].items()]
    lines += ["", "## Task lists", "",
              "Train (seen): " + ", ".join(f"`{n}` ({summary['kinds'][n]})" for n in summary["train_tasks"]), "",
              "Held out (unseen): " + ", ".join(f"`{n}` ({summary['kinds'][n]})" for n in summary["test_tasks"]),
              ""]
    lines += _appendix(summary, ds)
    lines += ["## Config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    out.write_text("\n".join(lines))
    return out


def _stability_section(summary: dict[str, Any]) -> list[str]:
    st = summary["stability"]
    lines = [f"## Stability: PT vs IPT-initialised PT over seeds {st['seeds']} (cf. the paper's Table 4)", "",
             f"IPT-initialised PT starts from Proj_b(z) of IST at d_I = {st['d_intrinsic']}. Std in points "
             f"(x100) over training seeds, test scores.", "",
             "| unseen task | PT mean | PT std | IPT-init PT mean | IPT-init PT std |", "|---|---|---|---|---|"]
    ratios = []
    for name, r in st["per_task"].items():
        lines.append(f"| {name} | {_pct(mean(r['pt']))} | {r['pt_std']:.2f} | {_pct(mean(r['ipt_pt']))} | "
                     f"{r['ipt_pt_std']:.2f} |")
        if summary["learnable"].get(name) and mean(r["pt"]) > 0:
            ratios.append(mean(r["ipt_pt"]) / mean(r["pt"]))
    per_task = list(st["per_task"].values())
    if per_task:
        lines.append(f"| **mean** | | **{mean(r['pt_std'] for r in per_task):.2f}** | | "
                     f"**{mean(r['ipt_pt_std'] for r in per_task):.2f}** |")
    lines += ["", f"E_rel^PT of IPT-initialised PT (learnable unseen tasks): "
              f"{_pct(mean(ratios)) if ratios else 'n/a'}%", ""]
    return lines


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
    """The levers tried by `ipt experiment ablate` (ablations/*.json), against the run's own IST."""
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "ablations").glob("*.json"))]
    if not results:
        return []
    d = results[0]["d_intrinsic"]
    ref = next((r for r in headline_rows(summary) if r["challenge"] == "unseen_tasks" and r["d"] == d), None)
    lines = [f"## Levers tried on the unseen tasks at d_I = {d}", "",
             "Each row changes one thing against the run's own IST (first row) and re-learns the unseen tasks; "
             "computed by `ipt experiment ablate`.", "",
             "| lever | what changes | E_rel^PT % | E_abs % | tasks | seconds |", "|---|---|---|---|---|---|"]
    if ref:
        lines.append(f"| (run) | IST as configured: lr {summary['config']['ist']['learning_rate']}, z from 0 | "
                     f"{_pct(ref['e_rel'])} | {_pct(ref['e_abs'])} | {ref['tasks']} | |")
    for r in sorted(results, key=lambda r: r["lever"]):
        lines.append(f"| {r['lever']} | {r['description']} | {_pct(r['e_rel'])} | {_pct(r['e_abs'])} | "
                     f"{r['tasks_counted']} | {r['seconds']} |")
    return [*lines, ""]


def _appendix(summary: dict[str, Any], ds: list[int]) -> list[str]:
    lines = ["## Appendix: per-task scores (test, %)", "",
             "| task | kind | trivial (dev) | PT dev | PT test | learnable | "
             + " | ".join(f"IST d_I={d}" for d in ds) + " | recon d_I=" + str(ds[-1]) + " |",
             "|---|---|---|---|---|---|" + "---|" * (len(ds) + 1)]
    seed = summary["config"]["data_seed"]
    for name in [*summary["train_tasks"], *summary["test_tasks"]]:
        pt = summary["pt"]["main"][name]
        challenge = "seen_same_data" if name in summary["train_tasks"] else "unseen_tasks"
        ist = [_pct(summary["per_d"][str(d)][challenge].get(name, {}).get("test")) for d in ds]
        recon = summary["per_d"][str(ds[-1])]["recon"].get(name)
        lines.append(f"| {name} | {summary['kinds'][name]} | {_pct(summary['baselines'][f'{name}@{seed}'])} | "
                     f"{_pct(pt['dev'])} | {_pct(pt['test'])} | {'yes' if summary['learnable'][name] else 'no'} | "
                     + " | ".join(ist) + f" | {_pct(recon)} |")
    return [*lines, ""]

