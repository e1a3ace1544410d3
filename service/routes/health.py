"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import ist_jobs, metrics
from service.errors import MODEL_LOADING_RETRY_AFTER_S, retry_after
from service.worker_liveness import live_workers

router = APIRouter(tags=["health"])


@router.get("/livez")
def livez() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


NO_WORKER = ("no live worker: tasks are accepted but stay queued until a worker starts (a worker beats every few "
             "seconds; see IPT_WORKER_HEARTBEAT_TTL_S)")


@router.get("/readyz", responses={503: {"description": "not ready (same body), with Retry-After"}})
def readyz(request: Request, response: Response) -> dict[str, object]:
    """503 until the model and Proj_b are loaded and Redis answers. Once ready, `workers` is the number of live
    workers; with none, the answer is still 200 (predictions work, and an autoscaler may start workers on
    demand) but `degraded` is true and `reason` says that new tasks will wait."""
    state = request.app.state
    checks: dict[str, object] = {"model": state.runtime is not None}
    try:
        checks["redis"] = bool(state.store.r.ping())
        checks["workers"] = live_workers(state.store.r, state.settings.queue_name)
    except Exception as exc:  # any connection error means not ready
        checks["redis"] = False
        checks["redis_error"] = type(exc).__name__
    ready = bool(checks["model"]) and bool(checks["redis"])
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers.update(retry_after(MODEL_LOADING_RETRY_AFTER_S))
        return {"status": "not ready", **checks}
    degraded = checks.get("workers") == 0
    body: dict[str, object] = {"status": "degraded" if degraded else "ready", "degraded": degraded, **checks}
    if degraded:
        body["reason"] = NO_WORKER
    return body


@router.get("/metrics", response_class=PlainTextResponse)  # documents text/plain
def prometheus_metrics(request: Request) -> Response:
    state = request.app.state
    try:
        metrics.QUEUE_LENGTH.set(ist_jobs.queue_length(state.store.r, state.settings.queue_name))
        metrics.QUEUE_OLDEST_AGE.set(ist_jobs.oldest_waiting_age_s(state.store, state.settings.queue_name))
        for name, count in state.store.count_by_status().items():
            metrics.TASKS_BY_STATUS.labels(name).set(count)
        metrics.LIVE_WORKERS.set(live_workers(state.store.r, state.settings.queue_name))
    except Exception:  # metrics must still answer while Redis is down
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
