"""GET /tasks/{id}/events: what happened to a task, as a JSON page or a live Server-Sent Events stream.

JSON (the default): `{"task_id", "events": [...], "last_id"}`, oldest first, `after` an event id (exclusive)
and `limit`; page on with `after=last_id`. SSE (`Accept: text/event-stream`): every event so far, then each new
one as it happens, `id:` the event id, `event:` its type, `data:` the event as JSON; the stream ends after the
task's final event (succeeded, failed, cancelled) or when the task is deleted (an `event: deleted`), and sends a
comment every KEEPALIVE_S so that proxies keep it open. A client that reconnects sends `Last-Event-ID` (browsers'
EventSource do it themselves) and gets only what it missed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service import task_events
from service.deps import StoreDep, TenantDep
from service.errors import error_responses
from service.task_store import TaskStore

router = APIRouter(prefix="/tasks", tags=["events"])

KEEPALIVE_S = 15.0
BLOCK_MS = 1000  # one wait for new events holds a Redis connection (in a worker thread) at most this long
TaskId = PathParam(pattern=r"^[0-9a-f]{32}$", description="a task id as returned by POST /tasks")


def _start(after: str | None, last_event_id: str | None) -> str:
    try:
        return task_events.check_event_id(last_event_id or after or "0")
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


@router.get("/{task_id}/events", responses={**error_responses(401, 404, 422, 503), 200: {
    "description": "a page of events (JSON), or with `Accept: text/event-stream` a live stream",
    "content": {"application/json": {}, "text/event-stream": {}}}})
async def task_events_route(request: Request, store: StoreDep, tenant: TenantDep, task_id: str = TaskId,
                            after: str | None = Query(None, description="an event id: events after it only"),
                            limit: int = Query(100, ge=1, le=500),
                            last_event_id: str | None = Header(None, description="SSE reconnection: the last id seen")
                            ) -> Any:
    if await run_in_threadpool(store.get, task_id, tenant) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id}")
    start = _start(after, last_event_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(_stream(request, store, tenant, task_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events = await run_in_threadpool(task_events.after, store.r, task_id, start, limit)
    return {"task_id": task_id, "events": [e.to_dict() for e in events],
            "last_id": events[-1].id if events else start}


async def _stream(request: Request, store: TaskStore, tenant: str, task_id: str, last_id: str) -> AsyncIterator[str]:
    quiet_since = time.monotonic()
    while not await request.is_disconnected():
        events = await run_in_threadpool(task_events.wait_after, store.r, task_id, last_id, BLOCK_MS)
        for event in events:
            yield event.sse()
            last_id = event.id
            if event.type in task_events.FINAL_EVENTS:
                return
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            if await run_in_threadpool(store.get, task_id, tenant) is None:
                yield "event: deleted\ndata: {}\n\n"
                return
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
