"""The IST job: learn one task's vector z from the examples carried in the job, and store only z.

The examples live in the job payload only; RQ deletes the job (and so the examples) when it ends
(result_ttl=0, short failure_ttl). A task cancelled or deleted while its job runs is noticed at the next
dev evaluation and stops; its vector is never written.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from rq import Queue, get_current_job
from rq.job import Job

from ipt_engine.errors import IPTError
from ipt_engine.ist import intrinsic_subspace_tune
from ipt_engine.tasks import Task
from ipt_engine.training import STOPPED_BY_REQUEST, TrainConfig
from service import metrics
from service.redis_connection import connect
from service.settings import Settings
from service.task_store import TaskStatus, TaskStore
from workers.runtime import load_runtime

log = logging.getLogger(__name__)


def train_task(task_id: str, task: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point. `task` is Task.to_dict() (train and dev examples); `training` holds IST settings."""
    start = time.perf_counter()
    outcome = "error"
    try:
        result = _train_task(task_id, task, training)
        outcome = str(result.get("status", "skipped"))
        return result
    finally:
        metrics.IST_JOBS.labels(outcome).inc()
        metrics.IST_DURATION.observe(time.perf_counter() - start)


def _train_task(task_id: str, task: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    settings = Settings()
    store = TaskStore(connect(settings))
    record = store.get(task_id)
    if record is None or record.status.is_final:
        log.info("task %s is gone or final (%s); nothing to do", task_id, record and record.status)
        return {"task_id": task_id, "status": "skipped"}
    runtime = load_runtime(settings)
    config = TrainConfig(learning_rate=training["learning_rate"], max_steps=training["max_steps"],
                         batch_size=training["batch_size"], eval_every=training["eval_every"],
                         patience=training["patience"], seed=training.get("seed", 0))
    batch: list[tuple[str, Task]] = []
    for tid, payload in [(task_id, task), *_claim_peers(store, task_id, training, settings.worker_batch_tasks - 1)]:
        try:
            batch.append((tid, Task.from_dict(payload)))
        except IPTError as exc:
            store.mark_failed(tid, "invalid_task", str(exc))
    if not batch:
        return {"task_id": task_id, "status": "failed"}
    for tid, _ in batch:
        store.mark_running(tid, config.max_steps, batch_tasks=len(batch))
    ids = [tid for tid, _ in batch]
    log.info("IST of %d task(s) %s in one batched run, process %d", len(batch), ids, os.getpid())

    def on_evaluate(step: int, scores: dict[int, float]) -> list[int]:
        stop = []
        for index, score in scores.items():
            current = store.get(ids[index])
            if current is None or current.status is not TaskStatus.RUNNING:
                stop.append(index)  # cancelled or deleted: stop this task, the others go on
            else:
                store.set_progress(ids[index], step, score)
        return stop

    try:
        results = intrinsic_subspace_tune(runtime.backbone, [t for _, t in batch], runtime.subspace.proj_b, config,
                                          on_evaluate=on_evaluate)
    except IPTError as exc:
        for tid in ids:
            store.mark_failed(tid, type(exc).__name__, str(exc))
        return {"task_id": task_id, "status": "failed"}
    outcome = {}
    for tid, result in zip(ids, results, strict=True):
        if result.error == STOPPED_BY_REQUEST:
            outcome[tid] = "stopped"
        elif result.error is not None:
            store.mark_failed(tid, "non_finite_loss", result.error)
            outcome[tid] = "failed"
        else:
            stored = store.mark_succeeded(tid, result.z.numpy(), result.dev_score, result.steps)
            outcome[tid] = "succeeded" if stored else "discarded"
    return {"task_id": task_id, "status": outcome[task_id], "batch": outcome}


def _claim_peers(store: TaskStore, task_id: str, training: dict[str, Any], limit: int
                 ) -> list[tuple[str, dict[str, Any]]]:
    """Other queued tasks with the same training settings, to train in this job's batch.

    A peer is claimed by moving its task from queued to running (atomically, so two workers never claim
    the same task). Its own job stays in the queue: when it runs later it finds the task final and does
    nothing; if this worker dies first, that job trains the task itself."""
    job = get_current_job()
    if job is None or limit <= 0:
        return []
    queue = Queue(job.origin, connection=job.connection)
    peers = []
    for peer in Job.fetch_many(queue.get_job_ids(0, 4 * limit + 10), connection=job.connection):
        if peer is None or peer.id == task_id or peer.func_name != job.func_name or len(peer.args) != 3:
            continue
        peer_id, payload, peer_training = peer.args
        if peer_training != training or not store.claim(peer_id):
            continue
        peers.append((peer_id, payload))
        if len(peers) >= limit:
            break
    return peers
