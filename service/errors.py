"""Error responses: their documented shapes (for the routes' `responses=`, so that the OpenAPI schema
describes every status a route can answer) and the handlers: an unreachable Redis is a 503; a body that does
not validate is a 422 whose echo of the input is JSON-safe and small (service/safe_text.py), whatever was
sent (lone surrogates, NaN, megabytes of text); any other error is a JSON 500 that reveals nothing."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from service.safe_text import json_safe

log = logging.getLogger(__name__)

STORE_RETRY_AFTER_S = 5
"""Retry-After of a 503 while the task store (Redis) is unreachable."""
MODEL_LOADING_RETRY_AFTER_S = 5
"""Retry-After of a 503 while the model is still loading (a request that needs it, /readyz)."""
BUSY_RETRY_AFTER_S = 1
"""Retry-After of a 503 when the process is at capacity (requests in flight, inputs waiting for the model)."""

MAX_VALIDATION_ISSUES = 20
"""A 422 lists at most this many issues (a body of 2,000 bad examples would otherwise list each)."""

MAX_DETAIL_CHARS = 2000
"""Longest message of an HTTP error the service raises (it may quote what the client sent)."""


class ErrorDetail(BaseModel):
    """Every error the service raises itself: one human-readable message."""

    detail: str


class ValidationIssue(BaseModel):
    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorDetail(BaseModel):
    """422: a body or parameter that does not validate (a list of issues), or a task the engine refuses
    (a message)."""

    detail: str | list[ValidationIssue]


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_DESCRIPTIONS: dict[int, tuple[str, dict[str, Any] | None]] = {
    400: ("the body could not be read", None),
    401: ("missing or unknown API key", {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    404: ("no such task for this tenant (another tenant's task answers 404 too)", None),
    409: ("the task is not in a state that allows this", None),
    413: ("the body or a limit in it is too large (the message names the limit)", None),
    429: ("a per-tenant quota is used up; retry after Retry-After seconds", _RETRY_AFTER),
    503: ("the model is loading, the task store is unreachable, or the service is at capacity; "
          "retry after Retry-After seconds", _RETRY_AFTER),
}


def retry_after(seconds: int) -> dict[str, str]:
    """The Retry-After header of an answer that asks the client to come back in `seconds`."""
    return {"Retry-After": str(seconds)}


async def empty_receive() -> Message:
    """The ASGI `receive` of a response sent by a middleware before the app read the body."""
    return {"type": "http.request", "body": b"", "more_body": False}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route decorator: each status with its schema and headers."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        if code == 422:
            out[422] = {"model": ValidationErrorDetail, "description": "validation error"}
            continue
        description, headers = _DESCRIPTIONS[code]
        out[code] = {"model": ErrorDetail, "description": description}
        if headers:
            out[code]["headers"] = headers
    return out


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Redis down, restarting or loading its data: a 503 the client can retry, never a 500."""
    return JSONResponse({"detail": f"the task store is unavailable ({type(exc).__name__}); retry shortly"},
                        status_code=503, headers=retry_after(STORE_RETRY_AFTER_S))


async def validation_failed(request: Request, exc: Exception) -> JSONResponse:
    """422 with FastAPI's shape (type, loc, msg, input, ctx per issue), every value JSON-safe and truncated."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    issues = [{key: json_safe(value) for key, value in error.items() if key != "url"}
              for error in errors[:MAX_VALIDATION_ISSUES]]
    for issue in issues:
        issue["loc"] = [part if isinstance(part, int) else str(part) for part in issue.get("loc", [])]
    if len(errors) > MAX_VALIDATION_ISSUES:
        issues.append({"loc": ["body"], "type": "too_many_issues",
                       "msg": f"{len(errors) - MAX_VALIDATION_ISSUES} more issues are not listed"})
    return JSONResponse({"detail": issues}, status_code=422)


async def http_error(request: Request, exc: Exception) -> Response:
    """An HTTPException's detail (it may quote client input) through json_safe, with its headers."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (204, 304):  # no body allowed
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": json_safe(exc.detail, MAX_DETAIL_CHARS)}, status_code=exc.status_code,
                        headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: logged with its traceback, answered as a JSON 500 that names nothing internal."""
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    # Connection: close, because the server closes this connection once the error has propagated to it: a
    # client reusing it would get a reset instead of an answer to its next request
    return JSONResponse({"detail": "internal error; it was logged"}, status_code=500, headers={"Connection": "close"})


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_failed)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    # BusyLoadingError (Redis loading its AOF after a restart) is a ConnectionError; ReadOnlyError is what a
    # replica answers writes during a failover
    for exc_type in (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError):
        app.add_exception_handler(exc_type, store_unavailable)
