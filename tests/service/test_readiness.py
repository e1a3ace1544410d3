"""Readiness means a task can be finished: with no live worker /readyz answers 200 with `degraded: true` and a
reason (documented in the README: an autoscaler may start workers on demand, and predictions still work),
and POST /tasks still queues the task but says it will wait. A real worker process makes both clear; one
killed outright is noticed within its heartbeat TTL. A worker whose metrics port is taken keeps working."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import httpx

from service.settings import Settings
from tests.service.conftest import client_for, kill_process_group, running_app
from tests.service.test_api import task_body

HEARTBEAT_TTL_S = 3.0


def _wait_for(what: str, check: Callable[[], bool], timeout: float, worker: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if worker is not None and worker.poll() is not None:
            raise AssertionError(f"{what}: the worker exited with {worker.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _start_worker(queue: str, metrics_port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "IPT_QUEUE_NAME": queue, "IPT_WORKER_METRICS_PORT": str(metrics_port),
           "IPT_WORKER_METRICS_HOST": "127.0.0.1", "IPT_WORKER_HEARTBEAT_INTERVAL_S": "0.5",
           "IPT_WORKER_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "workers"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def test_readiness_and_creation_say_when_no_worker_is_live(env_settings: Settings) -> None:
    settings = env_settings.model_copy(update={"queue_name": f"ipt-ready-{uuid.uuid4().hex[:8]}"})
    with running_app(settings) as base, client_for(base, "key-alice") as alice:
        ready = alice.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["workers"] == 0 and body["degraded"] is True and body["status"] == "degraded"
        assert "no live worker" in body["reason"]
        created = alice.post("/tasks", json=task_body(name="waits"))
        assert created.status_code == 202 and created.json()["status"] == "queued"
        assert "no live worker" in (created.json()["warning"] or "")
        assert "ipt_live_workers 0.0" in alice.get("/metrics").text

        with socket.socket() as taken:  # the worker's metrics port is in use: it must still work
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            worker = _start_worker(settings.queue_name, taken.getsockname()[1])
            try:
                _wait_for("a live worker", lambda: alice.get("/readyz").json()["workers"] == 1, 180, worker)
                ready = alice.get("/readyz").json()
                assert ready["degraded"] is False and ready["status"] == "ready" and "reason" not in ready
                task_id = created.json()["id"]
                _wait_for("the waiting task to be trained",
                          lambda: alice.get(f"/tasks/{task_id}").json()["status"] == "succeeded", 180, worker)
                again = alice.post("/tasks", json=task_body(name="no_wait"))
                assert again.status_code == 202 and again.json()["warning"] is None
            finally:
                kill_process_group(worker)  # SIGKILL: no goodbye, the heartbeat just stops
                worker.wait(timeout=30)
        _wait_for("the killed worker to count as gone", lambda: alice.get("/readyz").json()["workers"] == 0,
                  HEARTBEAT_TTL_S + 10)
        assert alice.get("/readyz").json()["degraded"] is True
        later = alice.post("/tasks", json=task_body(name="waits_again"))
        assert later.status_code == 202 and "no live worker" in later.json()["warning"]


def test_readyz_is_503_while_the_model_loads(env_settings: Settings) -> None:
    """Degraded is not 'not ready': before the model is loaded the answer is still a 503."""
    from service.app import create_app

    settings = env_settings.model_copy(update={"queue_name": f"ipt-ready-{uuid.uuid4().hex[:8]}"})
    app = create_app(settings)
    with running_app(settings, app) as base:
        runtime, app.state.runtime = app.state.runtime, None
        try:
            r = httpx.get(f"{base}/readyz")
            assert r.status_code == 503 and r.json()["status"] == "not ready" and r.headers["retry-after"]
        finally:
            app.state.runtime = runtime
