"""Per-tenant quotas over Redis: fixed-window request counters shared by every API replica.

A window of `window_s` seconds starting at a multiple of `window_s` (Unix time) allows `limit` requests
per (tenant, action); the next one answers 429 with Retry-After set to the seconds left in the window.
Keys: ipt:rl:{action}:{tenant}:{window index}, expiring with their window.
"""

from __future__ import annotations

import math
import time

import redis
from fastapi import HTTPException, status


class RateLimited(HTTPException):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(status.HTTP_429_TOO_MANY_REQUESTS, message, headers={"Retry-After": str(retry_after_s)})


class FixedWindowLimiter:
    """`limit` requests per tenant per `window_s` seconds for one action (0: no limit)."""

    def __init__(self, action: str, limit: int, window_s: int) -> None:
        self.action = action
        self.limit = limit
        self.window_s = window_s

    def hit(self, r: redis.Redis, tenant: str, now: float | None = None) -> None:
        """Count one request of `tenant`; raise RateLimited when it is over the limit."""
        if self.limit <= 0:
            return
        now = time.time() if now is None else now
        window = int(now // self.window_s)
        key = f"ipt:rl:{self.action}:{tenant}:{window}"
        pipe = r.pipeline()  # MULTI/EXEC: the counter never exists without its expiry
        pipe.incr(key)
        pipe.expire(key, self.window_s + 1)
        count, _ = pipe.execute()
        if int(count) > self.limit:
            retry_after = max(1, math.ceil((window + 1) * self.window_s - now))
            raise RateLimited(f"rate limit: at most {self.limit} {self.action} requests per {self.window_s} s "
                              f"per tenant; retry in {retry_after} s", retry_after)
