"""Batching in the worker: queued tasks with the same training settings train together in one IST run (the
job contract's match, service/ist_jobs.py:ISTJob.batches_with), through the real app and a real RQ worker."""

from __future__ import annotations

import logging

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import run_worker_burst
from tests.service.test_api import create


def test_a_worker_trains_queued_tasks_together(alice: httpx.Client, env_settings: Settings,
                                               caplog: pytest.LogCaptureFixture) -> None:
    run_worker_burst(env_settings)  # an empty queue first: only these three tasks are waiting
    ids = [create(alice, name=f"batched_{i}")["id"] for i in range(3)]
    with caplog.at_level(logging.INFO, logger="workers.jobs"):
        run_worker_burst(env_settings)
    runs = [m for r in caplog.records if r.name == "workers.jobs" and "in one run" in (m := r.getMessage())]
    assert len(runs) == 1 and runs[0].startswith("IST (gauss_newton) of 3 task(s)"), runs
    assert all(t in runs[0] for t in ids), runs
    for tid in ids:
        assert alice.get(f"/tasks/{tid}").json()["status"] == "succeeded"


def test_same_task_name_from_two_tenants_trains_in_one_batch(alice: httpx.Client, bob: httpx.Client,
                                                               env_settings: Settings) -> None:
    run_worker_burst(env_settings)
    a = create(alice, name="shared_name")["id"]
    b = create(bob, name="shared_name")["id"]
    run_worker_burst(env_settings)
    assert alice.get(f"/tasks/{a}").json()["status"] == "succeeded"
    assert bob.get(f"/tasks/{b}").json()["status"] == "succeeded"
