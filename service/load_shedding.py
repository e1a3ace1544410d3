"""A bound on the requests one API process holds at once: beyond it a request answers 503 with
Retry-After at once, instead of queueing (for a thread, a Redis connection or the model) and making
memory and latency grow with the offered load. Health routes are never shed, so that probes and
scrapes still answer under overload."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import BUSY_RETRY_AFTER_S, empty_receive, retry_after

EXEMPT_PATHS = frozenset({"/livez", "/readyz", "/metrics"})


@dataclass
class Inflight:
    """Requests in progress in this process, their bound (0: none) and the most seen at once."""

    limit: int
    current: int = 0
    peak: int = 0
    shed: int = 0


class InflightLimit:
    """ASGI middleware over an `Inflight` counter (one event loop per process: no lock needed)."""

    def __init__(self, app: ASGIApp, inflight: Inflight, retry_after_s: int = BUSY_RETRY_AFTER_S) -> None:
        self.app = app
        self.inflight = inflight
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.inflight
        if scope["type"] != "http" or not state.limit or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if state.current >= state.limit:
            state.shed += 1
            response = JSONResponse({"detail": f"the service is at capacity ({state.limit} requests in progress); "
                                               "retry shortly"}, 503, headers=retry_after(self.retry_after_s))
            await response(scope, empty_receive, send)
            return
        state.current += 1
        state.peak = max(state.peak, state.current)
        try:
            await self.app(scope, receive, send)
        finally:
            state.current -= 1
