"""The `ipt` command: the engine's commands (pt, msf, ist, eval, data, experiment) plus the service's
(serve, api, worker). Lives here so that ipt_engine never imports the service."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from ipt_engine.cli import app, console
from ipt_engine.cli import main as engine_main
from service.settings import Settings

Host = Annotated[str, typer.Option(help="address to listen on")]
Port = Annotated[int, typer.Option(help="port to listen on")]
Subspace = Annotated[Path | None, typer.Option(
    help="subspace artifact directory (default: $IPT_SUBSPACE, else the shipped artifacts/smollm2-bigbench)")]


def _settings(subspace: Path | None) -> Settings:
    settings = Settings()
    if subspace is not None:
        settings.subspace = subspace
    if settings.subspace is None:
        raise typer.BadParameter("no subspace: the shipped artifacts/smollm2-bigbench is missing from this checkout; "
                                 "pass --subspace DIR (written by `ipt msf` or `ipt experiment export`) or set "
                                 "IPT_SUBSPACE")
    return settings


@app.command()
def serve(host: Host = "127.0.0.1", port: Port = 8000, subspace: Subspace = None,
          open_mode: Annotated[bool, typer.Option("--open/--no-open", help="no API keys (local use)")] = True) -> None:
    """Everything in one command: an embedded Redis (unless REDIS_URL is set), one worker and the API."""
    from service.app import create_app
    from service.redis_connection import connect

    settings = _settings(subspace)
    settings.open_mode = open_mode or settings.open_mode
    connection = connect(settings)  # starts the embedded Redis and points settings.redis_url at it
    env = {**os.environ, "IPT_REDIS_URL": str(settings.redis_url), "IPT_SUBSPACE": str(settings.subspace)}
    if settings.torch_threads is None:
        # API and worker in one machine: both taking every core thrash when both work (IST ran ~4x slower while
        # the API predicted). The worker takes every core while the API is idle and half while it predicts
        # (service/core_sharing.py); the API keeps the other half.
        cores = os.cpu_count() or 2
        env["IPT_TORCH_THREADS"] = str(cores)
        env["IPT_WORKER_THREADS_WHEN_API_BUSY"] = str(max(1, cores // 2))
        settings.torch_threads = max(1, cores - cores // 2)
    worker = subprocess.Popen([sys.executable, "-m", "workers"], env=env)
    console.print(f"worker pid {worker.pid}; Redis at {settings.redis_url}; API on http://{host}:{port} "
                  f"(docs at /docs){' - open mode, no API key needed' if settings.open_mode else ''}")
    try:
        uvicorn.run(create_app(settings), host=host, port=port)
    finally:
        worker.terminate()  # SIGTERM: warm shutdown, the current job finishes
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        del connection


@app.command()
def api(host: Host = "0.0.0.0", port: Port = 8000, subspace: Subspace = None) -> None:
    """The API alone (Kubernetes): needs IPT_REDIS_URL; workers run separately."""
    from service.app import create_app

    settings = _settings(subspace)
    if not settings.redis_url and not os.environ.get("REDIS_URL"):
        raise typer.BadParameter("`ipt api` needs IPT_REDIS_URL; use `ipt serve` for the all-in-one embedded mode")
    uvicorn.run(create_app(settings), host=host, port=port)


@app.command()
def worker(subspace: Subspace = None,
           burst: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False) -> None:
    """One IST worker (Kubernetes): loads the model once, then trains queued tasks; needs IPT_REDIS_URL."""
    from workers.worker import run_worker

    settings = _settings(subspace)
    if not settings.redis_url and not os.environ.get("REDIS_URL"):
        raise typer.BadParameter("`ipt worker` needs IPT_REDIS_URL (the Redis the API uses)")
    logging.getLogger("rq").setLevel(logging.INFO)
    run_worker(settings, burst=burst)


def main() -> None:
    engine_main()


if __name__ == "__main__":
    main()
