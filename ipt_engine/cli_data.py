"""`ipt data`: build the few-shot task pool from the BIG-bench sdist."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ipt_engine.data.bigbench import ConversionRules, download_sdist
from ipt_engine.data.pool import TaskPool, prepare_pool
from ipt_engine.data.splits import make_splits, save_splits
from ipt_engine.errors import DataUnavailableError
from ipt_engine.model_loading import default_cache_dir

data_app = typer.Typer(help="The few-shot task pool (BIG-bench JSON tasks).", no_args_is_help=True)
console = Console(stderr=True)


def default_pool_dir() -> Path:
    return default_cache_dir() / "pool"


@data_app.command()
def fetch(cache_dir: Annotated[Path | None, typer.Option(help="where the sdist is downloaded")] = None) -> None:
    """Only download the BIG-bench sdist (pip, never installed) into the cache; `prepare` converts it."""
    console.print(f"BIG-bench sdist at {_fetch_sdist(cache_dir)}")


def _fetch_sdist(cache_dir: Path | None) -> Path:
    try:
        with console.status("fetching the BIG-bench sdist with pip (358 MB, once)"):
            return download_sdist(cache_dir or default_cache_dir() / "bigbench")
    except DataUnavailableError as err:  # a clear line and exit 1, not a traceback
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from err


@data_app.command()
def prepare(pool: Annotated[Path | None, typer.Option(help="pool directory to write (default: <cache>/pool)")] = None,
            sdist: Annotated[Path | None, typer.Option(help="a bigbench-1.0.0.tar.gz already on disk")] = None,
            cache_dir: Annotated[Path | None, typer.Option(help="where the sdist is downloaded")] = None,
            split_seed: Annotated[int, typer.Option(help="seed of the random task split")] = 0,
            test_fraction: Annotated[float, typer.Option(help="share of held-out tasks in the random split")] = 0.2,
            ) -> None:
    """Download the BIG-bench sdist (pip, never installed), convert its JSON tasks, write the index and splits."""
    pool_dir = pool or default_pool_dir()
    if sdist is None:
        sdist = _fetch_sdist(cache_dir)
    with console.status(f"converting tasks from {sdist.name}"):
        summary = prepare_pool(sdist, pool_dir, ConversionRules())
    task_pool = TaskPool(pool_dir)
    save_splits(make_splits(task_pool, split_seed, test_fraction), pool_dir / "splits")
    table = Table(title=f"Task pool at {pool_dir}")
    table.add_column("usable tasks by kind")
    table.add_column("count")
    for kind, count in sorted(summary["by_kind"].items()):
        table.add_row(kind, str(count))
    table.add_row("[b]total usable[/b]", str(summary["usable"]))
    table.add_row("duplicate examples dropped", str(summary["duplicates_dropped"]))
    console.print(table)
    reasons = Table(title=f"Skipped: {summary['skipped']} (details in {pool_dir / 'skipped.json'})")
    reasons.add_column("reason")
    reasons.add_column("tasks")
    for reason, count in summary["skip_reasons"].items():
        reasons.add_row(reason, str(count))
    console.print(reasons)
    console.print(f"splits written to {pool_dir / 'splits'}")
