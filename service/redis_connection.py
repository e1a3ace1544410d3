"""The Redis connection: REDIS_URL / IPT_REDIS_URL (`ipt serve` points IPT_REDIS_URL at the embedded Redis it
starts: service/embedded_redis.py)."""

from __future__ import annotations

import os

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from service.settings import Settings


def connect(settings: Settings, *, fail_fast: bool = False) -> redis.Redis:
    """A client for the configured Redis. With `fail_fast` (the API), connecting and commands time out
    after the configured seconds and a connection error is retried only `redis_retries` times with a short
    backoff, so that a request answers 503 quickly while Redis is down; the client reconnects by itself
    once Redis is back. Workers keep redis-py's defaults (RQ sets its own socket timeout for BLPOP)."""
    url = settings.redis_url or os.environ.get("REDIS_URL")
    if url:
        if not fail_fast:
            return redis.Redis.from_url(url)
        return redis.Redis.from_url(
            url, socket_connect_timeout=settings.redis_connect_timeout_s,
            socket_timeout=settings.redis_socket_timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), settings.redis_retries))
    raise RuntimeError("no Redis configured: set IPT_REDIS_URL (or REDIS_URL), or run `ipt serve`, which starts "
                       "an embedded Redis of its own")
