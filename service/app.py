"""The FastAPI application factory: routes, limits, metrics, and the model loaded once per process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.auth import auth_mode
from service.core_sharing import BusyMarker
from service.errors import empty_receive, register_error_handlers
from service.heap import release_free_memory
from service.load_shedding import Inflight, InflightLimit
from service.predictor import MicroBatcher, PromptCache, default_batch_tokens
from service.prefix_cache import PrefixKVCache, default_bytes
from service.redis_connection import connect
from service.request_metrics import RequestMetrics
from service.routes import events, health, playground, tasks
from service.runtime import Runtime, load_runtime
from service.settings import Settings
from service.task_store import TaskStore

log = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse bodies over the limit with a 413 naming it, before they are parsed: by Content-Length when
    given; otherwise the streamed body is read up to the limit (so memory stays bounded) and replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await self._reject(send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        response = JSONResponse({"detail": f"request body exceeds the limit of {self.max_bytes} bytes"}, 413)
        await response({"type": "http"}, empty_receive, send)


def prefix_cache_for(runtime: Runtime, settings: Settings) -> PrefixKVCache | None:
    """The per-task prefix KV cache, for causal backbones unless turned off (IPT_PREFIX_CACHE_BYTES=0)."""
    backbone = runtime.backbone
    if backbone.is_encoder_decoder:
        log.info("prefix KV cache off: a seq2seq encoder attends both ways, so its prompt states depend on the input")
        return None
    size = settings.prefix_cache_bytes
    if size is None:
        size = default_bytes(str(backbone.device).split(":")[0])
    if size == 0:
        return None
    log.info("prefix KV cache: up to %.0f MiB of per-task prompt keys and values", size / 2**20)
    return PrefixKVCache(backbone, size)


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. The runtime (backbone + Proj_b) is loaded at start-up unless one is given."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.warning("%s", auth_mode(settings))  # at warning level: shown whatever the log configuration
        app.state.store = TaskStore(connect(settings, fail_fast=True), vector_dtype=settings.vector_dtype)
        app.state.prompt_cache = PromptCache(settings.prompt_cache_size)
        app.state.batcher = None

        async def load() -> None:
            # in the background: /livez answers at once, /readyz says 503 until the model is in
            loaded = runtime or await asyncio.to_thread(load_runtime, settings)
            release_free_memory()  # what loading freed (on a first load, the dequantised GGUF's ~0.4 GB)
            metrics.MODEL_LOAD.set(loaded.load_seconds)
            tokens = settings.batch_max_tokens or default_batch_tokens(loaded.backbone.device.type)
            app.state.batcher = MicroBatcher(loaded, settings.batch_max_size, settings.batch_max_wait_ms / 1000,
                                             settings.batch_max_pending, prefix_cache_for(loaded, settings), tokens)
            app.state.batcher.start()
            app.state.runtime = loaded

        loading = asyncio.create_task(load())
        yield
        loading.cancel()
        if app.state.batcher is not None:
            await app.state.batcher.stop()

    app = FastAPI(title="IPT service", version="0.1.0", lifespan=lifespan,
                  description="Learn a task from a few examples as a tiny vector; predict with one frozen LM.")
    app.state.settings = settings
    app.state.busy_marker = BusyMarker(settings.api_busy_hold_s)
    app.state.runtime = None
    app.state.inflight = Inflight(settings.max_inflight_requests)
    app.include_router(health.router)
    app.include_router(tasks.router)
    app.include_router(events.router)
    app.include_router(playground.router)
    app.mount("/static", StaticFiles(directory=str(playground.STATIC_DIR)), name="static")
    register_error_handlers(app)
    # middleware added later wraps what was added before: RequestMetrics -> BodySizeLimit -> InflightLimit, so
    # that every answer is counted: refused bodies (413), shed requests (503) and unhandled errors (500) too
    app.add_middleware(InflightLimit, inflight=app.state.inflight)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # before anything reads the body
    app.add_middleware(RequestMetrics, fastapi_app=app)
    return app
