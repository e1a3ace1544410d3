"""Task events: the JSON page and the Server-Sent Events stream of what happened to a task, over HTTP against
the real app with a real Redis and a real worker; resuming with Last-Event-ID; tenants; bounds; deletion."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from service import task_events
from service.redis_connection import connect
from service.settings import Settings
from service.task_store import TaskStore
from tests.service.conftest import run_worker_burst
from tests.service.test_api import create


def _read_sse(client: httpx.Client, path: str, headers: dict[str, str] | None = None) -> list[dict]:
    """Every message of a stream until the server ends it: [{"id", "event", "data"}]."""
    messages, current = [], {}
    with client.stream("GET", path, headers={"Accept": "text/event-stream", **(headers or {})}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if current:
                    messages.append(current)
                current = {}
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return messages


def test_a_task_tells_its_story(alice: httpx.Client, bob: httpx.Client, env_settings: Settings) -> None:
    task = create(alice)
    path = f"/tasks/{task['id']}/events"
    early = alice.get(path).json()
    assert [e["type"] for e in early["events"]] == ["created", "queued"]
    assert early["events"][0]["name"] == "sentiment" and early["events"][0]["kind"] == "classification"
    assert bob.get(path).status_code == 404  # another tenant sees nothing of it

    # a live stream opened before training: it gets the rest as it happens and ends with the final event
    streamed: list[dict] = []
    reader = threading.Thread(target=lambda: streamed.extend(_read_sse(alice, path)))
    reader.start()
    run_worker_burst(env_settings)
    reader.join(timeout=120)
    assert not reader.is_alive()
    types = [m["event"] for m in streamed]
    assert types[:3] == ["created", "queued", "started"] and types[-1] == "succeeded"
    evaluations = [m["data"] for m in streamed if m["event"] == "evaluation"]
    assert evaluations and [e["step"] for e in evaluations] == sorted(e["step"] for e in evaluations)
    assert all({"dev", "train_loss", "dev_loss"} <= set(e) for e in evaluations)
    done = alice.get(f"/tasks/{task['id']}").json()
    assert streamed[-1]["data"]["dev_score"] == pytest.approx(done["dev_score"])
    assert [m["id"] for m in streamed] == [e["id"] for e in alice.get(path).json()["events"]]

    # resuming: Last-Event-ID (or ?after=) gives only what came after it; paging with limit
    middle = streamed[2]["id"]
    resumed = _read_sse(alice, path, {"Last-Event-ID": middle})
    assert [m["id"] for m in resumed] == [m["id"] for m in streamed[3:]]
    page = alice.get(path, params={"after": middle, "limit": 1}).json()
    assert [e["id"] for e in page["events"]] == [streamed[3]["id"]] and page["last_id"] == streamed[3]["id"]
    assert alice.get(path, params={"after": "not-an-id"}).status_code == 422

    # deleted with the task
    store = TaskStore(connect(env_settings))
    assert store.r.exists(task_events.events_key(task["id"]))
    assert alice.delete(f"/tasks/{task['id']}").status_code == 204
    assert not store.r.exists(task_events.events_key(task["id"]))
    assert alice.get(path).status_code == 404


def test_cancel_and_failure_are_events_and_events_are_bounded(alice: httpx.Client, env_settings: Settings) -> None:
    store = TaskStore(connect(env_settings))
    task = create(alice)
    assert alice.post(f"/tasks/{task['id']}/cancel").status_code == 200
    stream = _read_sse(alice, f"/tasks/{task['id']}/events")  # ends at once: the task is final
    assert [m["event"] for m in stream] == ["created", "queued", "cancelled"]

    record, _ = store.create("tenant-x", "t", "classification", ["a", "b"], 4, "art")
    store.mark_running(record.id, 10)
    for step in range(task_events.MAX_EVENTS + 200):
        store.set_progress(record.id, step, 0.5, {"step": step, "dev": 0.5})
    store.mark_failed(record.id, "invalid_input", "row 3 is empty")
    kept = store.r.xlen(task_events.events_key(record.id))
    assert task_events.MAX_EVENTS <= kept < task_events.MAX_EVENTS + 200  # trimmed (approximately)
    last = task_events.after(store.r, record.id, "0-0", 1000)[-1]
    assert last.type == "failed" and last.data == {"code": "invalid_input", "message": "row 3 is empty"}
    store.delete(record.id, "tenant-x")


def test_an_imported_task_ends_its_story_at_once(env_settings: Settings) -> None:
    """A task whose z came from an imported prompt is succeeded without IST: its stream ends with that event."""
    import numpy as np

    store = TaskStore(connect(env_settings))
    record, _ = store.create("tenant-y", "imported", "classification", ["a", "b"], 4, "art")
    assert store.mark_imported(record.id, np.ones(4, dtype=np.float32), dev_score=0.75)
    events = task_events.after(store.r, record.id)
    assert [e.type for e in events] == ["created", "queued", "succeeded"]
    assert events[-1].data == {"imported": True, "dev_score": 0.75, "steps": 0}
    assert not store.mark_imported(record.id, np.ones(4, dtype=np.float32))  # only a queued task
    store.delete(record.id, "tenant-y")
