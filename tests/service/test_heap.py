"""Handing freed heap memory back to the OS after passes (service.heap)."""

from __future__ import annotations

import platform

import psutil
import pytest
import torch

from service.heap import HeapTrimmer, release_free_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


@glibc
def test_freed_blocks_between_live_ones_go_back_to_the_os() -> None:
    """Freed 64 KB blocks (below glibc's mmap threshold: on the heap) with a live block after every 32 stay
    resident when freed, as a pass's memory stays behind the cache entries it admitted; trimming returns them."""
    proc = psutil.Process()
    blocks = [torch.ones(16 * 1024) for _ in range(3200)]  # 200 MB of 64 KB tensors, touched
    kept = blocks[31::32]
    del blocks
    freed = proc.memory_info().rss
    assert release_free_memory()
    trimmed = proc.memory_info().rss
    assert freed - trimmed > 100e6, f"RSS {freed / 1e6:.0f} -> {trimmed / 1e6:.0f} MB"
    assert all(float(t[0]) == 1.0 for t in kept)  # live blocks untouched


def test_trimming_after_passes_is_at_most_once_per_interval() -> None:
    trimmer = HeapTrimmer(min_interval_s=3600)
    first = trimmer.after_pass()
    assert first == (platform.libc_ver()[0] == "glibc")
    assert not trimmer.after_pass()  # within the interval: skipped
    assert HeapTrimmer(min_interval_s=0).after_pass() == first
