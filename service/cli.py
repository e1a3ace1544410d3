"""The `ipt` command: the engine's commands (pt, msf, ist, eval, data, experiment) plus the service's
(serve, api, worker) and the client commands of a running service (`ipt task export|import`). Lives here so that
ipt_engine never imports the service."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from ipt_engine.cli import app, console
from ipt_engine.cli import main as engine_main
from service.cli_tasks import task_app
from service.settings import Settings

Host = Annotated[str, typer.Option(help="address to listen on")]
Port = Annotated[int, typer.Option(help="port to listen on")]
Subspace = Annotated[Path | None, typer.Option(
    help="subspace artifact directory (default: $IPT_SUBSPACE, else the shipped service/artifacts/smollm2-bigbench)")]


def _settings(subspace: Path | None) -> Settings:
    settings = Settings()
    if subspace is not None:
        settings = settings.model_copy(update={"subspace": subspace})
    if settings.subspace is None:
        raise typer.BadParameter("no subspace: the shipped service/artifacts/smollm2-bigbench is missing from this "
                                 "installation; "
                                 "pass --subspace DIR (written by `ipt msf` or `ipt experiment export`) or set "
                                 "IPT_SUBSPACE")
    return settings


@app.command()
def serve(host: Host = "127.0.0.1", port: Port = 8000, subspace: Subspace = None,
          open_mode: Annotated[bool | None, typer.Option(
              "--open/--no-open", help="serve requests without an API key as tenant 'public' (default: open only "
                                       "when no IPT_API_KEYS are configured; IPT_OPEN_MODE=true/false decides too)",
              show_default=False)] = None) -> None:
    """Everything in one command: an embedded Redis (unless IPT_REDIS_URL or REDIS_URL is set), one worker and
    the API. SIGTERM or Ctrl-C stops all three within IPT_SHUTDOWN_GRACE_S; a second one forces the exit."""
    from service.auth import auth_mode
    from service.serve import serve_all

    settings = _settings(subspace)
    settings = settings.model_copy(update={"open_mode": serve_open_mode(settings, open_mode)})
    console.print(auth_mode(settings))
    raise typer.Exit(serve_all(settings, host, port, say=console.print))


def serve_open_mode(settings: Settings, flag: bool | None) -> bool:
    """`ipt serve`'s mode: --open / --no-open when given, else IPT_OPEN_MODE when set, else open exactly when no
    API key is configured (local use needs no key; configured keys mean they are required)."""
    if flag is not None:
        return flag
    if "open_mode" in settings.model_fields_set:
        return settings.open_mode
    return not settings.api_keys


@app.command()
def api(host: Host = "0.0.0.0", port: Port = 8000, subspace: Subspace = None) -> None:
    """The API alone (Kubernetes): needs IPT_REDIS_URL; workers run separately."""
    from service.app import create_app
    from service.auth import auth_mode

    settings = _settings(subspace)
    if not settings.redis_url and not os.environ.get("REDIS_URL"):
        raise typer.BadParameter("`ipt api` needs IPT_REDIS_URL; use `ipt serve` for the all-in-one embedded mode")
    console.print(auth_mode(settings))
    uvicorn.run(create_app(settings), host=host, port=port)


@app.command()
def worker(subspace: Subspace = None,
           burst: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False) -> None:
    """One IST worker (Kubernetes): loads the model once, then trains queued tasks; needs IPT_REDIS_URL.

    The worker is its own program, `python -m workers` (as `ipt serve` starts it): this command checks the
    settings and replaces itself with it (same process, so signals reach the worker directly). `service` never
    imports `workers`, which is built on top of it."""
    settings = _settings(subspace)
    if not settings.redis_url and not os.environ.get("REDIS_URL"):
        raise typer.BadParameter("`ipt worker` needs IPT_REDIS_URL (the Redis the API uses)")
    from service.serve import worker_argv

    argv = worker_argv(burst)
    os.execve(argv[0], argv, {**os.environ, "IPT_SUBSPACE": str(settings.subspace)})


app.add_typer(task_app, name="task")


def main() -> None:
    engine_main()


if __name__ == "__main__":
    main()
