"""`ipt experiment`: run the paper's study on the task pool, and report it."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ipt_engine.cli_data import default_pool_dir
from ipt_engine.experiments.config import load_config
from ipt_engine.experiments.pipeline import run_experiment
from ipt_engine.experiments.report import copy_summaries, headline_rows, write_report

experiment_app = typer.Typer(help="Reproduce the paper's experiments on the task pool.", no_args_is_help=True)
console = Console(stderr=True)


@experiment_app.command()
def run(config: Annotated[str, typer.Argument(help="config name (smoke, paper-small) or YAML path")],
        run_dir: Annotated[Path | None, typer.Option(help="run directory (default runs/<config name>)")] = None,
        pool: Annotated[Path | None, typer.Option(help="task pool directory (default: the cache's pool)")] = None,
        until: Annotated[str, typer.Option(help="'unseen': stop after the unseen tasks (PT, MSF, controls, IST) "
                                                "and write a partial summary; 'all': every stage")] = "all",
        ) -> None:
    """Run every stage; stages and chunks already in the run directory are reused, so a rerun resumes."""
    logging.getLogger("ipt_engine").setLevel(logging.INFO)
    cfg = load_config(config)
    out = run_dir or Path("runs") / cfg.name
    pool_dir = pool or (Path(cfg.pool) if cfg.pool else default_pool_dir())
    summary = run_experiment(cfg, out, pool_dir, command="ipt " + shlex.join(sys.argv[1:]), until=until)
    console.print(f"run complete: {out / 'summary.json'}")
    for line in headline_lines(summary):
        console.print(line)
    console.print(f"write the report with: ipt experiment report {out}")


def headline_lines(summary: dict) -> list[str]:
    """One line per (challenge, d_I, method) of a finished run: E_rel^PT and E_abs with intervals and counts."""
    return [f"  {row['challenge']:<18} d_I={row['d']:<4} {row['method']:<9} E_rel^PT {row['e_rel'].percent()}  "
            f"E_abs {row['e_abs'].percent()}" for row in headline_rows(summary)]


@experiment_app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory with summary.json")],
           out: Annotated[Path | None, typer.Option(help="Markdown file to write (default RUN_DIR/report.md)")] = None,
           notes: Annotated[Path | None, typer.Option(help="a Markdown discussion to include after the comparison "
                                                           "with the paper")] = None,
           summaries_to: Annotated[Path | None, typer.Option(help="also copy the run's result files (JSON/YAML, "
                                                                  "no weights) to this directory")] = None,
           ) -> None:
    """Write the Markdown report (tables, stability, PCA plot, per-task appendix) from a finished run."""
    path = write_report(run_dir, out, notes)
    if summaries_to is not None:
        copied = copy_summaries(run_dir, summaries_to)
        console.print(f"{len(copied)} result files copied to {summaries_to}")
    console.print(f"report written to {path}")


@experiment_app.command()
def export(run_dir: Annotated[Path, typer.Argument(help="a finished run directory (with summary.json)")],
           out: Annotated[Path, typer.Option(help="artifact directory to write")],
           d_intrinsic: Annotated[int | None, typer.Option(help="which d_I (default: the one the run chose on dev)")]
           = None,
           pool: Annotated[Path | None, typer.Option(help="task pool directory (default: the run's)")] = None,
           ) -> None:
    """Write one d_I's Proj_b as a service artifact: fp16 (checked against fp32 on the unseen tasks), no Proj,
    with MODEL_CARD.md."""
    from ipt_engine.experiments.export import export_artifact

    logging.getLogger("ipt_engine").setLevel(logging.INFO)
    path = export_artifact(run_dir, out, d_intrinsic, pool)
    console.print(f"artifact written to {path} (see {path / 'MODEL_CARD.md'})")


@experiment_app.command()
def ablate(run_dir: Annotated[Path, typer.Argument(help="a finished run directory (with summary.json)")],
           d_intrinsic: Annotated[int | None, typer.Option(help="which d_I (default: the one the run chose on dev)")]
           = None,
           only: Annotated[list[str] | None, typer.Option(help="lever name (repeatable; default: every lever)")] = None,
           pool: Annotated[Path | None, typer.Option(help="task pool directory (default: the run's)")] = None,
           ) -> None:
    """Try the paper's levers (IST step size and steps, z init from the mean or the nearest train vector, MSF
    without Proj, alpha) on the run's unseen tasks; cached in RUN_DIR/ablations, listed by the report."""
    from ipt_engine.experiments.ablations import run_levers

    logging.getLogger("ipt_engine").setLevel(logging.INFO)
    for r in run_levers(run_dir, pool, d_intrinsic, only):
        rel = "n/a" if r["e_rel"] is None else f"{100 * r['e_rel']:.1f}%"
        console.print(f"  {r['lever']:<18} E_rel^PT {rel:>7}  ({r['tasks_counted']} tasks, {r['seconds']} s)")
