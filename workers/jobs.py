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
    try:
        ipt_task = Task.from_dict(task)
    except IPTError as exc:
        store.mark_failed(task_id, "invalid_task", str(exc))
        return {"task_id": task_id, "status": "failed"}
    store.mark_running(task_id, config.max_steps)
    log.info("IST of task %s (%d train, %d dev examples) in process %d", task_id, len(ipt_task.train),
             len(ipt_task.dev), os.getpid())

    def on_evaluate(step: int, scores: dict[int, float]) -> list[int]:
        current = store.get(task_id)
        if current is None or current.status is not TaskStatus.RUNNING:
            return [0]  # cancelled or deleted: stop
        store.set_progress(task_id, step, scores.get(0))
        return []

    try:
        (result,) = intrinsic_subspace_tune(runtime.backbone, [ipt_task], runtime.subspace.proj_b, config,
                                            on_evaluate=on_evaluate)
    except IPTError as exc:
        store.mark_failed(task_id, type(exc).__name__, str(exc))
        return {"task_id": task_id, "status": "failed"}
    if result.error == STOPPED_BY_REQUEST:
        return {"task_id": task_id, "status": "stopped"}
    if result.error is not None:
        store.mark_failed(task_id, "non_finite_loss", result.error)
        return {"task_id": task_id, "status": "failed"}
    stored = store.mark_succeeded(task_id, result.z.numpy(), result.dev_score, result.steps)
    return {"task_id": task_id, "status": "succeeded" if stored else "discarded", "dev_score": result.dev_score}
