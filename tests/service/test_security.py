"""Security, over real HTTP against the real app and Redis:

- tenant isolation on every route, enumerated from the app's OpenAPI schema (a new route that is not
  classified here fails the test): another tenant's task id answers 404 on each task route and changes
  nothing; lists and similarity results never show another tenant's tasks; every route but the health
  routes needs an API key;
- API keys are compared in constant time (every configured digest through hmac.compare_digest, with no
  early exit) and never logged (the logs of an API process and a worker process, at DEBUG and with every
  attribute of every record written out, hold neither the key nor its hash);
- body size limits hold before a body is parsed: a streamed (chunked) body over the limit is refused
  with 413 before it has even ended, a declared oversized body without it being sent;
- a failed job's log records carry none of the user's examples (workers/log_redaction.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from rq import Callback, Queue
from rq.job import Job

from service.app import create_app
from service.redis_connection import connect
from service.settings import Settings, hash_api_key
from service.task_store import TaskStore
from tests.service.conftest import KEYS, kill_process_group, run_worker_burst
from tests.service.redis_process import free_port
from tests.service.test_api import task_body

PUBLIC_ROUTES = {("GET", "/livez"), ("GET", "/readyz"), ("GET", "/metrics")}
"""Routes without tenant data: no key needed."""
COLLECTION_ROUTES = {("GET", "/tasks"), ("POST", "/tasks"), ("POST", "/tasks/import"), ("GET", "/map")}
"""Routes over the caller's own tasks (checked by test_collections_never_show_another_tenants_tasks)."""
REQUEST_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/tasks"): task_body(name="security"),
    ("POST", "/tasks/{task_id}/predict"): {"inputs": ["the movie was great"]},
    # a well-formed import whose adapter does not fit (422 once authenticated): the key is checked first;
    # tests/service/test_portability.py imports real adapters and checks who owns the task
    ("POST", "/tasks/import"): {"name": "security", "kind": "generation",
                                "adapter": {"config": {"peft_type": "PROMPT_TUNING"}, "weights": "AA=="}},
}
"""A valid body for each route that takes one, so that a refusal is about the tenant, not the body."""
REQUEST_PARAMS: dict[tuple[str, str], dict[str, str]] = {("GET", "/tasks/{task_id}/export"): {"format": "peft"}}
"""Required query parameters of a route, for the same reason."""


SCHEMA_PATHS: dict[str, Any] = create_app(Settings(subspace=None, redis_url="redis://unused")).openapi()["paths"]
ROUTES = [(method.upper(), path) for path, item in SCHEMA_PATHS.items() for method in item]


def _takes_body(method: str, path: str) -> bool:
    return "requestBody" in SCHEMA_PATHS[path][method.lower()]


TASK_ROUTES = [r for r in ROUTES if "{task_id}" in r[1]]
PRIVATE_ROUTES = [r for r in ROUTES if r not in PUBLIC_ROUTES]


def test_every_route_is_covered_by_the_isolation_tests() -> None:
    for method, path in ROUTES:
        covered = (method, path) in PUBLIC_ROUTES | COLLECTION_ROUTES or "{task_id}" in path
        assert covered, f"{method} {path}: classify it here (public, collection or task route) and test its isolation"
        if _takes_body(method, path):
            assert (method, path) in REQUEST_BODIES, f"{method} {path}: add a valid body to REQUEST_BODIES"
    assert {r[1] for r in TASK_ROUTES} >= {"/tasks/{task_id}", "/tasks/{task_id}/predict"}


def _request(client: httpx.Client, method: str, path: str, task_id: str) -> httpx.Response:
    return client.request(method, path.format(task_id=task_id), json=REQUEST_BODIES.get((method, path)),
                          params=REQUEST_PARAMS.get((method, path)))


def _snapshot(client: httpx.Client, task_id: str, settings: Settings) -> tuple[dict, bytes | None]:
    r = client.get(f"/tasks/{task_id}")
    assert r.status_code == 200, r.text
    return r.json(), connect(settings).get(f"ipt:task:{task_id}:z")


