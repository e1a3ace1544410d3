"""The `ipt` command: the engine's commands (pt, msf, ist, eval, data, experiment) plus the service's
(serve, api, worker) and the client commands of a running service (`ipt task export|import`). Lives here so that
ipt_engine never imports the service."""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import uvicorn

from ipt_engine.cli import app, console
from ipt_engine.cli import main as engine_main
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


# ------------------------------------------------------------------------------ clients of a running service
task_app = typer.Typer(help="A running service's tasks: export a task's soft prompt, import a PEFT adapter.",
                       no_args_is_help=True)
app.add_typer(task_app, name="task")

Url = Annotated[str, typer.Option(envvar="IPT_URL", help="the service's base URL")]
ApiKey = Annotated[str | None, typer.Option(envvar="IPT_API_KEY", help="API key (not needed in open mode)",
                                            show_default=False)]
CLIENT_TIMEOUT_S = 300.0
"""An import with examples scores the dev split on the service before it answers."""


def _call(url: str, api_key: str | None, method: str, path: str, **kw: Any) -> httpx.Response:
    """One request to the service; an error answer or no answer ends the command with its message (exit 2)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=CLIENT_TIMEOUT_S) as client:
            response = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        _say(f"error: no answer from {url} ({type(exc).__name__}: {exc})")
        raise typer.Exit(2) from None
    if response.is_error:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:500]
        _say(f"error: {method} {path}: {response.status_code}: {detail}")
        raise typer.Exit(2)
    return response


@task_app.command("export")
def task_export(task_id: Annotated[str, typer.Argument(help="the task id")],
                out: Annotated[Path, typer.Option("--out", help="directory to write the files into")],
                format: Annotated[str, typer.Option("--format", help="peft or embeddings")] = "peft",
                dtype: Annotated[str, typer.Option(help="embeddings only: float32, float16 or bfloat16")] = "float32",
                url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Write a trained task's soft prompt into OUT: a PEFT prompt-tuning adapter (peft) or plain embeddings for
    inputs_embeds / vLLM prompt_embeds (embeddings), with the input format and a README."""
    params = {"format": format} | ({"dtype": dtype} if format == "embeddings" else {})
    response = _call(url, api_key, "GET", f"/tasks/{task_id}/export", params=params)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = [name for name in archive.namelist() if name == Path(name).name]  # files at the root only
        for name in names:
            (out / name).write_bytes(archive.read(name))
    _say(f"task {task_id} exported as {format} to {out}: {', '.join(sorted(names))}")


@task_app.command("import")
def task_import(directory: Annotated[Path, typer.Argument(help="a PEFT prompt-tuning adapter directory "
                                                                "(adapter_config.json, adapter_model.safetensors)")],
                name: Annotated[str | None, typer.Option(help="task name (default: ipt_format.json's task_name)")]
                = None,
                kind: Annotated[str | None, typer.Option(help="classification, multiple_choice or generation "
                                                              "(default: ipt_format.json's)")] = None,
                label: Annotated[list[str] | None, typer.Option(help="a label of a classification task (repeat; "
                                                                     "default: ipt_format.json's)")] = None,
                examples: Annotated[Path | None, typer.Option(help="a JSON file (or a task file's first line) with "
                                                                   "train [and dev] examples: the import then "
                                                                   "reports dev scores of the prompt vs its z")]
                = None,
                url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Import a PEFT prompt-tuning adapter as a task of the service (its z, fitted in the subspace); prints the
    new task and how much of the prompt the subspace reconstructs."""
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for path in (config_file, weights_file):
        if not path.is_file():
            raise typer.BadParameter(f"{directory} holds no {path.name}: not a PEFT adapter directory (a pickled "
                                     "adapter_model.bin is not accepted; save it with safe_serialization)")
    fmt = _json_file(directory / "ipt_format.json") if (directory / "ipt_format.json").is_file() else {}
    body: dict[str, Any] = {"name": name or fmt.get("task_name"), "kind": kind or fmt.get("kind"),
                            "labels": label or fmt.get("labels"),
                            "adapter": {"config": _json_file(config_file),
                                        "weights": base64.b64encode(weights_file.read_bytes()).decode()}}
    if not body["name"]:
        raise typer.BadParameter("give --name: the task name the prompt was trained with (no ipt_format.json)")
    if examples is not None:
        text = examples.read_text()
        given = json.loads(text.splitlines()[0]) if examples.suffix == ".jsonl" else json.loads(text)
        body["train"], body["dev"] = given.get("train"), given.get("dev")
        body["kind"] = body["kind"] or given.get("kind")
        body["labels"] = body["labels"] or given.get("labels")
    response = _call(url, api_key, "POST", "/tasks/import", json={k: v for k, v in body.items() if v is not None})
    result = response.json()
    task, fit = result["task"], result["fit"]
    _say(f"task {task['id']} ({task['name']}, {task['kind']}) {task['status']}: relative error of the "
                  f"prompt's fit in the subspace {fit['relative_error']:.3g}")
    if fit.get("dev"):
        dev = fit["dev"]
        _say(f"dev ({dev['examples']} examples): imported prompt {dev['imported_prompt']:.3f}, its z "
                      f"{dev['vector']:.3f}, bare model {dev['bare_model']:.3f}")
    if fit.get("note"):
        _say(f"note: {fit['note']}")


def _say(text: str) -> None:
    """A line as it is: the service's messages are neither rich markup nor wrapped."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{path} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{path} must hold a JSON object")
    return value


def main() -> None:
    engine_main()


if __name__ == "__main__":
    main()
