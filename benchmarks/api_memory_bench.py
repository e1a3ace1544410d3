"""Memory of the API process at many hot tasks, with the service's default cache bounds.

Issue 18's bound: with the default prefix KV cache size, the API process stays under 2 GB RSS on a CPU while 1000
tasks are hot. The app runs in a process of its own (uvicorn, as `ipt serve` runs it; per-tenant quotas off), so
that the figure is the API's alone: the model, the soft-prompt cache (IPT_PROMPT_CACHE_SIZE) and the prefix KV cache
(IPT_PREFIX_CACHE_BYTES, unset: 448 MiB on a CPU). `--tasks` trained tasks (random z; a timing and a memory figure
need no trained ones) are stored in a private Redis; clients send one-input predicts round-robin over all of them,
`--passes` times, so that every task is hot and the prefix cache fills to its bound and evicts. The API's RSS is
sampled every 100 ms; its cache sizes come from its own /metrics.

Run:
    .venv/bin/python -m benchmarks.api_memory_bench                # SmolLM2, 1000 tasks; ~4 min on 2 CPU cores
    .venv/bin/python -m benchmarks.api_memory_bench --write-docs   # also write the table into docs/benchmarks.md
    .venv/bin/python -m benchmarks.api_memory_bench --quick        # smoke run with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.model_setup import add_common_arguments, prepare
from benchmarks.redis_server import free_port, redis_server, stop_child
from benchmarks.report import Report, finish
from benchmarks.served_app import TaskWriter, category_inputs, service_settings
from benchmarks.timing import device_kind

GB = 1e9
API_CODE = ("import sys, uvicorn; from service.settings import Settings; from service.app import create_app; "
            "s = Settings.model_validate_json(open(sys.argv[1]).read()); "
            "uvicorn.run(create_app(s), host='127.0.0.1', port=int(sys.argv[2]), log_level='warning', "
            "access_log=False)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tasks", type=int, default=1000, help="distinct hot tasks (default 1000)")
    parser.add_argument("--passes", type=int, default=2, help="predict requests per task (default 2)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="clients (default: twice the service's default IPT_BATCH_MAX_SIZE, 256: enough to fill "
                             "every pass up to its token budget, the load that holds the most memory at once)")
    parser.add_argument("--prefix-cache-bytes", type=int, default=None,
                        help="IPT_PREFIX_CACHE_BYTES of the app (default: unset, the service's default bound)")
    parser.add_argument("--limit-gb", type=float, default=2.0, help="the RSS bound checked (default 2.0 GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.concurrency is None:
        from service.settings import Settings

        args.concurrency = 2 * int(Settings.model_fields["batch_max_size"].default)
    if args.tasks < 1 or args.passes < 1 or args.concurrency < 1:
        parser.error("--tasks, --passes and --concurrency must be >= 1")
    return args


class RSSSampler(threading.Thread):
    """Samples a process's resident set size every `interval` seconds; keeps the peak and the last sample."""

    def __init__(self, process: psutil.Process, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.process, self.interval = process, interval
        self.peak = self.last = process.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.last = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, self.last)


@contextmanager
def api_process(settings: Any, workdir: Path, timeout: float = 600) -> Iterator[tuple[str, psutil.Process]]:
    """The real app in a child process on a free loopback port, ready (model loaded); yields (base URL, process).
    The child reads exactly these settings (no IPT_* variable of this environment reaches it)."""
    config = workdir / "api-settings.json"
    config.write_text(settings.model_dump_json())
    port, log = free_port(), workdir / "api.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPT_")}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", API_CODE, str(config), str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=base, trust_env=False, timeout=5) as client:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the API did not become ready; its log:\n{log.read_text()[-3000:]}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        yield base, psutil.Process(proc.pid)
    finally:
        stop_child(proc, 30)


def send_predicts(base: str, requests: list[tuple[str, str]], concurrency: int) -> tuple[Counter[int], float]:
    """Send one-input predicts from `concurrency` clients, each taking the next request; returns (responses by
    status code, wall seconds)."""
    todo: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    for item in requests:
        todo.put(item)
    codes: Counter[int] = Counter()
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=base, trust_env=False, timeout=120) as client:
            while True:
                try:
                    task_id, text = todo.get_nowait()
                except queue.Empty:
                    return
                code = client.post(f"/tasks/{task_id}/predict", json={"inputs": [text]}).status_code
                with lock:
                    codes[code] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes, time.perf_counter() - start


