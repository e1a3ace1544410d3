"""What happened to a task, in order: created, queued, started, each dev evaluation, and how it ended.

Events live in a Redis stream beside the task (`ipt:events:{id}`), written in the same transaction as the
state change they report (`TaskStore` passes its pipeline), bounded to the last MAX_EVENTS, kept for
KEEP_AFTER_END_S after the task ends and deleted with the task. A stream entry id ("1733000000000-0") is the
event id: a client that reconnects sends the last one it saw (Server-Sent Events' Last-Event-ID) and reads on
from there.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import redis

MAX_EVENTS = 500
"""Events kept per task (a task makes one per dev evaluation: at most a few hundred)."""
KEEP_AFTER_END_S = 7 * 24 * 3600
"""How long a task's events outlive its end (~2 KB per trained task; the task itself stays)."""
FINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled"})
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def events_key(task_id: str) -> str:
    return f"ipt:events:{task_id}"  # not under ipt:task:* (the status recount scans that for task hashes)


@dataclass(frozen=True)
class TaskEvent:
    id: str  # the stream entry id: orders events and resumes a stream
    type: str  # created | queued | started | evaluation | succeeded | failed | cancelled
    at: float  # Unix seconds
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "at": self.at, **self.data}

    def sse(self) -> str:
        """The event as one Server-Sent Events message."""
        return f"id: {self.id}\nevent: {self.type}\ndata: {json.dumps(self.to_dict(), separators=(',', ':'))}\n\n"


def record(pipe: Any, task_id: str, event_type: str, **data: Any) -> None:
    """Append an event (in the caller's pipeline or transaction, so it lands with the change it reports)."""
    fields = {"type": event_type, "at": f"{time.time():.3f}",
              "data": json.dumps({k: v for k, v in data.items() if v is not None}, separators=(",", ":"))}
    pipe.xadd(events_key(task_id), fields, maxlen=MAX_EVENTS, approximate=True)
    if event_type in FINAL_EVENTS:
        pipe.expire(events_key(task_id), KEEP_AFTER_END_S)


def _parse(entry_id: bytes, fields: dict[bytes, bytes]) -> TaskEvent:
    return TaskEvent(entry_id.decode(), fields[b"type"].decode(), float(fields[b"at"]),
                     json.loads(fields.get(b"data", b"{}")))


def check_event_id(value: str) -> str:
    """An event id as clients send it back ('0' or '0-0': from the start); ValueError if malformed."""
    if value in ("0", ""):
        return "0-0"
    if not EVENT_ID.match(value):
        raise ValueError(f"not an event id: {value[:40]!r} (expected the id of an event, like '1733000000000-0')")
    return value


def after(client: redis.Redis, task_id: str, last_id: str = "0-0", limit: int = 100) -> list[TaskEvent]:
    """Up to `limit` events after `last_id` (exclusive), oldest first."""
    entries = client.xrange(events_key(task_id), min=f"({last_id}" if last_id != "0-0" else "-", count=limit)
    return [_parse(i, f) for i, f in entries]


def wait_after(client: redis.Redis, task_id: str, last_id: str, block_ms: int, limit: int = 100) -> list[TaskEvent]:
    """Events after `last_id`, waiting up to `block_ms` for the first one (empty when none came)."""
    found = client.xread({events_key(task_id): last_id}, count=limit, block=block_ms)
    return [_parse(i, f) for _, entries in found for i, f in entries]
