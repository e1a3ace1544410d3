"""Handing the C heap's free pages back to the operating system after forward passes (glibc's `malloc_trim`).

A served pass allocates and frees a few hundred MB on a CPU: for ~80 cached rows of SmolLM2, the stacked keys
and values (~95 MB), each layer's activations and the LM head's slices. glibc keeps what is freed in its heaps,
between long-lived blocks such as prefix-cache entries admitted in the middle of a pass, so the API process's
resident memory stayed ~300 MB above what it held (benchmarks/api_memory_bench.py, 176 clients: 1.98 GB at the
end for 1.69 GB held). `malloc_trim(0)` returns every free page of every arena. It costs ~10-25 ms with such a
heap, and the next pass faults its pages back in (~1% of a 2.3 s pass, measured): so it runs at most once every
`min_interval_s`, which keeps it a small share of short passes too. The worker trims after each IST job: its
activations and gradients had kept it at 2.09 GB between jobs, 1.08 GB after a trim (four jobs under `ipt serve`).

Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Any


def _glibc_trim() -> Any | None:
    """glibc's `malloc_trim`, or None where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has a malloc_trim that does nothing)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _glibc_trim()


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system now; False where that is not available."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class HeapTrimmer:
    """Calls `release_free_memory` after a pass when at least `min_interval_s` have gone by since it last did."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self.min_interval_s = min_interval_s
        self._last = float("-inf")  # used from the model thread only

    def after_pass(self) -> bool:
        """Trim if it is time to; True if it did."""
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return False
        self._last = now
        return release_free_memory()
