"""Load generators and what they observe: concurrent HTTP requests, Prometheus counters, predict batch sizes and
whether the model thread is busy."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.timing import pct


@dataclass
class LoadResult:
    """What a load run measured: per-request latencies (s), the wall time of the run, inputs answered, and the CPU
    seconds the load client itself spent (on this machine, taken from the server it measures)."""

    latencies: list[float]
    wall: float
    examples: int
    client_cpu: float = 0.0

    @staticmethod
    def pooled(runs: Sequence[LoadResult]) -> LoadResult:
        """Several runs of one configuration as one: their requests together, their wall times added."""
        return LoadResult([t for r in runs for t in r.latencies], sum(r.wall for r in runs),
                          sum(r.examples for r in runs), sum(r.client_cpu for r in runs))

    @property
    def client_cpu_per_request(self) -> float:
        """Seconds of the client's CPU per request."""
        return self.client_cpu / len(self.latencies) if self.latencies else float("nan")

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
    return LoadResult(out["latencies"], out["wall"], out["examples"], out["cpu"])


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
    tokens: float = 0.0  # fed tokens as the batcher counts them (0 without a token budget)

    @classmethod
    def snapshot(cls) -> BatchStats:
        from service import metrics

        return cls(metric_value(metrics.PREDICT_BATCH_SIZE, "_count"), metric_value(metrics.PREDICT_BATCH_SIZE, "_sum"),
                   metric_value(metrics.PREDICT_BATCH_TASKS, "_sum"),
                   metric_value(metrics.PREDICT_BATCH_TOKENS, "_sum"))

    def since(self, earlier: BatchStats) -> BatchStats:
        return BatchStats(self.forwards - earlier.forwards, self.inputs - earlier.inputs, self.tasks - earlier.tasks,
                          self.tokens - earlier.tokens)

    def __add__(self, other: BatchStats) -> BatchStats:
        return BatchStats(self.forwards + other.forwards, self.inputs + other.inputs, self.tasks + other.tasks,
                          self.tokens + other.tokens)

    @property
    def mean_inputs(self) -> float:
        return self.inputs / self.forwards if self.forwards else float("nan")

    @property
    def mean_tasks(self) -> float:
        return self.tasks / self.forwards if self.forwards else float("nan")

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.forwards if self.forwards else float("nan")


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
