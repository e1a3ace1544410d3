"""ASGI middleware counting every request in ipt_http_requests_total and its latency, with bounded labels.

It sits outside everything that can answer (body-size limit, load shedding, routing, exception handlers),
so 413s, shed 503s and 500s from unhandled errors are counted like any other answer; an error that escapes
every handler is counted as 500 (ServerErrorMiddleware, outside it, answers the 500). Label values come from
fixed sets, so no client can create series: `method` is a standard HTTP method or "other", `route` is a route
template of the app (also for /docs and /openapi.json, and for a known path with the wrong method) or
"unmatched".
"""

from __future__ import annotations

import asyncio
import time

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED_ROUTE = "unmatched"
CLIENT_GONE = "499"
"""Status label of a request the client abandoned before any answer (nginx's convention), not a 5xx."""


def route_label(scope: Scope, routes: list[BaseRoute]) -> str:
    """The route template that serves this request's path, else "unmatched"."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match is not Match.NONE:  # FULL, or PARTIAL: the path is a route's, the method is not
            return str(getattr(candidate, "path", UNMATCHED_ROUTE))
    return UNMATCHED_ROUTE


def method_label(scope: Scope) -> str:
    method = str(scope.get("method", ""))
    return method if method in KNOWN_METHODS else OTHER_METHOD


class RequestMetrics:
    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: str | None = None

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except asyncio.CancelledError:
            status = status or CLIENT_GONE
            raise
        except Exception:
            status = "500"  # the client gets a 500 (or a broken response, if one had started)
            raise
        finally:
            method, route = method_label(scope), route_label(scope, self.routes)
            metrics.HTTP_REQUESTS.labels(method, route, status or CLIENT_GONE).inc()
            metrics.HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - start)
