"""Predictions: soft prompts from z (bounded LRU cache keyed by task id and vector version) and a
micro-batcher that runs requests of many tasks in one forward pass, each row with its own prompt; with a
causal backbone each task's prompt runs through the model once and its keys and values are reused
(`service.prefix_cache`).

The predict path: service/routes/tasks.py:predict_task validates the request, reads z, then calls
`predict_task_inputs` here: the task's prompt Proj_b(z) from the PromptCache (`decode_prompt` on a miss), one
Item per input into the MicroBatcher, whose model thread runs `ipt_engine.evaluation.predict`."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from ipt_engine.evaluation import Prediction, predict, row_texts
from ipt_engine.tasks import Example, TaskHead, TaskKind
from service import metrics
from service.heap import HeapTrimmer
from service.prefix_cache import PrefixKVCache
from service.runtime import Runtime
from service.safe_text import clean_text
from service.task_store import TaskRecord


class PromptCache:
    """Proj_b(z) per (task id, version); the least recently used prompt goes first when full. At most one version
    of a task is held (a retrained task's older prompt goes when the new one comes); the bytes held are kept as a
    running total, so a miss costs O(1) bookkeeping whatever the capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int], Tensor] = OrderedDict()
        self._version: dict[str, int] = {}  # task id -> the version held
        self._bytes = 0
        self._lock = threading.Lock()

    def get_or_compute(self, task_id: str, version: int, compute: Callable[[], Tensor]) -> Tensor:
        with self._lock:
            return self._get_or_compute(task_id, version, compute)

    def _get_or_compute(self, task_id: str, version: int, compute: Callable[[], Tensor]) -> Tensor:
        key = (task_id, version)
        if key in self._items:
            self._items.move_to_end(key)
            metrics.PROMPT_CACHE.labels("hit").inc()
            return self._items[key]
        metrics.PROMPT_CACHE.labels("miss").inc()
        prompt = compute()
        stale = self._version.get(task_id)
        if stale is not None:
            self._drop((task_id, stale))  # an older version of a retrained task
        self._items[key] = prompt
        self._version[task_id] = version
        self._bytes += _nbytes(prompt)
        while len(self._items) > self.capacity:
            self._drop(next(iter(self._items)))
            metrics.PROMPT_CACHE_EVICTIONS.inc()
        metrics.PROMPT_CACHE_BYTES.set(self._bytes)
        return prompt

    def _drop(self, key: tuple[str, int]) -> None:
        self._bytes -= _nbytes(self._items.pop(key))
        del self._version[key[0]]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


CPU_BATCH_TOKENS = 1280
"""Default token budget of a forward pass on a CPU: 32 rows of a 20-token prompt and a short input, ~1.5 s for
SmolLM2 on 2 cores (a pass reaches the CPU's matmul rate from a few hundred tokens on; more only adds latency)."""
ACCELERATOR_BATCH_TOKENS = 16384
"""Default token budget of a forward pass on a GPU, which needs thousands of tokens in a pass to be busy."""


def default_batch_tokens(device: str) -> int:
    """IPT_BATCH_MAX_TOKENS when none is configured, for a backbone on `device` ("cpu", "cuda", ...)."""
    return CPU_BATCH_TOKENS if device == "cpu" else ACCELERATOR_BATCH_TOKENS


@dataclass
class Item:
    """One input to answer: which task (head + prompt [n, d]), the example, and the tokens its row feeds a
    forward pass (counted by `MicroBatcher.submit` when batches have a token budget)."""

    key: tuple[str, int]
    head: TaskHead
    prompt: Tensor
    example: Example
    tokens: int = 0


