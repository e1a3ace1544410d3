"""The per-task prefix KV cache: each task's soft prompt Proj_b(z), and the start of every source it formats
("{name}:", `tasks.source_prefix`), run through the model once.

For a causal backbone the keys and values at every layer of a prompt and of the tokens after it depend only on
those, never on what follows: a task's are the same for every input, so a served row needs only its input and
option tokens once they are cached (`PromptKV`). Entries are keyed by (task id, vector version, source prefix):
a retrained task has a new version and its older entry is dropped; a deleted task is never asked for again and
ages out. The bound is in bytes (an entry of SmolLM2-135M in fp32 holds 30 layers x keys and values x 3 heads x
64 x 4 B = 46 KB per position: 0.92 MB for n = 20, ~1.1 MB with a 4-token name). It is used from the model
thread only (the micro-batcher's), so it needs no lock; the byte gauge may be read anywhere.

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

CPU_DEFAULT_BYTES = 448 * 2**20  # ~400 tasks of SmolLM2 (n = 20 and a 4-token name, fp32). Measured
# (benchmarks/api_memory_bench.py, 1000 hot tasks, 256 clients filling every pass): the API process is 1.08 GB when
# ready and peaks 1.92 GB with this bound (0.47 GB held, ~0.26 GB for the pass in flight); 2 GB is the target
ACCELERATOR_DEFAULT_BYTES = 4 * 2**30
MISSES_PER_PASS = 16
"""Tasks whose prompts run through the model together on a cache miss: a pass holds their keys and values for all
layers (~1.1 MB a task for SmolLM2), so a batch of many new tasks computes them a few at a time."""

Key = tuple[str, int]  # (task id, vector version), as the batcher groups its rows
Entry = tuple[str, int, str]  # (task id, vector version, source prefix)


def default_bytes(device: str) -> int:
    """The bound when none is configured: modest on a CPU (host memory holds the model too), larger on a GPU."""
    return CPU_DEFAULT_BYTES if device == "cpu" else ACCELERATOR_DEFAULT_BYTES


class PrefixKVCache:
    """(task id, version, source prefix) -> PromptKV of one row, at most `max_bytes` held: least recently used
    first out, and a newcomer that would push an entry out is admitted only if its task has been asked for more
    often lately than that entry's (TinyLFU admission, as Caffeine does it). Under plain LRU, a stream cycling
    over more tasks than the cache holds (1000 hot tasks, ~400 fit on a CPU) evicts every entry before its next
    use and never hits; with admission, the entries held stay and serve their share of the stream. Lookup counts
    are per task, halved every `10 x entries held` lookups (at least 1024), so that a task that becomes hot is
    admitted soon."""

    def __init__(self, backbone: Backbone, max_bytes: int) -> None:
        if backbone.is_encoder_decoder:
            raise ValueError("a seq2seq backbone has no prefix KV cache (its encoder attends both ways)")
        self.backbone = backbone
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Entry, PromptKV] = OrderedDict()
        self._held: dict[str, Entry] = {}  # task id -> the entry held for it
        self._lookups: Counter[str] = Counter()  # task id -> recent lookups (aged)
        self._since_aging = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Key | Entry) -> bool:
        return self._held.get(key[0], ())[:len(key)] == key  # an entry held is the one entry of its task

    def stacked(self, keys: Sequence[Key], prompts: Tensor, source_prefixes: Sequence[str] | None = None
                ) -> PromptKV:
        """The caches of `keys` (distinct), row i for keys[i], computing the missing ones from prompts [K, n, d]
        (row i is keys[i]'s prompt) and source_prefixes (row i's task's `source_prefix`; None: cache the
        prompts alone), `MISSES_PER_PASS` tasks a forward pass."""
        prefixes = list(source_prefixes) if source_prefixes is not None else [""] * len(keys)
        if len(prefixes) != len(keys):
            raise ValueError(f"{len(prefixes)} source prefixes for {len(keys)} tasks")
        entries = [(*k, p) for k, p in zip(keys, prefixes, strict=True)]
        self._count(keys)
        missing = [i for i, e in enumerate(entries) if e not in self._items]
        hits = len(keys) - len(missing)
        if hits:
            metrics.PREFIX_CACHE.labels("hit").inc(hits)
        for entry in entries:
            if entry in self._items:
                self._items.move_to_end(entry)
        if not missing:
            return PromptKV.stack([self._items[e] for e in entries])
        metrics.PREFIX_CACHE.labels("miss").inc(len(missing))
        # the batch is sized before its missing rows are computed, and each part is written straight into it
        # and freed before the next runs: no missing row is held twice
        ids = dict(zip(missing, self.backbone.cached_prefix_ids([prefixes[i] for i in missing], prompts.shape[1])
                       if source_prefixes is not None else [()] * len(missing), strict=True))
        parts = [missing[b:b + MISSES_PER_PASS] for b in range(0, len(missing), MISSES_PER_PASS)]
        with_prefixes = source_prefixes is not None
        first = self._run_prompts(parts[0], entries, prompts, with_prefixes)
        out = PromptKV.empty_like(first, [ids[i] if i in ids else self._items[e].source_prefixes[0]
                                          for i, e in enumerate(entries)])
        for i, entry in enumerate(entries):
            if i not in ids:
                out.place([i], self._items[entry])
        self._admit(out, parts[0], entries, first)
        del first
        for part in parts[1:]:
            self._admit(out, part, entries, self._run_prompts(part, entries, prompts, with_prefixes))
        return out

    def _run_prompts(self, part: list[int], entries: list[Entry], prompts: Tensor, with_prefixes: bool) -> PromptKV:
        """The keys and values of rows `part` (missing), their prompts and source prefixes in one forward pass."""
        return self.backbone.prompt_kv(prompts[part], [entries[i][2] for i in part] if with_prefixes else None)

    def _admit(self, out: PromptKV, part: list[int], entries: list[Entry], computed: PromptKV) -> None:
        """Place the rows computed for `part` in the batch `out` and keep those the cache admits."""
        out.place(part, computed)
        for i, row in zip(part, computed.split(copy=False), strict=True):
            self._put(entries[i], row)  # `_put` copies what it keeps

    def _count(self, keys: Sequence[Key]) -> None:
        self._lookups.update(task_id for task_id, _ in keys)
        self._since_aging += len(keys)
        if self._since_aging >= max(1024, 10 * len(self._items)):
            self._lookups = Counter({k: n // 2 for k, n in self._lookups.items() if n > 1})
            self._since_aging = 0

    def _put(self, key: Entry, entry: PromptKV) -> None:
        stale = self._held.get(key[0])  # key itself is missing, so an entry held for its task is an older one
        if stale is not None:
            self._drop(stale)  # of a retrained task
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole cache (or the cache is off): used once, not kept
        if self.nbytes + entry.nbytes > self.max_bytes and self._items:
            victim = next(iter(self._items))
            if self._lookups[key[0]] <= self._lookups[victim[0]]:
                metrics.PREFIX_CACHE_REJECTED.inc()  # used for this batch, not kept
                return
        self._items[key] = entry.split()[0]  # a copy of its own: not a view pinning the pass's tensors
        self._held[key[0]] = key
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._items)))
            metrics.PREFIX_CACHE_EVICTIONS.inc()
        metrics.PREFIX_CACHE_BYTES.set(self.nbytes)

    def _drop(self, key: Entry) -> None:
        self.nbytes -= self._items.pop(key).nbytes
        del self._held[key[0]]
        metrics.PREFIX_CACHE_BYTES.set(self.nbytes)
