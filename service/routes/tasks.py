"""Task routes: create (enqueue IST), read, list, cancel, delete, predict, similar."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import redis
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from ipt_engine.errors import InvalidTaskError
from ipt_engine.ist_optimizers import ISTSettings
from ipt_engine.tasks import Example, Task, TaskKind, infer_kind
from service import ist_jobs
from service.deps import (
    BatcherDep,
    CacheDep,
    RuntimeDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    limit_creates,
    limit_predicts,
)
from service.errors import BUSY_RETRY_AFTER_S, error_responses, retry_after
from service.predictor import predict_task_inputs
from service.rate_limit import RateLimited
from service.routes.health import NO_WORKER
from service.safe_text import clean_text
from service.schemas import (
    ErrorInfo,
    PredictionOut,
    PredictRequest,
    PredictResponse,
    Progress,
    ProgressPoint,
    SimilarResponse,
    SimilarTask,
    TaskCreate,
    TaskList,
    TaskOut,
)
from service.settings import Settings
from service.task_store import IdempotencyKeyReused, TaskRecord, TaskStatus
from service.worker_liveness import live_workers

log = logging.getLogger(__name__)
router = APIRouter(prefix="/tasks", tags=["tasks"])

MAX_OFFSET = 2**31 - 1
"""Largest page offset: Redis ranges take 64-bit integers, a larger offset was a 500 (found by fuzzing)."""

ACTIVE_TASKS_RETRY_AFTER_S = 30
"""Retry-After of a create refused because the tenant has too many queued or running tasks."""


def task_out(r: TaskRecord) -> TaskOut:
    history = [ProgressPoint(step=int(h.get("step") or 0), train_loss=h.get("train_loss"), dev_loss=h.get("dev_loss"),
                             dev_score=h.get("dev"), z_norm=h.get("norm"), seconds=h.get("seconds"))
               for h in r.progress_history]
    # clean_text: a task stored before text was validated must not make its views fail to encode
    return TaskOut(id=r.id, name=clean_text(r.name), kind=r.kind, status=r.status.value,
                   labels=[clean_text(label) for label in r.labels] if r.labels else r.labels,
                   d_intrinsic=r.d_intrinsic, progress=Progress(step=r.progress_step, total=r.progress_total,
                                                                dev_score=r.progress_dev, history=history),
                   dev_score=r.dev_score, bare_dev_score=r.bare_dev_score, note=learning_note(r), steps=r.steps,
                   created_at=r.created_at, started_at=r.started_at, finished_at=r.finished_at,
                   error=ErrorInfo(code=clean_text(str(r.error.get("code", ""))),
                                   message=clean_text(str(r.error.get("message", "")))) if r.error else None)


def learning_note(r: TaskRecord) -> str | None:
    """What a user must know when the learned vector does not beat the bare model on dev (None otherwise)."""
    if r.dev_score is None or r.bare_dev_score is None or r.dev_score > r.bare_dev_score:
        return None
    if r.dev_score >= 1.0:  # both perfect: dev cannot tell whether anything was learned, and nothing is wrong
        return (f"the bare model already scores {r.bare_dev_score:.3f} on dev, as does the learned vector: dev cannot "
                "show what learning added. To measure it, add dev examples the bare model gets wrong")
    relation = "below" if r.dev_score < r.bare_dev_score else "no better than"
    return (f"the learned vector scores {r.dev_score:.3f} on dev, {relation} the bare model's {r.bare_dev_score:.3f}: "
            "the task was not learned. Add examples (16 or more per label), check that the labels are consistent, "
            "or try another optimizer")


def _too_large(message: str) -> HTTPException:
    return HTTPException(413, message)


def _check_limits(body: TaskCreate, s: Settings) -> None:
    examples = body.train + (body.dev or [])
    if len(examples) > s.max_examples_per_task:
        raise _too_large(f"{len(examples)} examples exceed the limit of {s.max_examples_per_task} per task")
    if len(examples) < s.min_examples:
        raise HTTPException(422, f"{len(examples)} example(s) given; a task needs at least {s.min_examples}")
    texts = [t for e in examples for t in (e.input, e.output, *(e.options or []))] + (body.labels or [])
    longest = max(len(t) for t in texts)
    if longest > s.max_text_chars:
        raise _too_large(f"a text of {longest} characters exceeds the limit of {s.max_text_chars} characters")
    n_options = max([len(body.labels or [])] + [len(e.options or []) for e in examples])
    if n_options > s.max_options:
        raise _too_large(f"{n_options} options exceed the limit of {s.max_options} options per task")


def _build_task(body: TaskCreate) -> Task:
    train = [Example(e.input, e.output, tuple(e.options) if e.options else None) for e in body.train]
    dev = [Example(e.input, e.output, tuple(e.options) if e.options else None) for e in body.dev or []]
    kind = TaskKind(body.kind) if body.kind else infer_kind(train + dev)
    # fields another kind would use are refused rather than silently ignored
    if body.labels is not None and kind is not TaskKind.CLASSIFICATION:
        raise HTTPException(422, f"'labels' are for classification tasks; this task is {kind.value}: leave them out"
                                 + (" (give 'options' on each example instead)"
                                    if kind is TaskKind.MULTIPLE_CHOICE else ""))
    with_options = [i for i, e in enumerate(body.train + (body.dev or [])) if e.options is not None]
    if with_options and kind is not TaskKind.MULTIPLE_CHOICE:
        raise HTTPException(422, f"'options' on examples are for multiple-choice tasks; this task is {kind.value} "
                                 f"({len(with_options)} example(s) have options): leave them out, or send "
                                 "kind 'multiple_choice' with options on every example")
    labels = body.labels
    if kind is TaskKind.CLASSIFICATION and not labels:
        labels = sorted({e.output for e in train + dev})
    try:
        return Task(body.name, kind, train, dev, [], tuple(labels) if labels else None).with_dev_split()
    except InvalidTaskError as exc:
        raise HTTPException(422, str(exc)) from None


def training_settings(body: TaskCreate) -> ISTSettings:
    """The engine's IST settings for a create request: every field of the API's training object is one of
    ISTSettings (a field the engine does not take raises here, in every create, instead of being dropped)."""
    return ISTSettings(**body.training.model_dump())


def request_fingerprint(body: TaskCreate) -> str:
    """A digest of what a create request asks for (the validated body, defaults filled in, key order and
    whitespace aside): an Idempotency-Key reused with another fingerprint is a conflict."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _key_reused(key: str, task_id: str) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT,
                         f"Idempotency-Key {key!r} was already used, within the last 24 h, for another request body "
                         f"(task {task_id}); send a new key for a new request, or the same body to get that task")


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=TaskOut,
             responses=error_responses(400, 401, 409, 413, 422, 429, 503))