class MicroBatcher:
    """Collects items from concurrent requests for up to `max_wait_s` and runs them as one batch on a single model
    thread. A batch closes at `max_size` items or, with a token budget, before the item that would take it past
    `max_tokens` tokens (what its rows feed the model: with the prefix KV cache their inputs and options, without
    it their prompts too), so that a pass costs about the same whatever the rows: more rows when they are short
    (cached prompts, short inputs), fewer when they are long."""

    def __init__(self, runtime: Runtime, max_size: int, max_wait_s: float, max_pending: int = 4096,
                 prefix_cache: PrefixKVCache | None = None, max_tokens: int | None = None) -> None:
        self.runtime = runtime
        self.prefix_cache = prefix_cache  # causal backbones: each task's prompt keys and values, kept
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.max_tokens = max_tokens
        # rows are counted on the event loop while the model thread tokenizes: each with a tokenizer of its own
        self._tokenizer = copy.deepcopy(runtime.backbone.tokenizer) if max_tokens is not None else None
        self._carry: tuple[Item, asyncio.Future[Prediction]] | None = None  # the item that opens the next batch
        # bounded: beyond it requests get 503 + Retry-After instead of growing memory and latency
        self.queue: asyncio.Queue[tuple[Item, asyncio.Future[Prediction]]] = asyncio.Queue(max_pending)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipt-model")
        self._heap = HeapTrimmer()  # a pass's freed memory goes back to the OS (service.heap)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: Sequence[Item]) -> list[Prediction]:
        loop = asyncio.get_running_loop()
        if self.queue.maxsize and self.queue.qsize() + len(items) > self.queue.maxsize:
            raise asyncio.QueueFull
        if self.max_tokens is not None:
            for item in items:
                item.tokens = self.row_tokens(item)
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures, strict=True):
            self.queue.put_nowait((item, fut))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._carry or await self.queue.get()
            self._carry = None
            batch, tokens = [first], first[0].tokens
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_size:
                entry = await self._next(deadline)
                if entry is None:
                    break
                if self.max_tokens is not None and tokens + entry[0].tokens > self.max_tokens:
                    self._carry = entry  # over the budget: it opens the next batch
                    break
                batch.append(entry)
                tokens += entry[0].tokens
            batch = [(i, f) for i, f in batch if not f.done()]  # requests that went away while we waited
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [i for i, _ in batch])
            except Exception as exc:  # the requests get the error; the loop keeps serving
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def _next(self, deadline: float) -> tuple[Item, asyncio.Future[Prediction]] | None:
        """The next waiting item, or the first to come before `deadline` (monotonic seconds); None if none does.
        What already waits is taken at once: awaiting each item would hand the event loop to the HTTP work of
        other requests between items, and under load the wait ran out at ~16 of 32 (seen)."""
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), remaining)
        except TimeoutError:
            return None

    def row_tokens(self, item: Item) -> int:
        """Tokens the item's row feeds a forward pass (`Backbone.row_tokens`): its input and options, past the
        task's source prefix when the prefix KV cache holds it, plus its prompt's n positions when there is no
        cache. A generation row counts its source only, not the tokens it will decode."""
        source, targets = row_texts(item.head, item.example)
        backbone = self.runtime.backbone
        try:
            if self.prefix_cache is not None:
                return backbone.row_tokens(source, targets, cached_prefix=item.head.source_prefix,
                                           tokenizer=self._tokenizer)
            return item.prompt.shape[0] + backbone.row_tokens(source, targets, tokenizer=self._tokenizer)
        except Exception:  # a row the tokenizer refuses fails on the model thread, alone: count it as a full pass
            return self.max_tokens or 0

    def run_batch(self, items: list[Item]) -> list[Prediction | BaseException]:
        """One forward pass (per kind) over items of any number of tasks. If it fails, every item runs on its
        own, so that one bad row (of any task, of any request) fails only itself: each item gets its
        prediction or the error of its own row. The pass's freed memory is then handed back to the OS (at most
        once a second)."""
        try:
            return self._run_isolated(items)
        finally:
            start = time.perf_counter()
            if self._heap.after_pass():
                metrics.HEAP_TRIM_SECONDS.observe(time.perf_counter() - start)

    def _run_isolated(self, items: list[Item]) -> list[Prediction | BaseException]:
        try:
            return list(self._run_batch(items))
        except Exception:
            if len(items) == 1:
                raise
        out: list[Prediction | BaseException] = []
        for item in items:
            try:
                out.extend(self._run_batch([item]))
            except Exception as exc:
                out.append(exc)
        return out

    def _run_batch(self, items: list[Item]) -> list[Prediction]:
        groups: dict[tuple[str, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.key, []).append(i)
        keys = list(groups)
        heads = [items[groups[k][0]].head for k in keys]
        prompts = torch.stack([items[groups[k][0]].prompt for k in keys])
        examples = [[items[i].example for i in groups[k]] for k in keys]
        metrics.PREDICT_BATCH_SIZE.observe(len(items))
        metrics.PREDICT_BATCH_TASKS.observe(len(keys))
        if self.max_tokens is not None:
            metrics.PREDICT_BATCH_TOKENS.observe(sum(item.tokens for item in items))
        if self.prefix_cache is not None:
            kv = self.prefix_cache.stacked(keys, prompts, [h.source_prefix for h in heads])
            answers = predict(self.runtime.backbone, heads, examples, None, prompt_kv=kv)
        else:
            answers = predict(self.runtime.backbone, heads, examples, prompts)
        out: list[Prediction | None] = [None] * len(items)
        for k, per_task in zip(keys, answers, strict=True):
            for i, answer in zip(groups[k], per_task, strict=True):
                out[i] = answer
        return [p for p in out if p is not None]


def decode_prompt(runtime: Runtime, z: np.ndarray) -> Tensor:
    """Proj_b(z): a task's soft prompt [n, d] from its vector z [d_I], on the backbone's device."""
    with torch.no_grad():
        zt = torch.from_numpy(z).to(runtime.backbone.device)[None]
        return runtime.subspace.decode(zt)[0]


def task_head(record: TaskRecord) -> TaskHead:
    """What the model needs of a stored task to answer it: name, kind and labels (cleaned for the prompt)."""
    return TaskHead(clean_text(record.name), TaskKind(record.kind),
                    tuple(clean_text(label) for label in record.labels) if record.labels else None)


async def predict_task_inputs(runtime: Runtime, cache: PromptCache, batcher: MicroBatcher, record: TaskRecord,
                              z: np.ndarray, version: int, inputs: Sequence[str],
                              options: Sequence[Sequence[str]] | None = None) -> list[Prediction]:
    """Answer each input of one trained task (vector `z` at `version`): its prompt from the cache (computed on a
    miss), every input an Item of the micro-batcher. Raises asyncio.QueueFull when too many inputs wait."""
    prompt = await run_in_threadpool(cache.get_or_compute, record.id, version, lambda: decode_prompt(runtime, z))
    head = task_head(record)
    items = [Item((record.id, version), head, prompt, Example(text, "", tuple(options[i]) if options else None))
             for i, text in enumerate(inputs)]
    return await batcher.submit(items)
