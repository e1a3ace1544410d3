"""Idempotency-Key on POST /tasks, over real HTTP with a real Redis: a retry with the same body gets the same
task (also when the JSON is written differently); the same key with another body is a 409 naming the
problem and creates nothing; keys are per tenant; a race of two bodies under one key creates one task."""

from __future__ import annotations

import json
import threading
import uuid

import httpx

from tests.service.test_api import task_body


def _post(client: httpx.Client, body: dict, key: str, pretty: bool = False) -> httpx.Response:
    text = json.dumps(body, indent=2 if pretty else None, sort_keys=pretty)
    return client.post("/tasks", content=text.encode(), headers={"Content-Type": "application/json",
                                                                "Idempotency-Key": key})


def _count(client: httpx.Client) -> int:
    return int(client.get("/tasks").json()["total"])


def test_the_same_key_and_body_return_the_same_task(alice: httpx.Client) -> None:
    key = uuid.uuid4().hex
    first = _post(alice, task_body(name="idem_same"), key)
    assert first.status_code == 202, first.text
    total = _count(alice)
    again = _post(alice, task_body(name="idem_same"), key, pretty=True)  # other key order and whitespace
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    explicit = task_body(name="idem_same")  # the defaults written out are the same request
    explicit["training"] = {**explicit["training"], "optimizer": "gauss_newton"}
    assert _post(alice, explicit, key).json()["id"] == first.json()["id"]
    assert _count(alice) == total


def test_the_same_key_with_another_body_is_a_409(alice: httpx.Client, bob: httpx.Client) -> None:
    key = uuid.uuid4().hex
    first = _post(alice, task_body(name="idem_first"), key)
    assert first.status_code == 202, first.text
    total = _count(alice)
    for other in (task_body(name="idem_other"), task_body(name="idem_first", n=8),
                  task_body(name="idem_first", training={"max_iterations": 5})):
        r = _post(alice, other, key)
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert "Idempotency-Key" in detail and "another request body" in detail and first.json()["id"] in detail
    assert _count(alice) == total, "a conflicting request created a task"
    assert _post(alice, task_body(name="idem_first"), key).json()["id"] == first.json()["id"]  # still usable
    theirs = _post(bob, task_body(name="idem_other"), key)  # another tenant's key space
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_a_deleted_tasks_key_creates_a_new_task(alice: httpx.Client) -> None:
    key = uuid.uuid4().hex
    first = _post(alice, task_body(name="idem_deleted"), key).json()["id"]
    assert alice.delete(f"/tasks/{first}").status_code == 204
    second = _post(alice, task_body(name="idem_deleted"), key)
    assert second.status_code == 202 and second.json()["id"] != first


def test_two_bodies_racing_under_one_key_create_one_task(server: str) -> None:
    key = uuid.uuid4().hex
    results: list[httpx.Response] = []
    barrier = threading.Barrier(8)

    def send(i: int) -> None:
        with httpx.Client(base_url=server, headers={"Authorization": "Bearer key-alice"}, timeout=60) as c:
            barrier.wait()
            results.append(_post(c, task_body(name=f"idem_race_{i % 2}"), key))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    created = {r.json()["id"] for r in results if r.status_code == 202}
    assert len(results) == 8 and len(created) == 1, [(r.status_code, r.text[:100]) for r in results]
    winner = next(r for r in results if r.status_code == 202).json()["name"]
    for r in results:  # the winner's body got its task, the other body a 409
        expected = 202 if json.loads(r.request.content)["name"] == winner else 409
        assert r.status_code == expected, (r.status_code, r.text)