def create_task(body: TaskCreate, request: Request, response: Response, settings: SettingsDep, store: StoreDep,
                tenant: TenantDep, runtime: RuntimeDep,
                idempotency_key: str | None = Header(None, max_length=200)) -> TaskOut:
    """Validate the examples, store the task as `queued` and enqueue its IST job (examples travel in the job only).

    Only a request that creates a task counts against the tenant's create quota: one refused as invalid, or a
    retry answered with the task its Idempotency-Key created, does not. The same Idempotency-Key with another body is a
    409. With no live worker the task is still queued, and `warning` says it will wait."""
    _check_limits(body, settings)
    task = _build_task(body)
    if task.labels and len(task.labels) > settings.max_options:
        raise _too_large(f"{len(task.labels)} labels exceed the limit of {settings.max_options} options per task")
    fingerprint = request_fingerprint(body)
    if idempotency_key:
        try:
            earlier = store.idempotent_task(tenant, idempotency_key, fingerprint)
        except IdempotencyKeyReused as exc:
            raise _key_reused(idempotency_key, exc.task_id) from None
        if earlier is not None:
            response.headers["Location"] = f"/tasks/{earlier.id}"
            return task_out(earlier)  # a retried request: its task, even when the tenant is at its cap
    cap = settings.max_active_tasks_per_tenant
    if cap and store.active_count(tenant) >= cap:
        raise RateLimited(f"{cap} tasks of this tenant are queued or running, the limit; retry when one has "
                          "finished", ACTIVE_TASKS_RETRY_AFTER_S)
    limit_creates(request, tenant, store)
    d_i = runtime.subspace.config.d_intrinsic
    try:
        record, created = store.create(tenant, task.name, task.kind.value, list(task.labels) if task.labels else None,
                                       d_i, runtime.artifact_id, idempotency_key, fingerprint)
    except IdempotencyKeyReused as exc:  # a concurrent request with the same key and another body won
        raise _key_reused(str(idempotency_key), exc.task_id) from None
    if created:
        job = ist_jobs.ISTJob.create(record.id, task.to_dict(), training_settings(body), settings)
        ist_jobs.enqueue(store.r, settings, job)
    response.headers["Location"] = f"/tasks/{record.id}"
    out = task_out(record)
    if out.status == TaskStatus.QUEUED.value and live_workers(store.r, settings.queue_name) == 0:
        log.warning("task %s queued with no live worker on queue %s", record.id, settings.queue_name)
        out.warning = NO_WORKER
    return out


TaskId = PathParam(pattern=r"^[0-9a-f]{32}$", description="a task id as returned by POST /tasks")


def _owned(store: StoreDep, tenant: str, task_id: str) -> TaskRecord:
    record = store.get(task_id, tenant)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id!r}")
    return record


@router.get("/{task_id}", response_model=TaskOut, responses=error_responses(401, 404, 422, 503))
def get_task(store: StoreDep, tenant: TenantDep, task_id: str = TaskId) -> TaskOut:
    return task_out(_owned(store, tenant, task_id))


@router.get("", response_model=TaskList, responses=error_responses(401, 422, 503))
def list_tasks(store: StoreDep, tenant: TenantDep, settings: SettingsDep, offset: int = Query(0, ge=0, le=MAX_OFFSET),
               limit: int = Query(20, ge=1, le=100)) -> TaskList:
    applied = min(limit, settings.page_size_max)
    records, total = store.list(tenant, offset, applied)
    return TaskList(tasks=[task_out(r) for r in records], total=total, offset=offset, limit=applied)


