"""The per-task prefix KV cache: each task's soft prompt Proj_b(z) run through the model once.

For a causal backbone a prompt's keys and values at every layer depend only on the task (its z), never on
the input, so a served row needs only its input and option tokens once they are cached (`PromptKV`). Entries
are keyed like the prompt cache, by (task id, vector version): a retrained task has a new version and its
older entry is dropped; a deleted task is never asked for again and ages out. The bound is in bytes (an
entry of SmolLM2-135M with n = 20 in fp32 holds 30 layers x keys and values x 3 heads x 20 x 64 x 4 B =
0.92 MB). It is used from the model thread only (the micro-batcher's), so it needs no lock; the byte gauge
may be read anywhere.

Seq2seq backbones have no such cache: their encoder attends both ways, so a prompt's states depend on the
input (the batcher passes the prompts themselves for them).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence

from torch import Tensor

from ipt_engine.backbone import Backbone
from ipt_engine.prompt_kv import PromptKV
from service import metrics

log = logging.getLogger(__name__)

CPU_DEFAULT_BYTES = 448 * 2**20  # ~500 tasks of SmolLM2 (n = 20, fp32); measured (benchmarks/api_memory_bench.py,
# 1000 hot tasks): the API process is 1.14 GB when ready and peaks ~0.35 GB above it plus the cache: 2.30 GB at
# 768 MiB, 2.02 GB at 512 MiB, so 448 MiB keeps it under 2 GB
ACCELERATOR_DEFAULT_BYTES = 4 * 2**30

Key = tuple[str, int]


def default_bytes(device: str) -> int:
    """The bound when none is configured: modest on a CPU (host memory holds the model too), larger on a GPU."""
    return CPU_DEFAULT_BYTES if device == "cpu" else ACCELERATOR_DEFAULT_BYTES


class PrefixKVCache:
    """(task id, version) -> PromptKV of one row, at most `max_bytes` held: least recently used first out, and a
    newcomer that would push an entry out is admitted only if its task has been asked for more often lately than
    that entry's (TinyLFU admission, as Caffeine does it). Under plain LRU, a stream cycling over more tasks than
    the cache holds (1000 hot tasks, ~500 fit on a CPU) evicts every entry before its next use and never hits;
    with admission, the entries held stay and serve their share of the stream. Lookup counts are per task, halved
    every `10 x entries held` lookups (at least 1024), so that a task that becomes hot is admitted soon."""

    def __init__(self, backbone: Backbone, max_bytes: int) -> None:
        if backbone.is_encoder_decoder:
            raise ValueError("a seq2seq backbone has no prefix KV cache (its encoder attends both ways)")
        self.backbone = backbone
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Key, PromptKV] = OrderedDict()
        self._version: dict[str, int] = {}  # task id -> the version held
        self._lookups: Counter[str] = Counter()  # task id -> recent lookups (aged)
        self._since_aging = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def stacked(self, keys: Sequence[Key], prompts: Tensor) -> PromptKV:
        """The caches of `keys` (distinct), row i for keys[i], computing the missing ones from prompts [K, n, d]
        (row i is keys[i]'s prompt) in one forward pass."""
        self._count(keys)
        missing = [i for i, k in enumerate(keys) if k not in self._items]
        hits = len(keys) - len(missing)
        if hits:
            metrics.PREFIX_CACHE.labels("hit").inc(hits)
        if missing:
            metrics.PREFIX_CACHE.labels("miss").inc(len(missing))
        fresh = dict(zip(missing, self.backbone.prompt_kv(prompts[missing]).split(), strict=True)) if missing else {}
        rows = []
        for i, key in enumerate(keys):
            if i in fresh:
                rows.append(fresh[i])
                self._put(key, fresh[i])
            else:
                self._items.move_to_end(key)
                rows.append(self._items[key])
        return PromptKV.stack(rows)

    def _count(self, keys: Sequence[Key]) -> None:
        self._lookups.update(task_id for task_id, _ in keys)
        self._since_aging += len(keys)
        if self._since_aging >= max(1024, 10 * len(self._items)):
            self._lookups = Counter({k: n // 2 for k, n in self._lookups.items() if n > 1})
            self._since_aging = 0

    def _put(self, key: Key, entry: PromptKV) -> None:
        stale = self._version.get(key[0])  # key itself is missing, so a held version is an older one
        if stale is not None:
            self._drop((key[0], stale))  # of a retrained task
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole cache (or the cache is off): used once, not kept
        if self.nbytes + entry.nbytes > self.max_bytes and self._items:
            victim = next(iter(self._items))
            if self._lookups[key[0]] <= self._lookups[victim[0]]:
                metrics.PREFIX_CACHE_REJECTED.inc()  # used for this batch, not kept
                return
        self._items[key] = entry
        self._version[key[0]] = key[1]
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._items)))
            metrics.PREFIX_CACHE_EVICTIONS.inc()
        metrics.PREFIX_CACHE_BYTES.set(self.nbytes)

    def _drop(self, key: Key) -> None:
        self.nbytes -= self._items.pop(key).nbytes
        del self._version[key[0]]
        metrics.PREFIX_CACHE_BYTES.set(self.nbytes)
