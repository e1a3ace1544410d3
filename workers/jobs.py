"""The IST job: learn one task's vector z from the examples carried in the job, and store only z.

The examples live in the job payload only; RQ deletes the job (and so the examples) when it ends
(result_ttl=0, short failure_ttl). A task cancelled or deleted while its job runs is noticed at the next
dev evaluation and stops; its vector is never written.

A job that can never succeed is not retried: a task whose payload is invalid (the engine refuses it, or a text
UTF-8 cannot encode) is marked failed before training, and an error that the same input would raise again
(INPUT_ERRORS) marks the task failed instead of raising. In a batch of several tasks such an error sends each
task through on its own, so that one bad task fails only itself. Only what may pass on another attempt (a
worker that died, a timeout, Redis away) raises and is retried.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from rq import get_current_job
from rq.job import Job

from ipt_engine.errors import IPTError
from ipt_engine.evaluation import evaluate
from ipt_engine.ist_optimizers import ISTOptimizer, start_candidates, tune
from ipt_engine.tasks import Task
from ipt_engine.training import STOPPED_BY_REQUEST, HistoryEntry
from service import ist_jobs, metrics
from service.core_sharing import share_cores
from service.heap import release_free_memory
from service.ist_jobs import ISTJob, delete_queued_job
from service.redis_connection import connect
from service.runtime import load_runtime
from service.safe_text import unencodable_at
from service.task_store import TaskStatus, TaskStore
from workers.process_settings import process_settings

log = logging.getLogger(__name__)

INPUT_ERRORS = (UnicodeError, ValueError, TypeError)
"""Errors that training the same input raises every time (a tokenizer refusing a text, a shape it cannot
take): the task fails at once, without retries."""


def train_task(task_id: str, task: dict[str, Any], training: dict[str, Any],
               start_z: list[float] | None = None) -> dict[str, Any]:
    """RQ entry point (service/ist_jobs.py: TRAIN_FUNCTION; the arguments are ISTJob.args()). `task` is
    Task.to_dict() (train and dev examples); `training` holds IST settings; `start_z`, when given, is where
    IST starts (an imported prompt's z)."""
    start = time.perf_counter()
    outcome = "error"
    try:
        result = _train_task(task_id, task, training, start_z)
        outcome = str(result.get("status", "skipped"))
        return result
    finally:
        metrics.IST_JOBS.labels(outcome).inc()
        metrics.IST_DURATION.observe(time.perf_counter() - start)
        release_free_memory()  # the job's activations and gradients, which glibc would keep resident


def on_job_failure(job: Job, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback (also for jobs whose worker died): once no retry is left, the task is marked
    failed instead of staying `running` for ever."""
    if job.retries_left:
        return
    store = TaskStore(connection)
    message = f"training failed after retries ({getattr(exc_type, '__name__', 'error')}); create the task again"
    for task_id in [job.id, *store.claims(job.id)]:
        store.mark_failed(task_id, "job_failed", message)


def _train_task(task_id: str, task: dict[str, Any], training: dict[str, Any],
                start_z: list[float] | None = None) -> dict[str, Any]:
    settings = process_settings()
    job = get_current_job()
    store = TaskStore(job.connection if job is not None else connect(settings), vector_dtype=settings.vector_dtype)
    record = store.get(task_id)
    if record is None or record.status.is_final:
        log.info("task %s is gone or final (%s); nothing to do", task_id, record and record.status)
        return {"task_id": task_id, "status": "skipped"}
    claimer = store.claimed_by(task_id)
    if claimer and claimer != task_id and ist_jobs.is_running(store.r, claimer):
        log.info("task %s is being trained in job %s's batch; nothing to do", task_id, claimer)
        return {"task_id": task_id, "status": "skipped"}
    # settings the engine does not know or refuses raise (InvalidTrainingSettings), never dropped: the job
    # fails, and once its retries are used up on_job_failure marks the task failed
    own = ISTJob(task_id, task, ist_jobs.ist_settings(training), tuple(start_z) if start_z else None)
    runtime = load_runtime(settings)
    config = own.training
    batch: list[tuple[str, Task]] = []
    for tid, payload in [(task_id, task), *_claim_peers(store, own, settings.worker_batch_tasks - 1)]:
        try:
            parsed = Task.from_dict(payload)
        except IPTError as exc:
            store.mark_failed(tid, "invalid_task", str(exc))
            continue
        problem = unencodable_text(parsed)
        if problem is not None:
            store.mark_failed(tid, "invalid_task", problem)
            continue
        batch.append((tid, parsed))
    if not batch:
        return {"task_id": task_id, "status": "failed"}
    batch = [(tid, t) for tid, t in batch if store.mark_running(tid, config.total_steps)]
    if not batch:  # cancelled meanwhile
        return {"task_id": task_id, "status": "skipped"}
    ids = [tid for tid, _ in batch]
    log.info("IST (%s) of %d task(s) %s in one run, process %d", config.optimizer, len(batch), ids, os.getpid())

    def on_evaluate(step: int, entries: dict[int, HistoryEntry]) -> list[int]:
        share_cores(store.r, settings)
        stop = []
        for index, entry in entries.items():
            current = store.get(ids[index])
            if current is None or current.status is not TaskStatus.RUNNING:
                stop.append(index)  # cancelled or deleted: stop this task, the others go on
            else:
                store.set_progress(ids[index], step, entry.get("dev"), entry)
        return stop

    def train(indices: list[int]) -> list[Any]:
        tasks = [batch[i][1] for i in indices]
        # what learning gains is shown against the bare model: its dev score, measured once per task
        for i, score in zip(indices, evaluate(runtime.backbone, tasks, None, "dev"), strict=True):
            store.set_bare_dev_score(ids[i], score)
        starts = None
        if own.start_z is not None:  # the job trains alone (ISTJob.batches_with): from exactly its start
            starts = torch.tensor([own.start_z], dtype=torch.float32)
        elif runtime.known_vectors is not None and config.optimizer is ISTOptimizer.GAUSS_NEWTON:
            starts = start_candidates(runtime.subspace.config.d_intrinsic, runtime.known_vectors,
                                      proj_b=runtime.subspace.proj_b)

        def on_evaluate_of(step: int, entries: dict[int, HistoryEntry]) -> list[int]:
            stop = on_evaluate(step, {indices[j]: entry for j, entry in entries.items()})
            return [indices.index(i) for i in stop]

        return list(tune(runtime.backbone, tasks, runtime.subspace.proj_b, config, start_candidates=starts,
                         on_evaluate=on_evaluate_of))

    share_cores(store.r, settings)
    results: list[Any] = []
    try:
        results = train(list(range(len(batch))))
    except IPTError as exc:
        for tid in ids:
            store.mark_failed(tid, type(exc).__name__, str(exc))
        return {"task_id": task_id, "status": "failed"}
    except INPUT_ERRORS as exc:
        if len(ids) == 1:
            log.warning("IST of task %s raised %s: the task fails, without retries", task_id, type(exc).__name__)
            store.mark_failed(task_id, "invalid_input", _input_error_message(exc))
            return {"task_id": task_id, "status": "failed"}
        log.warning("IST of %d tasks raised %s: each is tried on its own", len(ids), type(exc).__name__)
        for i, tid in enumerate(ids):
            try:
                results += train([i])
            except (IPTError, *INPUT_ERRORS) as own:
                store.mark_failed(tid, "invalid_input", _input_error_message(own))
                results.append(None)
    outcome = {}
    for tid, result in zip(ids, results, strict=True):
        if result is None:
            outcome[tid] = "failed"
        elif result.error == STOPPED_BY_REQUEST:
            outcome[tid] = "stopped"
        elif result.error is not None:
            store.mark_failed(tid, "non_finite_loss", result.error)
            outcome[tid] = "failed"
        else:
            stored = store.mark_succeeded(tid, result.z.numpy(), result.dev_score, result.steps)
            outcome[tid] = "succeeded" if stored else "discarded"
        if tid != task_id:
            delete_queued_job(store.r, tid)  # a claimed peer's own job (and its examples) is no longer needed
    return {"task_id": task_id, "status": outcome.get(task_id, "skipped"), "batch": outcome}


def _input_error_message(exc: BaseException) -> str:
    return f"training cannot use this task's examples ({type(exc).__name__}: {str(exc)[:300]}); create it again"


def unencodable_text(task: Task) -> str | None:
    """Why a task cannot be trained because a text of it is not valid Unicode (a lone surrogate), or None."""
    texts = [("name", task.name), *(("label", label) for label in task.labels or ())]
    for split, examples in (("train", task.train), ("dev", task.dev)):
        for n, e in enumerate(examples):
            texts += [(f"{split} example {n}", t) for t in (e.input, e.output, *(e.options or ()))]
    for where, text in texts:
        at = unencodable_at(text)
        if at is not None:
            return (f"the {where} holds a lone UTF-16 surrogate (U+{ord(text[at]):04X}) at character {at}; "
                    "create the task again with valid Unicode text")
    return None


def _claim_peers(store: TaskStore, own: ISTJob, limit: int) -> list[tuple[str, dict[str, Any]]]:
    """Other queued tasks that may train in this job's batch (ISTJob.batches_with: the same training settings,
    distinct task names).

    A peer is claimed by moving its task from queued to running (atomically, so two workers never claim
    the same task) and is recorded in this job's claims. Its own job stays queued until the batch ends
    (then it is deleted); if it runs earlier it sees the claim of a running job and does nothing. If this
    worker dies, the retry of this job takes its claimed peers again; when no retry is left, the failure
    callback marks them failed."""
    job = get_current_job()
    if job is None or limit <= 0:
        return []
    batch = [own]
    for peer_id in store.claims(own.task_id):  # claimed by an earlier attempt of this job that died
        peer = ist_jobs.fetch(job.connection, peer_id)
        if peer is not None and all(member.batches_with(peer) for member in batch):
            batch.append(peer)
    for peer in ist_jobs.queued(job.connection, job.origin, 4 * limit + 10):
        if len(batch) > limit:
            break
        if all(member.batches_with(peer) for member in batch) and store.claim(peer.task_id, own.task_id):
            batch.append(peer)
    return [(peer.task_id, peer.task) for peer in batch[1:]]
