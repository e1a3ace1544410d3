"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from rq import Queue
from rq.job import Job

from service import metrics
from service.task_store import TaskStore
from service.worker_liveness import live_workers

router = APIRouter(tags=["health"])

OLDEST_JOBS_LOOKED_AT = 50
"""How many jobs from the head of the queue the backlog age looks at (RQ pops from the head)."""


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
        response.headers["Retry-After"] = "5"
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
        queue = Queue(state.settings.queue_name, connection=state.store.r)
        metrics.QUEUE_LENGTH.set(queue.count)
        metrics.QUEUE_OLDEST_AGE.set(oldest_waiting_job_age_seconds(queue, state.store))
        for name, count in state.store.count_by_status().items():
            metrics.TASKS_BY_STATUS.labels(name).set(count)
        metrics.LIVE_WORKERS.set(live_workers(state.store.r, state.settings.queue_name))
    except Exception:  # metrics must still answer while Redis is down
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def oldest_waiting_job_age_seconds(queue: Queue, store: TaskStore) -> float:
    """Seconds since the oldest job still waiting in the queue was enqueued; 0 when none waits. A queued job
    whose task another job already trains in its batch (claimed) is not waiting and is left out."""
    jobs = Job.fetch_many(queue.get_job_ids(0, OLDEST_JOBS_LOOKED_AT - 1), connection=queue.connection)
    enqueued = [job.enqueued_at for job in jobs
                if job is not None and job.enqueued_at is not None and store.claimed_by(job.id) in (None, job.id)]
    if not enqueued:
        return 0.0
    return max(0.0, (datetime.now(UTC) - min(enqueued)).total_seconds())
