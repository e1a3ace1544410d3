"""`ipt task ...`: a command-line client of a running service, over its HTTP API (`--url` / IPT_URL, `--key` /
IPT_API_KEY): create a task from a CSV/TSV/JSON Lines file and follow its training, predict, list, show, cancel,
delete, export a task's soft prompt (PEFT adapter or embeddings) and import a PEFT prompt-tuning adapter.
Errors print the service's message and exit with status 2; a task that fails or is cancelled while `create`
follows it exits with status 1."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ipt_engine.cli import console

out = Console(soft_wrap=True)  # results on stdout (pipe them); progress and errors go to stderr (`console`)

# ------------------------------------------------------------------------------ clients of a running service
task_app = typer.Typer(help="A running service's tasks: create and follow, predict, list, show, cancel, delete, "
                            "export a soft prompt, import a PEFT adapter.", no_args_is_help=True)

Url = Annotated[str, typer.Option(envvar="IPT_URL", help="the service's base URL")]
ApiKey = Annotated[str | None, typer.Option("--key", "--api-key", envvar="IPT_API_KEY",
                                            help="API key (not needed in open mode)", show_default=False)]
CLIENT_TIMEOUT_S = 300.0
"""An import with examples scores the dev split on the service before it answers."""


def _call(url: str, api_key: str | None, method: str, path: str, **kw: Any) -> httpx.Response:
    """One request to the service; an error answer or no answer ends the command with its message (exit 2)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=CLIENT_TIMEOUT_S) as client:
            response = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        _say(f"error: no answer from {url} ({type(exc).__name__}: {exc})", error=True)
        raise typer.Exit(2) from None
    if response.is_error:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:500]
        _say(f"error: {method} {path}: {response.status_code}: {detail}", error=True)
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


def _say(text: str, error: bool = False) -> None:
    """A line as it is (the service's messages are neither rich markup nor wrapped): results on stdout,
    errors on stderr."""
    (console if error else out).print(text, markup=False, highlight=False, soft_wrap=True)


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{path} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{path} must hold a JSON object")
    return value


# --------------------------------------------------------------------------- create, follow, predict, manage
FINAL = {"succeeded", "failed", "cancelled"}
NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]+")


def read_examples(path: Path) -> list[dict[str, Any]]:
    """Examples from a CSV or TSV file (columns input, output; a header row optional) or JSON Lines (objects
    with input, output and, for multiple choice, options). Raises typer.BadParameter naming the line."""
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise typer.BadParameter(f"{path} holds no examples")
    rows: list[dict[str, Any]] = []
    if path.suffix == ".jsonl" or lines[0].lstrip().startswith("{"):
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise typer.BadParameter(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not (isinstance(row, dict) and isinstance(row.get("input"), str) and isinstance(row.get("output"), str)):
                raise typer.BadParameter(f"{path}:{number}: each line needs string fields input and output")
            rows.append({k: row[k] for k in ("input", "output", "options") if k in row})
        return rows
    delimiter = "\t" if path.suffix == ".tsv" or "\t" in lines[0] else ","
    table = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    start = 1 if [c.strip().lower() for c in table[0][:2]] == ["input", "output"] else 0
    for number, cells in enumerate(table[start:], start=start + 1):
        if len(cells) < 2 or not cells[0].strip() or not cells[-1].strip():
            raise typer.BadParameter(f"{path}:{number}: needs an input and an output "
                                     f"({'tab' if delimiter == chr(9) else 'comma'} separated)")
        rows.append({"input": delimiter.join(cells[:-1]).strip(), "output": cells[-1].strip()})
    return rows


def follow(url: str, api_key: str | None, task_id: str) -> dict[str, Any]:
    """Show a task's training as a progress bar from its events stream (resuming after a dropped connection)
    until its final event; returns the task as the service then shows it."""
    headers = {"Accept": "text/event-stream"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    last_id, final = "0", None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.fields[of]}"),
               TextColumn("{task.fields[dev]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("queued", total=None, dev="", of="?")
        while final is None:
            try:
                with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=60)) as client, client.stream(
                        "GET", f"/tasks/{task_id}/events", headers={**headers, "Last-Event-ID": last_id}) as stream:
                    if stream.is_error:
                        stream.read()
                        _say(f"error: events of {task_id}: {stream.status_code}: {stream.text[:300]}", error=True)
                        raise typer.Exit(2)
                    event: dict[str, str] = {}
                    for line in stream.iter_lines():
                        if line:
                            key, _, value = line.partition(": ")
                            event[key] = value
                            continue
                        if "event" in event and "data" in event:
                            last_id = event.get("id", last_id)
                            final = _show_event(progress, bar, event["event"], json.loads(event["data"])) or final
                        event = {}
            except httpx.HTTPError as exc:  # a dropped connection: resume from the last event seen
                progress.update(bar, description=f"reconnecting ({type(exc).__name__})")
    return _call(url, api_key, "GET", f"/tasks/{task_id}").json()


