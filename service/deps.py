"""Request dependencies: settings, the task store, the caller's tenant, the model runtime."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from service.auth import tenant_for
from service.errors import MODEL_LOADING_RETRY_AFTER_S, retry_after
from service.predictor import MicroBatcher, PromptCache
from service.rate_limit import FixedWindowLimiter
from service.runtime import Runtime
from service.settings import Settings
from service.task_store import TaskStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> TaskStore:
    return request.app.state.store


def get_tenant(request: Request) -> str:
    return tenant_for(request, request.app.state.settings)


def get_runtime(request: Request) -> Runtime:
    runtime = request.app.state.runtime
    if runtime is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model is still loading; retry shortly",
                            headers=retry_after(MODEL_LOADING_RETRY_AFTER_S))
    return runtime


def get_batcher(request: Request) -> MicroBatcher:
    get_runtime(request)
    return request.app.state.batcher


def get_cache(request: Request) -> PromptCache:
    return request.app.state.prompt_cache


def limit_creates(request: Request, tenant: str, store: TaskStore) -> None:
    """Count one POST /tasks against the tenant's quota (429 + Retry-After beyond it). Called by the route once
    the request is valid, so that rejected requests use up nothing."""
    s: Settings = request.app.state.settings
    FixedWindowLimiter("create", s.rate_limit_create_per_window, s.rate_limit_window_s).hit(store.r, tenant)


def limit_predicts(request: Request, tenant: str, store: TaskStore) -> None:
    """Count one predict request against the tenant's quota (429 + Retry-After beyond it), once it is valid."""
    s: Settings = request.app.state.settings
    FixedWindowLimiter("predict", s.rate_limit_predict_per_window, s.rate_limit_window_s).hit(store.r, tenant)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[TaskStore, Depends(get_store)]
TenantDep = Annotated[str, Depends(get_tenant)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
CacheDep = Annotated[PromptCache, Depends(get_cache)]