@pytest.mark.parametrize(("method", "path"), TASK_ROUTES, ids=lambda v: str(v))
def test_another_tenants_task_is_404_on_every_task_route(method: str, path: str, alice: httpx.Client,
                                                         bob: httpx.Client, env_settings: Settings) -> None:
    trained = alice.post("/tasks", json=task_body(name="victim_trained")).json()["id"]
    run_worker_burst(env_settings)
    queued = alice.post("/tasks", json=task_body(name="victim_queued")).json()["id"]
    for victim in (trained, queued):
        before = _snapshot(alice, victim, env_settings)
        r = _request(bob, method, path, victim)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert "victim" not in r.text  # nothing of the task leaks into the error
        assert _snapshot(alice, victim, env_settings) == before  # and nothing changed
        # the owner's same request finds the task: the 404 is about the tenant, not the request
        mine = _request(alice, method, path, victim)
        assert mine.status_code not in (401, 404, 422) and mine.status_code < 500, (method, path, mine.text)
    for victim in (trained, queued):
        alice.delete(f"/tasks/{victim}")


def test_collections_never_show_another_tenants_tasks(alice: httpx.Client, bob: httpx.Client,
                                                      env_settings: Settings) -> None:
    hers = [alice.post("/tasks", json=task_body(name=f"hers_{i}")).json()["id"] for i in range(2)]
    created = bob.post("/tasks", json=task_body(name="his"))
    assert created.status_code == 202
    his = created.json()["id"]
    run_worker_burst(env_settings)
    bob_ids = {t["id"] for t in bob.get("/tasks", params={"limit": 100}).json()["tasks"]}
    assert his in bob_ids and not bob_ids & set(hers)
    assert his not in {t["id"] for t in alice.get("/tasks", params={"limit": 100}).json()["tasks"]}
    bob_map = {t["id"] for t in bob.get("/map").json()["tasks"]}
    assert his in bob_map and not bob_map & set(hers)  # the map shows the caller's tasks only
    assert alice.get(f"/tasks/{his}").status_code == 404  # what bob creates is bob's
    similar = bob.get(f"/tasks/{his}/similar", params={"k": 50})
    assert similar.status_code == 200 and not {s["id"] for s in similar.json()["similar"]} & set(hers)
    assert {s["id"] for s in alice.get(f"/tasks/{hers[0]}/similar", params={"k": 50}).json()["similar"]} >= {hers[1]}


