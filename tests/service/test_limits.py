"""Per-tenant quotas, over real HTTP on apps of their own: POST /tasks and predict rate limits and the cap
on a tenant's queued or running tasks answer 429 with Retry-After, per tenant (another tenant is not
affected); the fixed-window limiter itself against the real Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis

from service.rate_limit import FixedWindowLimiter, RateLimited
from service.redis_connection import connect
from service.settings import Settings, hash_api_key
from tests.service.conftest import client_for, post_json, run_worker_burst, running_app
from tests.service.test_api import task_body

WINDOW_S = 3600  # long windows: a window boundary inside a test would reset the counts


def _fresh_tenants(settings: Settings, **limits: int) -> tuple[Settings, list[str]]:
    """Settings with two new tenants (keys returned) and these limits; their own queue."""
    keys = [f"key-{uuid.uuid4().hex}" for _ in range(2)]
    update = {"api_keys": {hash_api_key(k): f"tenant-{k[-8:]}" for k in keys}, "rate_limit_window_s": WINDOW_S,
              "queue_name": f"ipt-limits-{uuid.uuid4().hex[:8]}", **limits}
    return settings.model_copy(update=update), keys


@contextmanager
def _app(settings: Settings, keys: list[str]) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    if WINDOW_S - time.time() % WINDOW_S < 10:
        time.sleep(WINDOW_S - time.time() % WINDOW_S + 0.1)  # not across a window boundary
    with running_app(settings) as base, client_for(base, keys[0]) as first, client_for(base, keys[1]) as second:
        yield first, second


def _assert_429(r: httpx.Response, limit_text: str) -> None:
    assert r.status_code == 429, r.text
    assert 0 < int(r.headers["retry-after"]) <= WINDOW_S
    assert limit_text in r.json()["detail"], r.text


def test_task_creation_is_rate_limited_per_tenant(env_settings: Settings) -> None:
    settings, keys = _fresh_tenants(env_settings, rate_limit_create_per_window=3, max_active_tasks_per_tenant=0)
    with _app(settings, keys) as (carol, dave):
        rejected = [{"name": "invalid"}, task_body(name="bad\ud800"), task_body(name="gen", kind="generation",
                                                                                 labels=["a"])]
        for body in rejected * 2:  # 6 rejected requests use up none of the 3 creations
            assert post_json(carol, "/tasks", body).status_code == 422
        for i in range(3):
            assert carol.post("/tasks", json=task_body(name=f"rl_{i}")).status_code == 202
        _assert_429(carol.post("/tasks", json=task_body(name="rl_3")), "at most 3 create requests per 3600 s")
        assert carol.post("/tasks", json={"name": "invalid"}).status_code == 422  # validated before counted
        assert dave.post("/tasks", json=task_body(name="rl_other")).status_code == 202  # another tenant
        assert carol.get("/tasks").status_code == 200  # reads are not limited by the create quota


def test_predictions_are_rate_limited_per_tenant(env_settings: Settings) -> None:
    settings, keys = _fresh_tenants(env_settings, rate_limit_predict_per_window=2, max_active_tasks_per_tenant=0)
    with _app(settings, keys) as (carol, dave):
        mine = carol.post("/tasks", json=task_body(name="rl_predict")).json()["id"]
        theirs = dave.post("/tasks", json=task_body(name="rl_predict")).json()["id"]
        run_worker_burst(settings)
        for body in ({"inputs": ["x\ud800"]}, {"inputs": []}, {"inputs": ["x"], "options": [["a", "b"]]}):
            assert post_json(carol, f"/tasks/{mine}/predict", body).status_code == 422  # not counted
        for _ in range(2):
            assert carol.post(f"/tasks/{mine}/predict", json={"inputs": ["x"]}).status_code == 200
        _assert_429(carol.post(f"/tasks/{mine}/predict", json={"inputs": ["x"]}), "at most 2 predict requests")
        assert dave.post(f"/tasks/{theirs}/predict", json={"inputs": ["x"]}).status_code == 200


def test_a_tenant_cannot_queue_more_than_its_cap_of_tasks(env_settings: Settings) -> None:
    settings, keys = _fresh_tenants(env_settings, max_active_tasks_per_tenant=2, rate_limit_create_per_window=0)
    with _app(settings, keys) as (carol, dave):
        first = carol.post("/tasks", json=task_body(name="cap_1"), headers={"Idempotency-Key": "k1"}).json()["id"]
        carol.post("/tasks", json=task_body(name="cap_2"))
        r = carol.post("/tasks", json=task_body(name="cap_3"))
        _assert_429(r, "2 tasks of this tenant are queued or running")
        assert len(carol.get("/tasks").json()["tasks"]) == 2  # nothing was stored or queued for it
        # a retried request (same Idempotency-Key) still gets its task
        retried = carol.post("/tasks", json=task_body(name="cap_1"), headers={"Idempotency-Key": "k1"})
        assert retried.status_code == 202 and retried.json()["id"] == first
        assert dave.post("/tasks", json=task_body(name="cap_other")).status_code == 202  # another tenant

        assert carol.post(f"/tasks/{first}/cancel").status_code == 200  # one ends: room for one more
        assert carol.post("/tasks", json=task_body(name="cap_3")).status_code == 202
        assert carol.post("/tasks", json=task_body(name="cap_4")).status_code == 429
        run_worker_burst(settings)  # trained tasks are no longer active
        assert carol.post("/tasks", json=task_body(name="cap_4")).status_code == 202
        assert carol.post("/tasks", json=task_body(name="cap_5")).status_code == 202
        assert carol.post("/tasks", json=task_body(name="cap_6")).status_code == 429
        run_worker_burst(settings)


def test_fixed_window_limiter_on_the_real_redis(env_settings: Settings) -> None:
    r: redis.Redis = connect(env_settings)
    limiter = FixedWindowLimiter(f"unit-{uuid.uuid4().hex}", limit=2, window_s=10)
    start = 1_000_000.0  # the start of a window
    limiter.hit(r, "t", now=start)
    limiter.hit(r, "t", now=start + 3)
    with pytest.raises(RateLimited) as refused:
        limiter.hit(r, "t", now=start + 6.5)
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "4"}
    limiter.hit(r, "other", now=start + 7)  # per tenant
    limiter.hit(r, "t", now=start + 10)  # the next window starts afresh
    ttl = r.ttl(f"ipt:rl:{limiter.action}:t:{int((start + 10) // 10)}")
    assert 0 < ttl <= 11  # counters expire with their window
    FixedWindowLimiter("off", limit=0, window_s=10).hit(r, "t")  # 0: no limit, nothing stored
    assert r.keys("ipt:rl:off:*") == []
