"""Which workers are alive: each worker beats into a sorted set per queue, the API counts the live beats.

    ipt:workers:{queue}   sorted set: worker name -> the Redis server time (s) until which it counts as live

A worker beats every `interval_s` from a thread of its own (so also while it trains), each beat good for
`ttl_s`; it leaves the set when it stops. A worker killed outright stops beating and drops out after at most
`ttl_s`. Times are Redis's own clock (TIME), so API and worker machines need not agree on the time.
"""

from __future__ import annotations

import logging
import threading

import redis

log = logging.getLogger(__name__)


def _key(queue: str) -> str:
    return f"ipt:workers:{queue}"


def _server_time(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return float(seconds) + float(micros) / 1e6


def beat(r: redis.Redis, queue: str, worker: str, ttl_s: float) -> None:
    """Worker `worker` serving `queue` is live for the next `ttl_s` seconds."""
    r.zadd(_key(queue), {worker: _server_time(r) + ttl_s})


def leave(r: redis.Redis, queue: str, worker: str) -> None:
    r.zrem(_key(queue), worker)


def live_workers(r: redis.Redis, queue: str) -> int:
    """How many workers serving `queue` beat recently enough (expired beats are dropped)."""
    key = _key(queue)
    r.zremrangebyscore(key, "-inf", _server_time(r))
    return int(r.zcard(key))


class Heartbeat:
    """A daemon thread beating for one worker until `stop()` (which also leaves the set)."""

    def __init__(self, r: redis.Redis, queue: str, worker: str, interval_s: float, ttl_s: float) -> None:
        self.r, self.queue, self.worker = r, queue, worker
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ipt-worker-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        beat(self.r, self.queue, self.worker, self.ttl_s)  # live before the first job can be taken
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                beat(self.r, self.queue, self.worker, self.ttl_s)
            except redis.RedisError:  # Redis restarting: the next beat catches up
                log.warning("worker heartbeat failed; retrying in %.0f s", self.interval_s, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            leave(self.r, self.queue, self.worker)
        except redis.RedisError:
            log.warning("could not remove the worker heartbeat; it expires in %.0f s", self.ttl_s)
