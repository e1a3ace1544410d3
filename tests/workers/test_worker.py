"""The worker's liveness heartbeat (what /readyz counts) against a real Redis, and its metrics server on a
taken port (the worker must go on without it)."""

from __future__ import annotations

import socket
import time
import uuid

from service.redis_connection import connect
from service.settings import Settings
from service.worker_liveness import Heartbeat, beat, live_workers
from workers.worker import start_metrics_server


def test_a_heartbeat_is_live_until_stopped_or_silent(env_settings: Settings) -> None:
    r = connect(env_settings)
    queue = f"ipt-beat-{uuid.uuid4().hex[:8]}"
    assert live_workers(r, queue) == 0
    heartbeat = Heartbeat(r, queue, "w1", interval_s=0.2, ttl_s=1.0).start()
    try:
        time.sleep(1.5)  # longer than the TTL: the beats kept it live
        assert live_workers(r, queue) == 1
        assert live_workers(r, f"{queue}-other") == 0  # per queue
    finally:
        heartbeat.stop()
    assert live_workers(r, queue) == 0  # a stopped worker leaves at once
    beat(r, queue, "silent", ttl_s=0.5)  # one that dies without leaving ...
    assert live_workers(r, queue) == 1
    time.sleep(0.8)
    assert live_workers(r, queue) == 0  # ... drops out after its TTL


def test_a_taken_metrics_port_is_logged_not_fatal(env_settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = env_settings.model_copy(update={"worker_metrics_port": taken.getsockname()[1],
                                                   "worker_metrics_host": "127.0.0.1"})
        assert start_metrics_server(settings) is False
