"""Error responses: their documented shapes (for the routes' `responses=`, so that the OpenAPI schema
describes every status a route can answer) and the handler that turns an unreachable Redis into 503."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

STORE_RETRY_AFTER_S = 5


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
                        status_code=503, headers={"Retry-After": str(STORE_RETRY_AFTER_S)})


def register_error_handlers(app: FastAPI) -> None:
    # BusyLoadingError (Redis loading its AOF after a restart) is a ConnectionError; ReadOnlyError is what a
    # replica answers writes during a failover
    for exc_type in (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError):
        app.add_exception_handler(exc_type, store_unavailable)
