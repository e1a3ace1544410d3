"""The service under test: its settings (quotas off), the real app served on loopback, a warm prompt cache, a
bulk writer of stored tasks and the category-task inputs the predictions use."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.model_setup import Setup
from benchmarks.redis_server import free_port

BENCH_OWNER = "public"  # the tenant of open mode: the benchmarks' apps run without API keys

QUOTAS = ("rate_limit_predict_per_window", "rate_limit_create_per_window", "max_active_tasks_per_tenant")
"""Per-tenant quota settings the benchmarks turn off (0: no limit): their load all comes from one tenant."""
APP = "the real app over HTTP on loopback (per-tenant quotas off)"

# ------------------------------------------------------------------------------------------ the service
def service_settings(setup: Setup, redis_url: str, **overrides: Any) -> Any:
    """Settings for the app and workers under test: every field that matters is explicit, so that IPT_*
    variables of the calling environment cannot change what is measured. Per-tenant quotas are off."""
    from service.settings import Settings

    values: dict[str, Any] = {
        "redis_url": redis_url, "data_dir": setup.workdir, "backbone": setup.backbone, "subspace": setup.subspace,
        "device": setup.device, "dtype": setup.dtype, "open_mode": True, "api_keys": {}, "queue_name": "ipt-bench",
        "worker_metrics_port": None, "torch_threads": setup.threads,
    }
    # per-tenant quotas off, where the service has them: all the benchmark's load comes from one tenant
    values.update({k: 0 for k in QUOTAS if k in Settings.model_fields})
    values.update(overrides)
    return Settings(**values)


@contextmanager
def served_app(settings: Any, timeout: float = 600) -> Iterator[tuple[str, Any]]:
    """The real app (service.app.create_app) served by uvicorn on a free loopback port, ready (model loaded);
    yields (base URL, app). Runs in a thread of this process, so its state (prompt cache) stays reachable."""
    import uvicorn

    from service.app import create_app

    app = create_app(settings)
    port = free_port()
    # log_config=None: leave the logging of this process alone (dictConfig would close handlers it did not make)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           log_config=None))
    thread = threading.Thread(target=server.run, daemon=True, name="bench-uvicorn")
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise SystemExit("the app did not start")
            time.sleep(0.02)
        with httpx.Client(base_url=base, trust_env=False, timeout=30) as client:
            while client.get("/readyz").status_code != 200:
                if time.time() > deadline:
                    raise SystemExit("the app did not become ready (model load)")
                time.sleep(0.05)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _decoded(runtime: Any, store: Any, task_ids: Sequence[str], chunk: int) -> Iterator[tuple[list[tuple[str, int]],
                                                                                               torch.Tensor]]:
    """Chunks of ([(task id, vector version)], their prompts Proj_b(z) [k, n, d]) as the predict route computes
    them."""
    device = runtime.backbone.device
    for begin in range(0, len(task_ids), chunk):
        ids = list(task_ids[begin:begin + chunk])
        stored = [store.vector(i) for i in ids]
        z = torch.from_numpy(np.stack([s[0] for s in stored])).to(device)
        with torch.no_grad():
            yield [(i, v) for i, (_, v) in zip(ids, stored, strict=True)], runtime.subspace.decode(z)


def prefill_prompt_cache(app: Any, runtime: Any, store: Any, task_ids: Sequence[str], chunk: int = 64) -> float:
    """Put Proj_b(z) of every task into the app's prompt cache (what serving those tasks once would leave there),
    computing Proj_b in chunks; returns the seconds it took. The tensors equal what the predict route computes."""
    start = time.perf_counter()
    for keys, prompts in _decoded(runtime, store, task_ids, chunk):
        for k, (task_id, version) in enumerate(keys):
            app.state.prompt_cache.get_or_compute(task_id, version, lambda p=prompts[k]: p.clone())
    return time.perf_counter() - start


def prefill_prefix_cache(app: Any, runtime: Any, store: Any, task_ids: Sequence[str], chunk: int = 64) -> float:
    """Run every task's prompt and source prefix through the model into the app's prefix KV cache (what serving
    each task once would leave there); returns the seconds it took (0 when the app has no prefix cache)."""
    from ipt_engine.tasks import source_prefix

    cache = app.state.batcher.prefix_cache
    if cache is None:
        return 0.0
    start = time.perf_counter()
    for keys, prompts in _decoded(runtime, store, task_ids, chunk):
        names = [record.name for task_id, _ in keys if (record := store.get(task_id)) is not None]
        if len(names) != len(keys):
            raise SystemExit("a task written for the benchmark is missing from the store")
        with torch.no_grad():
            cache.stacked(keys, prompts, [source_prefix(name) for name in names])
    return time.perf_counter() - start


class TaskWriter:
    """Writes many trained tasks into Redis fast (pipelined), laid out exactly as the service stores them.

    One template task goes through the real TaskStore flow (create, mark_running, set_progress, mark_succeeded);
    bulk tasks copy its hash fields (with their own owner and timestamps) and get their own random z. A sample
    of them is read back through TaskStore to check the layout still matches the store's."""

    def __init__(self, store: Any, name: str, labels: Sequence[str], d_intrinsic: int, artifact_id: str,
                 seed: int = 0) -> None:
        self.store = store
        self.d_intrinsic = d_intrinsic
        self.rng = np.random.default_rng(seed)
        record, _ = store.create(BENCH_OWNER, name, "classification", list(labels), d_intrinsic, artifact_id)
        store.mark_running(record.id, 30)
        store.set_progress(record.id, 30, 0.9)
        store.mark_succeeded(record.id, self.random_z(), 0.9, 30)
        self.template = {k.decode(): v for k, v in store.r.hgetall(store._key(record.id)).items()}
        self.template_id = record.id

    def random_z(self) -> np.ndarray:
        return self.rng.standard_normal(self.d_intrinsic).astype("<f4")

    def write(self, count: int, owner: str | Callable[[int], str] = BENCH_OWNER, batch: int = 1000) -> list[str]:
        """Write `count` succeeded tasks, owned by `owner` (or by owner(k) for the k-th); returns their ids in order."""
        from service.task_store import STATUS_COUNTS_KEY, TaskStatus, encode_vector, now_s

        r = self.store.r
        owner_of = owner if callable(owner) else (lambda _k: owner)
        ids: list[str] = []
        for begin in range(0, count, batch):
            pipe = r.pipeline(transaction=False)
            end = min(begin + batch, count)
            for k in range(begin, end):
                task_id = uuid.uuid4().hex
                who = owner_of(k)
                now = now_s()
                mapping = {**self.template, "owner": who, "created_at": now, "started_at": now, "finished_at": now}
                key = self.store._key(task_id)
                pipe.hset(key, mapping=mapping)
                pipe.set(f"{key}:z", encode_vector(self.random_z(), self.store.vector_dtype))
                pipe.zadd(f"ipt:tenant:{who}:tasks", {task_id: now})  # as TaskStore.create
                ids.append(task_id)
            pipe.hincrby(STATUS_COUNTS_KEY, TaskStatus.SUCCEEDED.value, end - begin)  # as the store's counters
            pipe.execute()
        self.check(ids[:: max(1, len(ids) // 5)][:5])
        return ids

    def check(self, ids: Sequence[str]) -> None:
        for task_id in ids:
            record = self.store.get(task_id)
            stored = self.store.vector(task_id)
            if record is None or stored is None or record.status.value != "succeeded" \
                    or stored[0].shape != (self.d_intrinsic,):
                raise RuntimeError(f"bulk-written task {task_id} does not read back through TaskStore: the store's "
                                   f"layout changed; update benchmarks/served_app.py TaskWriter")


# ------------------------------------------------------------------------------------------------ inputs
def category_inputs() -> tuple[str, list[str], list[str]]:
    """The 3-label category task of the tests: (task name, labels, every input of its train/dev/test splits)."""
    from ipt_engine.testing import RELATED, TARGET, category_task

    task = category_task(TARGET[0], TARGET[1], seed=len(RELATED))
    return task.name, list(task.labels or ()), [e.input for e in task.train + task.dev + task.test]
