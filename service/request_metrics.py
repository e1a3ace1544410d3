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
import re
import time

from fastapi import FastAPI
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED_ROUTE = "unmatched"
CLIENT_GONE = "499"
"""Status label of a request the client abandoned before any answer (nginx's convention), not a 5xx."""


def route_label(scope: Scope, templates: list[tuple[re.Pattern[str], str]]) -> str:
    """The route template that serves this request's path (as routing set it, else by matching the path
    against the app's templates: a request answered before routing, a 413 or a shed 503, has none), else
    "unmatched"."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    request_path = str(scope.get("path", ""))
    for regex, template in templates:
        if regex.match(request_path):
            return template
    return UNMATCHED_ROUTE


def method_label(scope: Scope) -> str:
    method = str(scope.get("method", ""))
    return method if method in KNOWN_METHODS else OTHER_METHOD


class RequestMetrics:
    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self._templates: list[tuple[re.Pattern[str], str]] = []
        self._templates_of = -1

    def templates(self) -> list[tuple[re.Pattern[str], str]]:
        """(regex, template) of every route: the OpenAPI paths (included routers too) and the app's own routes
        (/docs, /openapi.json, routes left out of the schema); rebuilt when routes are added."""
        routes = self.fastapi_app.router.routes
        if self._templates_of != len(routes):
            paths = {p for r in routes if isinstance(p := getattr(r, "path", None), str) and p}
            paths |= set(self.fastapi_app.openapi().get("paths", {}))
            self._templates = [(compile_path(p)[0], p) for p in sorted(paths)]
            self._templates_of = len(routes)
        return self._templates

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
            method, route = method_label(scope), route_label(scope, self.templates())
            metrics.HTTP_REQUESTS.labels(method, route, status or CLIENT_GONE).inc()
            metrics.HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - start)
