"""Cores shared by the API and a worker on one machine (`ipt serve`): the worker uses every core while the API
is idle and steps down to its share while the API serves predictions.

The API marks itself busy in Redis (a key that expires `api_busy_hold_s` after the last predict; written at most
twice per hold, not per request). A worker whose settings name `worker_threads_when_api_busy` checks the key
before training and after every dev evaluation, and sets torch's thread count: `torch_threads` (every core)
while the key is absent, `worker_threads_when_api_busy` while it is there. The granularity is one optimiser
iteration (seconds on a CPU), so a burst of predictions shares the cores from the next iteration on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from service.settings import Settings

log = logging.getLogger(__name__)

API_BUSY_KEY = "ipt:api:busy"


class BusyMarker:
    """The API side: `mark(client)` on each predict; writes the key at most once per half hold."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._written_at = -float("inf")

    def mark(self, client: Any) -> None:
        now = time.monotonic()
        if now - self._written_at < self.hold_s / 2:
            return
        client.set(API_BUSY_KEY, b"1", px=max(1, int(self.hold_s * 1000)))
        self._written_at = now


def api_is_busy(client: Any) -> bool:
    return bool(client.exists(API_BUSY_KEY))


def share_cores(client: Any, settings: Settings) -> int:
    """The worker side: set torch's threads for this moment (see the module docstring); returns the count.
    Without `worker_threads_when_api_busy` it leaves torch as the process set it."""
    busy_threads = settings.worker_threads_when_api_busy
    if busy_threads is None:
        return torch.get_num_threads()
    wanted = busy_threads if api_is_busy(client) else (settings.torch_threads or torch.get_num_threads())
    if wanted != torch.get_num_threads():
        log.info("torch threads %d -> %d (the API is %s)", torch.get_num_threads(), wanted,
                 "busy" if wanted == busy_threads else "idle")
        torch.set_num_threads(wanted)
    return wanted
