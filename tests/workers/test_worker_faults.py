"""A worker killed with SIGKILL in the middle of an IST job: once RQ sees the job abandoned, the job is
retried by another worker and the task still ends `succeeded`."""

from __future__ import annotations

import signal
import time

import httpx
from rq import Queue
from rq.registry import StartedJobRegistry

from service.redis_connection import connect
from service.settings import Settings
from tests.service.conftest import kill_process_group, run_worker_burst, start_worker_process
from tests.service.test_api import task_body


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_killed_worker_job_is_retried_and_succeeds(alice: httpx.Client, env_settings: Settings) -> None:
    body = task_body(name="survivor", training={"optimizer": "adamw", "max_steps": 400, "eval_every": 1,
                                                "batch_size": 2, "patience": 100})
    tid = alice.post("/tasks", json=body).json()["id"]
    worker = start_worker_process()
    try:
        _wait_for(lambda: alice.get(f"/tasks/{tid}").json()["progress"]["step"] >= 2, 120, "the job to be running")
    finally:
        kill_process_group(worker)  # the worker and the scheduler process it forked
        worker.wait(timeout=30)
    assert alice.get(f"/tasks/{tid}").json()["status"] == "running"  # mid-job, its worker gone

    # RQ declares a started job abandoned when its worker's heartbeat lapses; jump past that point in time
    queue = Queue(env_settings.queue_name, connection=connect(env_settings))
    registry = StartedJobRegistry(queue=queue)
    registry.cleanup(timestamp=time.time() + 10_000)
    assert tid in queue.job_ids, "the abandoned job was not requeued for a retry"

    run_worker_burst(env_settings)
    task = alice.get(f"/tasks/{tid}").json()
    assert task["status"] == "succeeded", task
    r = alice.post(f"/tasks/{tid}/predict", json={"inputs": ["the movie was great"]})
    assert r.status_code == 200


def test_sigterm_lets_the_running_job_finish(alice: httpx.Client, env_settings: Settings) -> None:
    """Warm shutdown: SIGTERM during a job; the job completes, then the worker exits cleanly."""
    body = task_body(name="warm", training={"optimizer": "adamw", "max_steps": 60, "eval_every": 1, "batch_size": 2,
                                            "patience": 100})
    tid = alice.post("/tasks", json=body).json()["id"]
    worker = start_worker_process()
    try:
        _wait_for(lambda: alice.get(f"/tasks/{tid}").json()["progress"]["step"] >= 1, 120, "the job to be running")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0
    finally:
        kill_process_group(worker)  # whatever is left of it (its scheduler process)
    assert alice.get(f"/tasks/{tid}").json()["status"] == "succeeded"


def test_deleting_a_job_that_ends_meanwhile_is_a_no_op(env_settings: Settings) -> None:
    """A cancel races the worker: the job can end (and RQ remove it) between our fetch and our status read.
    Its status field gone while the hash is still there is that moment; it once made POST /cancel a 500."""
    from service.ist_jobs import delete_queued_job

    r = connect(env_settings)
    job = Queue("ipt-race", connection=r).enqueue("builtins.print", "x", job_id="race-job")
    r.hdel(job.key, "status")
    delete_queued_job(r, job.id)  # must not raise
    r.delete(job.key)
    delete_queued_job(r, job.id)  # and nothing to do once it is gone
    Queue("ipt-race", connection=r).empty()