@router.post("/{task_id}/cancel", response_model=TaskOut, responses=error_responses(401, 404, 409, 422, 503))
def cancel_task(store: StoreDep, tenant: TenantDep, task_id: str = TaskId) -> TaskOut:
    record = _owned(store, tenant, task_id)
    if not store.cancel(task_id):
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id!r} is already {record.status.value}")
    ist_jobs.delete_queued_job(store.r, task_id)  # its examples leave Redis now; a started job stops at its next eval
    return task_out(_owned(store, tenant, task_id))


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(401, 404, 422, 503))
def delete_task(store: StoreDep, tenant: TenantDep, task_id: str = TaskId) -> Response:
    _owned(store, tenant, task_id)
    store.cancel(task_id)  # a running job stops at its next evaluation
    ist_jobs.delete_queued_job(store.r, task_id)
    store.delete(task_id, tenant)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{task_id}/predict", response_model=PredictResponse,
             responses=error_responses(400, 401, 404, 409, 413, 422, 429, 503))
async def predict_task(body: PredictRequest, request: Request, store: StoreDep, tenant: TenantDep,
                       settings: SettingsDep, runtime: RuntimeDep, batcher: BatcherDep,
                       cache: CacheDep, task_id: str = TaskId) -> PredictResponse:
    """Answer each input; option tasks also give the probability of each option. 409 until trained.

    Each input is validated on its own before it joins a batch (text, length, options), and a batch that fails
    is answered row by row (service/predictor.py): one bad input never fails another request's rows."""
    record = await run_in_threadpool(_owned, store, tenant, task_id)
    try:  # a worker on this machine steps down to its share of the cores (service/core_sharing.py)
        request.app.state.busy_marker.mark(store.r)
    except redis.RedisError:
        log.debug("could not mark the API busy", exc_info=True)
    if record.status is not TaskStatus.SUCCEEDED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id!r} is {record.status.value}, not trained yet")
    if len(body.inputs) > settings.max_inputs_per_predict:
        raise _too_large(f"{len(body.inputs)} inputs exceed the limit of {settings.max_inputs_per_predict} per request")
    longest = max(len(t) for t in body.inputs)
    if longest > settings.max_text_chars:
        raise _too_large(f"an input of {longest} characters exceeds the limit of {settings.max_text_chars}")
    if record.artifact_id != runtime.artifact_id:
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id!r} was trained in another subspace "
                            f"({record.artifact_id}); create it again to use the current one")
    kind = TaskKind(record.kind)
    if kind is TaskKind.MULTIPLE_CHOICE:
        if body.options is None or len(body.options) != len(body.inputs):
            raise HTTPException(422, "a multiple-choice task needs 'options': one list of options per input")
        if any(len(o) < 2 or len(o) > settings.max_options for o in body.options):
            raise HTTPException(422, f"each input needs 2 to {settings.max_options} options")
        if any(len(x) > settings.max_text_chars for o in body.options for x in o):
            raise _too_large(f"an option exceeds the limit of {settings.max_text_chars} characters")
    elif body.options is not None:
        raise HTTPException(422, f"'options' are for multiple-choice tasks; this task is {kind.value}")
    await run_in_threadpool(limit_predicts, request, tenant, store)  # only requests that will be answered count
    stored = await run_in_threadpool(store.vector, task_id)
    if stored is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no task {task_id!r}")
    z, version = stored
    try:
        answers = await predict_task_inputs(runtime, cache, batcher, record, z, version, body.inputs, body.options)
    except asyncio.QueueFull:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "too many predictions waiting; retry shortly",
                            headers=retry_after(BUSY_RETRY_AFTER_S)) from None
    return PredictResponse(task_id=task_id, predictions=[
        PredictionOut(output=a.output,
                      probabilities=dict(zip(a.options, a.probabilities, strict=True))
                      if a.options and a.probabilities else None,
                      scores=dict(zip(a.options, a.scores, strict=True)) if a.options and a.scores else None)
        for a in answers])


@router.get("/{task_id}/similar", response_model=SimilarResponse,
            responses=error_responses(401, 404, 409, 422, 503))
def similar_tasks(store: StoreDep, tenant: TenantDep, k: int = Query(5, ge=1, le=50),
                  task_id: str = TaskId) -> SimilarResponse:
    """The caller's k nearest trained tasks by cosine similarity of their intrinsic vectors."""
    _owned(store, tenant, task_id)
    nearest = store.nearest(tenant, task_id, k)
    if nearest is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id!r} has no vector yet")
    return SimilarResponse(task_id=task_id, similar=[SimilarTask(id=n.id, name=clean_text(n.name), cosine=n.cosine)
                                                     for n in nearest])


# export and import (service/routes/portability.py) are routes of this router; that module builds on the helpers
# above, so it is imported last
from service.routes import portability  # noqa: E402, F401