def _show_event(progress: Progress, bar: Any, kind: str, data: dict[str, Any]) -> str | None:
    if kind == "started":
        total = data.get("total_steps") or None
        progress.update(bar, description="training", total=total, of=total or "?")
    elif kind == "evaluation":
        dev = data.get("dev")
        progress.update(bar, completed=data.get("step", 0), dev="" if dev is None else f"dev {dev:.3f}")
    elif kind in FINAL or kind == "deleted":
        progress.update(bar, description=kind)
        return kind
    else:
        progress.update(bar, description=kind)
    return None


@task_app.command("create")
def task_create(file: Annotated[Path, typer.Argument(help="examples: CSV/TSV (input,output) or JSON Lines")],
                name: Annotated[str | None, typer.Option(help="task name (default: the file's name)")] = None,
                kind: Annotated[str | None, typer.Option(help="classification, multiple_choice or generation "
                                                              "(default: inferred by the service)")] = None,
                label: Annotated[list[str] | None, typer.Option(help="a label (repeat; default: the outputs)")]
                = None,
                wait: Annotated[bool, typer.Option(help="follow the training until it ends")] = True,
                url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Create a task from a file of examples and follow its training; exits non-zero if it fails."""
    body: dict[str, Any] = {"name": name or NAME_UNSAFE.sub("_", file.stem).strip("_") or "task",
                            "train": read_examples(file)}
    if kind:
        body["kind"] = kind
    if label:
        body["labels"] = label
    task = _call(url, api_key, "POST", "/tasks", json=body).json()
    _say(f"task {task['id']} ({task['name']}, {task['kind']}, {len(body['train'])} examples): {task['status']}")
    if task.get("warning"):
        _say(f"warning: {task['warning']}")
    if not wait:
        return
    done = follow(url, api_key, task["id"])
    _say(_summary(done))
    if done["status"] != "succeeded":
        raise typer.Exit(1)


def _summary(task: dict[str, Any]) -> str:
    text = f"task {task['id']} {task['status']}"
    if task.get("dev_score") is not None:
        text += f": dev score {task['dev_score']:.3f}"
        if task.get("bare_dev_score") is not None:
            text += f" (bare model {task['bare_dev_score']:.3f})"
    if task.get("note"):
        text += f"; {task['note']}"
    if task.get("error"):
        text += f": {task['error'].get('code')}: {task['error'].get('message')}"
    return text


@task_app.command("predict")
def task_predict(task_id: Annotated[str, typer.Argument(help="the task id")],
                 text: Annotated[list[str] | None, typer.Argument(help="inputs to answer")] = None,
                 file: Annotated[Path | None, typer.Option(help="a file with one input per line")] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="print the service's JSON answer")] = False,
                 url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Answer inputs with a trained task: the answer and, for option tasks, each option's probability."""
    inputs = list(text or []) + ([line for line in file.read_text().splitlines() if line.strip()] if file else [])
    if not inputs:
        raise typer.BadParameter("give inputs as arguments or --file")
    answer = _call(url, api_key, "POST", f"/tasks/{task_id}/predict", json={"inputs": inputs}).json()
    if as_json:
        _say(json.dumps(answer))
        return
    for given, prediction in zip(inputs, answer["predictions"], strict=True):
        probabilities = prediction.get("probabilities") or {}
        shown = "  ".join(f"{k} {v:.2f}" for k, v in sorted(probabilities.items(), key=lambda kv: -kv[1]))
        _say(f"{given}\t-> {prediction['output']}" + (f"\t({shown})" if shown else ""))


@task_app.command("list")
def task_list(limit: Annotated[int, typer.Option(help="at most this many")] = 100,
              url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Your tasks, newest first."""
    page = _call(url, api_key, "GET", "/tasks", params={"limit": limit}).json()
    table = Table("id", "name", "kind", "status", "dev score")
    for t in page["tasks"]:
        table.add_row(t["id"], t["name"], t["kind"], t["status"],
                      "" if t.get("dev_score") is None else f"{t['dev_score']:.3f}")
    out.print(table)
    _say(f"{len(page['tasks'])} of {page['total']} task(s)")


@task_app.command("show")
def task_show(task_id: Annotated[str, typer.Argument(help="the task id")],
              url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """A task as the service shows it (JSON)."""
    _say(json.dumps(_call(url, api_key, "GET", f"/tasks/{task_id}").json(), indent=1))


@task_app.command("cancel")
def task_cancel(task_id: Annotated[str, typer.Argument(help="the task id")],
                url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Cancel a queued or running task."""
    _say(_summary(_call(url, api_key, "POST", f"/tasks/{task_id}/cancel").json()))


@task_app.command("delete")
def task_delete(task_id: Annotated[str, typer.Argument(help="the task id")],
                url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Delete a task and its vector."""
    _call(url, api_key, "DELETE", f"/tasks/{task_id}")
    _say(f"task {task_id} deleted")