@pytest.mark.parametrize(("method", "path"), PRIVATE_ROUTES, ids=lambda v: str(v))
def test_every_route_but_health_needs_an_api_key(method: str, path: str, server: str) -> None:
    target = path.format(task_id=uuid.uuid4().hex)
    body = REQUEST_BODIES.get((method, path))
    for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "key-alice"},
                    {"Authorization": "Basic key-alice"}):
        r = httpx.request(method, server + target, json=body, headers=headers)
        assert r.status_code == 401, (method, path, headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"


def test_api_keys_are_compared_in_constant_time(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request compares the digest of the key it sent with every configured digest through
    hmac.compare_digest: no dict lookup, no ==, no early exit on a match."""
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    configured = {hash_api_key(k) for k in KEYS}
    for key in [*KEYS, "not-a-key"]:
        calls.clear()
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {key}"}) as c:
            c.get("/tasks")
        assert len(calls) == len(configured), f"{key}: {len(calls)} comparisons for {len(configured)} keys"
        assert {known for known, _ in calls} == configured
        assert {sent for _, sent in calls} == {hash_api_key(key)}


# ----------------------------------------------------------------------------------------------- logs
_LOGGING = """
import logging, sys
class EveryAttribute(logging.Formatter):  # as a structured (JSON) log handler would write a record
    def format(self, record):
        return super().format(record) + " " + repr(vars(record))
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(EveryAttribute("%(levelname)s %(name)s: %(message)s"))
logging.basicConfig(level=logging.DEBUG, handlers=[handler], force=True)
"""
_API = _LOGGING + """
import uvicorn
uvicorn.run("service.app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]), log_level="debug",
            log_config=None)
"""
_WORKER = _LOGGING + """
from workers.worker import run_worker
run_worker()
"""


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def _logged_processes(queue_name: str, key: str, logs: Path) -> Iterator[str]:
    """An API process and a worker process of their own, logging everything at DEBUG into logs/api.log and
    logs/worker.log; yields the API's base URL; both are stopped (SIGTERM, so logs are flushed) on exit."""
    env = {**os.environ, "IPT_API_KEYS": json.dumps({hash_api_key(key): "logged"}), "IPT_WORKER_METRICS_PORT": "0",
           "IPT_QUEUE_NAME": queue_name, "OMP_NUM_THREADS": "1"}
    port = free_port()
    with (logs / "api.log").open("wb") as api_out, (logs / "worker.log").open("wb") as worker_out:
        api = subprocess.Popen([sys.executable, "-c", _API, str(port)], env=env, stdout=api_out, stderr=api_out,
                               start_new_session=True)
        worker = subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=worker_out, stderr=worker_out,
                                  start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait(lambda: _ready(base) or api.poll() is not None, 180, "the API process")
            assert api.poll() is None, (logs / "api.log").read_text()[-3000:]
            yield base
        finally:
            for process in (api, worker):
                process.send_signal(signal.SIGTERM)
            for process in (api, worker):
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=60)
                kill_process_group(process)  # anything left (RQ's scheduler process)


def test_api_keys_and_examples_never_reach_the_logs(env_settings: Settings, tmp_path: Path) -> None:
    key = f"sk-{uuid.uuid4().hex}"
    queue_name = f"ipt-logs-{uuid.uuid4().hex[:8]}"
    marker = f"zebra{uuid.uuid4().hex[:10]}"  # in every example text
    train = [{"input": f"{marker} the movie was {w}", "output": f"{marker}{['pos', 'neg'][i % 2]}"}
             for i, w in enumerate(["great", "awful", "lovely", "bad", "fine", "poor", "nice", "sad"])]
    store = TaskStore(connect(env_settings))
    with (_logged_processes(queue_name, key, tmp_path) as base,
          httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c):
        r = c.post("/tasks", json={"name": "logged", "train": train,
                                   "training": {"max_iterations": 2}})
        assert r.status_code == 202, r.text
        tid = r.json()["id"]
        _wait(lambda: c.get(f"/tasks/{tid}").json()["status"] == "succeeded", 180, "the worker to train the task")
        assert c.post(f"/tasks/{tid}/predict", json={"inputs": [f"{marker} the movie was good"]}).status_code == 200
        assert c.get("/tasks").status_code == 200 and c.get(f"/tasks/{tid}/similar").status_code == 200
        other = c.post("/tasks", json={"name": "logged_2", "train": train}).json()["id"]
        assert c.post(f"/tasks/{other}/cancel").status_code in (200, 409)  # 409: the worker finished it first
        assert c.delete(f"/tasks/{tid}").status_code == 204
        for wrong in (f"Bearer {key}x", f"Token {key}", key):
            assert httpx.get(f"{base}/tasks", headers={"Authorization": wrong}).status_code == 401

        # a job that fails with the user's examples in its arguments (RQ logs them as record attributes)
        failing, _ = store.create("logged", "failing", "classification", None, 4, "artifact")
        Queue(queue_name, connection=store.r).enqueue(
            "workers.jobs.train_task", failing.id, {"name": "failing", "kind": "classification", "train": train},
            {"optimizer": "sgd"}, job_id=failing.id, result_ttl=0, failure_ttl=60,  # an unknown optimiser: it raises
            on_failure=Callback("workers.jobs.on_job_failure"))
        _wait(lambda: store.get(failing.id).status.value == "failed", 120, "the failing job to fail")

    logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in ("api", "worker")}
    # the logs are the right ones, and at full detail
    assert "POST /tasks" in logs["api"] and " 401" in logs["api"] and "DEBUG" in logs["api"]
    assert "exception raised while executing" in logs["worker"] and failing.id in logs["worker"]
    assert "'arguments': '<redacted>'" in logs["worker"]
    for name, text in logs.items():
        assert key not in text, f"the API key is in the {name} log"
        assert key[3:15] not in text, f"part of the API key is in the {name} log"
        assert hash_api_key(key)[:12] not in text, f"the API key's hash is in the {name} log"
        assert marker not in text, f"a user's example is in the {name} log"