def scrape(base: str) -> dict[str, float]:
    """The app's own metrics by sample name (summed over labels, but for the `result` label of the lookups)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    text = httpx.get(f"{base}/metrics", trust_env=False, timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result = sample.labels.get("result")
            key = sample.name + (f'{{result="{result}"}}' if result else "")
            values[key] = values.get(key, 0.0) + sample.value
    return values


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    from ipt_engine.subspace_artifact import read_metadata
    from service.redis_connection import connect
    from service.runtime import artifact_id_of
    from service.task_store import TaskStore

    with ExitStack() as stack:
        setup = prepare(args, stack)
        redis_url = stack.enter_context(redis_server(setup.workdir))
        overrides: dict[str, Any] = {"max_inputs_per_predict": 1}
        if args.prefix_cache_bytes is not None:
            overrides["prefix_cache_bytes"] = args.prefix_cache_bytes
        settings = service_settings(setup, redis_url, **overrides)
        meta = read_metadata(setup.subspace)
        store = TaskStore(connect(settings))
        name, labels, inputs = category_inputs()
        ids = TaskWriter(store, name, labels, meta.config["d_intrinsic"], artifact_id_of(meta), args.seed).write(
            args.tasks)
        requests = [(task_id, inputs[(p * len(ids) + k) % len(inputs)])
                    for p in range(args.passes) for k, task_id in enumerate(ids)]
        base, process = stack.enter_context(api_process(settings, setup.workdir))
        ready_rss = process.memory_info().rss
        sampler = RSSSampler(process)
        sampler.start()
        codes, wall = send_predicts(base, requests, args.concurrency)
        sampler.stopped.set()
        sampler.join()
        metrics = scrape(base)
    failed = sum(n for code, n in codes.items() if code != 200)
    if failed:
        raise SystemExit(f"{failed} of {len(requests)} predicts failed: {dict(codes)}")
    kv_bytes = metrics.get("ipt_prefix_kv_cache_bytes", 0.0)
    kv_hits, kv_misses = (metrics.get(f'ipt_prefix_kv_cache_lookups_total{{result="{r}"}}', 0.0)
                          for r in ("hit", "miss"))
    evictions = metrics.get("ipt_prefix_kv_cache_evictions_total", 0.0)
    rejected = metrics.get("ipt_prefix_kv_cache_admissions_rejected_total", 0.0)
    held = kv_misses - evictions - rejected  # each miss adds an entry unless it is not admitted
    per_task = kv_bytes / max(1.0, held)
    bound = settings.prefix_cache_bytes
    bound_text = (f"{bound / 2**20:.0f} MiB (IPT_PREFIX_CACHE_BYTES)" if bound is not None
                  else "unset: the service's default (448 MiB on a CPU, 4 GiB on a GPU)")
    import torch

    device = torch.device(setup.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # the app's default
    report = Report("api_memory_bench", "API process memory at many hot tasks", device_kind(device),
                    [f"model: {setup.label}, subspace {setup.subspace_note}",
                     f"app: its own process (uvicorn), default caches; prefix KV cache bound {bound_text}",
                     f"load: {args.tasks} distinct tasks, {args.passes} one-input predicts each, round-robin, "
                     f"{args.concurrency} clients; {len(requests)} predicts in {wall:.1f} s, all 200"],
                    ["figure", "value"])
    report.rows += [
        ["API RSS when ready (model loaded, no task served)", f"{ready_rss / GB:.2f} GB"],
        [f"API peak RSS while {args.tasks} tasks were hot", f"{sampler.peak / GB:.2f} GB"],
        ["API RSS at the end", f"{sampler.last / GB:.2f} GB"],
        ["prefix KV cache held at the end", f"{kv_bytes / GB:.3f} GB ({held:.0f} tasks)"],
        ["prefix KV bytes per task", f"{per_task / 1e6:.3f} MB"],
        ["prefix KV lookups: hits / misses (hit rate)",
         f"{kv_hits:.0f} / {kv_misses:.0f} ({kv_hits / max(1.0, kv_hits + kv_misses):.0%})"],
        ["prefix KV entries: evicted / not admitted", f"{evictions:.0f} / {rejected:.0f}"],
        ["soft-prompt cache held", f"{metrics.get('ipt_prompt_cache_bytes', 0.0) / 1e6:.1f} MB"],
    ]
    within = sampler.peak < args.limit_gb * GB
    report.notes.append(f"Peak RSS {sampler.peak / GB:.2f} GB is {'within' if within else 'ABOVE'} the "
                        f"{args.limit_gb:.1f} GB bound.")
    report.values.update(ready_rss=ready_rss, peak_rss=sampler.peak, end_rss=sampler.last, kv_bytes=kv_bytes,
                         kv_hits=kv_hits, kv_misses=kv_misses, kv_evictions=evictions, kv_rejected=rejected,
                         kv_held=held, per_task_kv=per_task,
                         requests=len(requests), within=within)
    return finish(report, args, argv)


if __name__ == "__main__":
    main()
