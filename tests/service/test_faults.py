"""Faults, each against real processes: Redis restarted with AOF on (every task vector survives byte for
byte), Redis down (503 with Retry-After, then the API recovers by itself), the API restarted (tasks still
served). A worker killed with SIGKILL mid-job is covered by test_worker_faults.py
(test_killed_worker_job_is_retried_and_succeeds).

Redis restarts use a redis-server process of the test's own (tests/service/redis_process.py), never the
shared server."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import client_for, run_worker_burst, running_app
from tests.service.redis_process import RedisProcess
from tests.service.test_api import task_body

TASK_ID = "0" * 32


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture()
def own_settings(env_settings: Settings, own_redis: RedisProcess) -> Settings:
    """The test settings on the test's own Redis (the API fails fast while it is down), with the shipped
    quotas on (they live in Redis too)."""
    quotas = {name: Settings.model_fields[name].default for name in
              ("rate_limit_create_per_window", "rate_limit_predict_per_window", "max_active_tasks_per_tenant")}
    return env_settings.model_copy(update={"redis_url": own_redis.url, "queue_name": "ipt-faults",
                                           "redis_connect_timeout_s": 0.5, "redis_socket_timeout_s": 2.0, **quotas})


def _create_trained(client: httpx.Client, settings: Settings, names: list[str]) -> list[str]:
    ids = []
    for name in names:
        r = client.post("/tasks", json=task_body(name=name))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    run_worker_burst(settings)
    for tid in ids:
        assert client.get(f"/tasks/{tid}").json()["status"] == "succeeded"
    return ids


def _vectors(server: RedisProcess) -> dict[bytes, bytes]:
    """The raw bytes of every stored task vector (ipt:task:{id}:z)."""
    client = server.client()
    return {key: client.get(key) for key in sorted(client.scan_iter(match="ipt:task:*:z"))}


def _predict(client: httpx.Client, tid: str) -> list[dict]:
    r = client.post(f"/tasks/{tid}/predict", json={"inputs": ["the movie was great", "the movie was bad"]})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_task_vectors_survive_redis_restarts_byte_for_byte(own_redis: RedisProcess, own_settings: Settings) -> None:
    with running_app(own_settings) as base, client_for(base, "key-alice") as alice:
        ids = _create_trained(alice, own_settings, ["aof_a", "aof_b", "aof_c"])
        before = _vectors(own_redis)
        assert len(before) == 3 and all(len(v) == 4 * 2 for v in before.values())  # d_I = 4, float16 (the default)
        predictions = {tid: _predict(alice, tid) for tid in ids}

        own_redis.restart(signal.SIGTERM)  # a clean shutdown (what Kubernetes sends first)
        assert _vectors(own_redis) == before

        ids += _create_trained(alice, own_settings, ["aof_d", "aof_e"])  # written after the last restart
        before = _vectors(own_redis)
        assert len(before) == 5
        time.sleep(1.5)  # appendfsync everysec: a crash loses at most the last second
        own_redis.restart(signal.SIGKILL)  # a crash: only what the AOF holds comes back
        assert _vectors(own_redis) == before

        info = own_redis.client().info("persistence")
        assert info["aof_enabled"] == 1 and info["loading"] == 0
        # the API, never restarted, reconnects by itself and serves the same answers from the same vectors
        for tid in ids:
            assert alice.get(f"/tasks/{tid}").json()["status"] == "succeeded"
        for tid, expected in predictions.items():
            assert _predict(alice, tid) == expected


def _task_requests(tid: str) -> list[tuple[str, str, dict | None]]:
    return [("GET", "/tasks", None), ("POST", "/tasks", task_body(name="while_down")),
            ("GET", f"/tasks/{tid}", None), ("POST", f"/tasks/{tid}/predict", {"inputs": ["x"]}),
            ("GET", f"/tasks/{tid}/similar", None), ("POST", f"/tasks/{tid}/cancel", None),
            ("DELETE", f"/tasks/{tid}", None)]


def test_redis_down_answers_503_and_the_api_recovers_by_itself(own_redis: RedisProcess,
                                                                own_settings: Settings) -> None:
    with running_app(own_settings) as base, client_for(base, "key-alice") as alice:
        (tid,) = _create_trained(alice, own_settings, ["down_and_up"])
        expected = _predict(alice, tid)

        own_redis.stop()
        assert alice.get("/livez").status_code == 200  # the process is fine: no restart wanted
        ready = alice.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] and ready.json()["redis"] is False
        for method, path, body in _task_requests(tid):
            r = alice.request(method, path, json=body)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert int(r.headers["retry-after"]) > 0, (method, path)
            assert "task store is unavailable" in r.json()["detail"], (method, path, r.text)

        own_redis.start()  # same port, same AOF directory; the API is left alone
        deadline = time.time() + 30
        while alice.get("/readyz").status_code != 200:
            assert time.time() < deadline, "the API did not become ready again after Redis came back"
            time.sleep(0.2)
        assert alice.get(f"/tasks/{tid}").json()["status"] == "succeeded"
        assert _predict(alice, tid) == expected
        assert alice.post("/tasks", json=task_body(name="after_recovery")).status_code == 202


def test_tasks_are_still_served_after_an_api_restart(env_settings: Settings) -> None:
    with running_app(env_settings) as base, client_for(base, "key-alice") as alice:
        (tid,) = _create_trained(alice, env_settings, ["before_restart"])
        queued = alice.post("/tasks", json=task_body(name="queued_over_restart")).json()["id"]
        expected = _predict(alice, tid)
    with httpx.Client(base_url=base) as gone, pytest.raises(httpx.ConnectError):
        gone.get("/livez")  # the first API is really down

    with running_app(env_settings) as base, client_for(base, "key-alice") as alice:  # a new app, same Redis
        assert alice.get(f"/tasks/{tid}").json()["status"] == "succeeded"
        assert _predict(alice, tid) == expected
        assert tid in [t["id"] for t in alice.get("/tasks", params={"limit": 100}).json()["tasks"]]
        run_worker_burst(env_settings)  # a task queued before the restart is trained and served too
        assert alice.get(f"/tasks/{queued}").json()["status"] == "succeeded"
        _predict(alice, queued)