# ------------------------------------------------------------------------------------ body size limits
BODY_ROUTES = [(m, p) for m, p in ROUTES if _takes_body(m, p)]


def _raw_exchange(base: str, head: str, body_parts: list[bytes], timeout: float = 15) -> bytes:
    """Send a request head and body parts on a raw socket and return what the server answers, without
    ever ending the body."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the body was still coming: what we want
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pytest.fail(f"no answer within {timeout} s: the server waits for the end of the body")
        return answer


def _head(method: str, path: str, extra: str) -> str:
    return (f"{method} {path.format(task_id=uuid.uuid4().hex)} HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer key-alice\r\nContent-Type: application/json\r\n{extra}\r\n")


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES, ids=lambda v: str(v))
def test_a_streamed_body_over_the_limit_is_refused_before_it_ends(method: str, path: str, server: str,
                                                                   env_settings: Settings) -> None:
    limit = env_settings.max_body_bytes
    chunk = b"x" * 10_000
    parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(limit // len(chunk) + 2)]
    answer = _raw_exchange(server, _head(method, path, "Transfer-Encoding: chunked\r\n"), parts)  # no last chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert f"limit of {limit} bytes".encode() in answer or b"content-length" in answer.lower()


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES, ids=lambda v: str(v))
def test_a_declared_oversized_body_is_refused_without_being_sent(method: str, path: str, server: str) -> None:
    answer = _raw_exchange(server, _head(method, path, f"Content-Length: {10**12}\r\n"), [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]


def test_deeply_nested_json_is_a_4xx(alice: httpx.Client) -> None:
    nested = "[" * 20_000 + "]" * 20_000  # under the size limit, over the parser's recursion limit
    r = alice.post("/tasks", content=nested, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    r = alice.post("/tasks", content='{"name": ' + "[" * 500 + "]" * 500 + "}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


# -------------------------------------------------------------------------------- failed-job log records
def test_failed_job_log_records_carry_no_examples(alice: httpx.Client, env_settings: Settings,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """RQ logs a failed job with `extra={'arguments': job.args}`: the user's examples. The worker's
    filter redacts them, and any text of the arguments that the message repeats."""
    marker = f"okapi{uuid.uuid4().hex[:10]}"
    train = [{"input": f"{marker} review {i}", "output": ["positive", "negative"][i % 2]} for i in range(8)]
    tid = alice.post("/tasks", json={"name": "fails", "train": train, "training": {"max_steps": 3}}).json()["id"]
    connection = connect(env_settings)
    job = Job.fetch(tid, connection=connection)
    assert any(marker in json.dumps(a) for a in job.args)  # the examples travel in the job ...
    job.args = (job.args[0], job.args[1], {"optimizer": "sgd"})  # ... which now fails on every attempt
    job.save()
    # a job whose exception repeats its argument (a job's description is logged on every start: the service
    # always sets one that names the task only, as here)
    echo = Queue(env_settings.queue_name, connection=connection).enqueue("builtins.int", f"{marker} not a number",
                                                                          description="echo")

    caplog.set_level(logging.DEBUG)
    run_worker_burst(env_settings)
    assert alice.get(f"/tasks/{tid}").json()["status"] == "failed"  # retries used up, then marked failed
    assert echo.get_status(refresh=True) == "failed"

    failures = [r for r in caplog.records if r.name == "rq.worker" and r.levelno >= logging.ERROR]
    assert {tid, echo.id} <= {getattr(r, "job_id", None) for r in failures}
    assert all(getattr(r, "arguments", None) == "<redacted>" for r in failures)
    for record in caplog.records:
        assert marker not in record.getMessage(), record.getMessage()
        assert marker not in repr(vars(record)), f"{record.name}: {vars(record)}"
