"""IST jobs that can never succeed fail at once, without retries, and fail only their own task: jobs enqueued
as the API enqueues them (a real Redis, a real RQ queue, an in-process SimpleWorker), with payloads the API
would now refuse (written before it validated them, or by another client of the queue)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from rq import Callback, Queue, Retry
from rq.registry import FailedJobRegistry

from service.redis_connection import connect
from service.schemas import TrainingSettings
from service.settings import Settings
from service.task_store import TaskStatus, TaskStore
from tests.service.conftest import run_worker_burst
from workers import jobs

WORDS = ["great", "awful", "lovely", "bad", "fine", "poor", "nice", "sad"]


def _payload(name: str, labels: list[str] | None = None, word: str = "") -> dict[str, Any]:
    train = [{"input": f"the movie was {w}{word}", "output": ["positive", "negative"][i % 2]}
             for i, w in enumerate(WORDS)]
    return {"name": name, "kind": "classification", "labels": labels or ["negative", "positive"], "train": train,
            "dev": train[:4], "test": []}


def _enqueue(settings: Settings, store: TaskStore, payload: dict[str, Any]) -> str:
    """As POST /tasks does: the record, then the job (retries and the failure callback included)."""
    record, _ = store.create("workers-test", payload["name"], "classification", payload["labels"], 4, "art")
    training = TrainingSettings(max_iterations=2, patience=2).model_dump()
    Queue(settings.queue_name, connection=store.r).enqueue(
        "workers.jobs.train_task", record.id, payload, training, job_id=record.id, result_ttl=0, failure_ttl=600,
        on_failure=Callback("workers.jobs.on_job_failure"), retry=Retry(max=2))
    return record.id


@pytest.fixture()
def queue_settings(env_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    queue = f"ipt-jobs-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("IPT_QUEUE_NAME", queue)  # the job reads its settings from the environment
    return env_settings.model_copy(update={"queue_name": queue})


def _no_retry_left_behind(settings: Settings, store: TaskStore) -> None:
    queue = Queue(settings.queue_name, connection=store.r)
    assert queue.count == 0, "a job was requeued for a retry"
    assert FailedJobRegistry(queue=queue).count == 0, "a job raised (and would have been retried)"


def test_a_task_with_unencodable_text_fails_at_once_and_alone(queue_settings: Settings) -> None:
    """The issue's payload (an unused label with a lone surrogate) batched with a good task: the poisoned task
    is failed as invalid before training, without retries; the good one trains."""
    store = TaskStore(connect(queue_settings))
    poisoned = _enqueue(queue_settings, store, _payload("poisoned", ["negative", "positive", "c\ud800"]))
    poisoned_input = _enqueue(queue_settings, store, _payload("poisoned_input", word="\udfff"))
    good = _enqueue(queue_settings, store, _payload("good"))
    run_worker_burst(queue_settings)
    for tid in (poisoned, poisoned_input):
        record = store.get(tid)
        assert record is not None and record.status is TaskStatus.FAILED
        assert record.error is not None and record.error["code"] == "invalid_task", record.error
        assert "lone UTF-16 surrogate" in record.error["message"]
    assert store.get(good).status is TaskStatus.SUCCEEDED  # type: ignore[union-attr]
    _no_retry_left_behind(queue_settings, store)


def test_an_input_error_in_a_batch_fails_only_its_task_without_retries(queue_settings: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """An error the same input raises every time (here: the engine raising ValueError whenever a task named
    'breaks' is in the batch) while two tasks train in one batch: each is tried alone, the good one succeeds,
    the other fails as invalid_input, and the job is not retried."""
    real_tune = jobs.tune

    def tune(backbone, tasks, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(t.name == "breaks" for t in tasks):
            raise ValueError("this input can never be tokenized")
        return real_tune(backbone, tasks, *args, **kwargs)

    monkeypatch.setattr(jobs, "tune", tune)
    store = TaskStore(connect(queue_settings))
    breaks = _enqueue(queue_settings, store, _payload("breaks"))
    good = _enqueue(queue_settings, store, _payload("fine_task"))
    with caplog.at_level(logging.WARNING, logger="workers.jobs"):
        run_worker_burst(queue_settings)
    assert "IST of 2 tasks raised ValueError: each is tried on its own" in caplog.text  # they were batched
    failed = store.get(breaks)
    assert failed is not None and failed.status is TaskStatus.FAILED and failed.error is not None
    assert failed.error["code"] == "invalid_input" and "ValueError" in failed.error["message"]
    assert store.get(good).status is TaskStatus.SUCCEEDED  # type: ignore[union-attr]
    _no_retry_left_behind(queue_settings, store)
