"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from rq import Queue

from service import metrics

router = APIRouter(tags=["health"])


@router.get("/livez")
def livez() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, response: Response) -> dict[str, object]:
    """Ready when the model and Proj_b are loaded and Redis answers; 503 otherwise."""
    state = request.app.state
    checks: dict[str, object] = {"model": state.runtime is not None}
    try:
        checks["redis"] = bool(state.store.r.ping())
    except Exception as exc:  # any connection error means not ready
        checks["redis"] = False
        checks["redis_error"] = type(exc).__name__
    ready = bool(checks["model"]) and bool(checks["redis"])
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "5"
    return {"status": "ready" if ready else "not ready", **checks}


@router.get("/metrics")
def prometheus_metrics(request: Request) -> Response:
    state = request.app.state
    try:
        metrics.QUEUE_LENGTH.set(Queue(state.settings.queue_name, connection=state.store.r).count)
        for name, count in state.store.count_by_status().items():
            metrics.TASKS_BY_STATUS.labels(name).set(count)
    except Exception:  # metrics must still answer while Redis is down
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
