"""Timing helpers: synchronised repeats, percentiles and how figures are printed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch


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

def device_kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and np.isfinite(a) and np.isfinite(b) else "n/a"
