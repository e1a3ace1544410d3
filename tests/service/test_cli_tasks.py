"""`ipt task ...` as a user runs it: a real `ipt` process against the real app over HTTP (real Redis, a real
worker): create from a CSV and follow the training to `succeeded`, predict, list, show, delete; bad files and
the service's refusals end with the message and exit 2; a task cancelled while followed exits 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.settings import Settings
from tests.service.conftest import client_for, run_worker_burst, running_app

IPT = str(Path(sys.executable).parent / "ipt")
ROWS = [("the movie was great", "positive"), ("the movie was awful", "negative"), ("a lovely film", "positive"),
        ("a bad, bad film", "negative"), ("fine acting", "positive"), ("poor acting", "negative"),
        ("nice story", "positive"), ("dull story", "negative")]


def _env(server: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPT_")}
    return env | {"IPT_URL": server, "IPT_API_KEY": "key-alice", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def ipt(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IPT, "task", *args], env=_env(server), capture_output=True, text=True, timeout=300)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["input,output"] + [f'"{i}",{o}' for i, o in rows]  # quoted: one input holds a comma
    path.write_text("\n".join(lines) + "\n")
    return path


def _created_id(alice: httpx.Client, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in alice.get("/tasks", params={"limit": 100}).json()["tasks"]:
            if t["name"] == name:
                return t["id"]
        time.sleep(0.2)
    raise AssertionError(f"no task {name} was created")


def test_create_follow_predict_list_show_delete(server: str, env_settings: Settings, tmp_path: Path) -> None:
    data = _write_csv(tmp_path / "cli reviews.csv", ROWS)
    follow = subprocess.Popen([IPT, "task", "create", str(data)], env=_env(server), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        with client_for(server, "key-alice") as alice:
            task_id = _created_id(alice, "cli_reviews")  # the name comes from the file's, made safe
            run_worker_burst(env_settings)
        out, _ = follow.communicate(timeout=300)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 0, out
    assert f"task {task_id} (cli_reviews, classification, 8 examples): queued" in out
    assert re.search(rf"task {task_id} succeeded: dev score \d\.\d{{3}} \(bare model \d\.\d{{3}}\)", out), out

    answer = ipt(server, "predict", task_id, "the movie was superb", "a dull, bad film", "--json")
    predictions = json.loads(answer.stdout)["predictions"]
    assert answer.returncode == 0 and len(predictions) == 2
    assert all(p["output"] in ("positive", "negative") and set(p["probabilities"]) == {"positive", "negative"}
               for p in predictions)
    shown = ipt(server, "predict", task_id, "the movie was superb").stdout
    assert re.match(r"the movie was superb\s+-> (positive|negative)\s+\((positive|negative) \d\.\d\d  "
                    r"(positive|negative) \d\.\d\d\)", shown), shown

    listed = ipt(server, "list")
    assert task_id in listed.stdout and "succeeded" in listed.stdout
    assert json.loads(ipt(server, "show", task_id).stdout)["status"] == "succeeded"
    assert ipt(server, "delete", task_id).returncode == 0
    gone = ipt(server, "show", task_id)
    assert gone.returncode == 2 and "404" in gone.stderr and not gone.stdout  # errors on stderr


def test_bad_files_refusals_and_a_cancelled_task(server: str, env_settings: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken.csv"
    broken.write_text("input,output\nthe movie was great,positive\njust an input\n")
    r = ipt(server, "create", str(broken))
    assert r.returncode == 2 and "broken.csv:3" in r.stdout + r.stderr  # the line, before anything is sent

    too_long = _write_csv(tmp_path / "long.csv", [*ROWS[:3], ("x" * 5000, "negative")])
    r = ipt(server, "create", str(too_long))
    assert r.returncode == 2 and "413" in r.stderr and "exceeds the limit" in r.stderr  # the service's message

    other = ipt(server, "show", "0" * 32)
    assert other.returncode == 2 and "404" in other.stderr

    # a task cancelled while followed: on an app of its own whose queue no worker reads, so it stays queued
    data = _write_csv(tmp_path / "to_cancel.csv", ROWS)
    with running_app(env_settings.model_copy(update={"queue_name": "ipt-cli-cancel"})) as base, \
            client_for(base, "key-alice") as alice:
        follow = subprocess.Popen([IPT, "task", "create", str(data)], env=_env(base), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            first = follow.stdout.readline() if follow.stdout else ""  # the CLI's own line names its task
            match = re.match(r"task ([0-9a-f]{32}) \(to_cancel, ", first)
            assert match, first
            task_id = match.group(1)
            r = alice.post(f"/tasks/{task_id}/cancel")
            assert r.status_code == 200, (r.text, alice.get(f"/tasks/{task_id}").text)
            out, _ = follow.communicate(timeout=120)
            out = first + out
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.communicate()
        assert follow.returncode == 1 and f"task {task_id} cancelled" in out
        alice.delete(f"/tasks/{task_id}")
