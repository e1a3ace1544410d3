"""API and worker on one machine share the cores: the API marks itself busy in Redis while it predicts, and a
worker uses every core only while the mark is absent (real Redis, the real app and worker)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from service.core_sharing import API_BUSY_KEY, BusyMarker, share_cores
from service.redis_connection import connect
from service.settings import Settings
from tests.service.conftest import run_worker_burst
from tests.service.test_api import create


@pytest.fixture
def threads() -> Iterator[int]:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_the_worker_takes_every_core_only_while_the_api_is_idle(env_settings: Settings, threads: int) -> None:
    client = connect(env_settings)
    client.delete(API_BUSY_KEY)
    sharing = env_settings.model_copy(update={"torch_threads": 2, "worker_threads_when_api_busy": 1})
    assert share_cores(client, sharing) == 2 and torch.get_num_threads() == 2
    BusyMarker(hold_s=30).mark(client)
    assert 0 < client.pttl(API_BUSY_KEY) <= 30_000
    assert share_cores(client, sharing) == 1 and torch.get_num_threads() == 1
    client.delete(API_BUSY_KEY)
    assert share_cores(client, sharing) == 2
    # without the setting a worker leaves torch as its process set it, mark or not
    BusyMarker(hold_s=30).mark(client)
    assert share_cores(client, env_settings.model_copy(update={"worker_threads_when_api_busy": None})) == 2
    client.delete(API_BUSY_KEY)


def test_the_mark_is_written_at_most_twice_per_hold(env_settings: Settings) -> None:
    client = connect(env_settings)
    marker = BusyMarker(hold_s=30)
    marker.mark(client)
    client.delete(API_BUSY_KEY)
    marker.mark(client)  # within half the hold: no second write
    assert not client.exists(API_BUSY_KEY)


def test_a_predict_marks_the_api_busy(alice: httpx.Client, env_settings: Settings) -> None:
    tid = create(alice, name="busy")["id"]
    run_worker_burst(env_settings)
    client = connect(env_settings)
    time.sleep(env_settings.api_busy_hold_s / 2 + 0.1)  # past the app's throttle of an earlier mark
    client.delete(API_BUSY_KEY)
    r = alice.post(f"/tasks/{tid}/predict", json={"inputs": ["the movie was great"]})
    assert r.status_code == 200, r.text
    assert 0 < client.pttl(API_BUSY_KEY) <= env_settings.api_busy_hold_s * 1000
