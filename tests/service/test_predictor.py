"""Micro-batching: rows of many tasks in one forward pass give the same answers as one task at a time;
the prompt cache is keyed by (task, version) and bounded."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.tasks import Example, TaskHead, TaskKind
from service import metrics
from service.app import prefix_cache_for
from service.predictor import Item, MicroBatcher, PromptCache
from service.prefix_cache import MISSES_PER_PASS, PrefixKVCache
from service.runtime import Runtime
from service.settings import Settings


def _runtime(bb: Backbone) -> Runtime:
    return Runtime(bb, IntrinsicSubspace(SubspaceConfig(2, bb.hidden_size, 4, 8)), "test", 0.0)


def test_mixed_task_batch_equals_single_task_batches(tiny_causal: Backbone) -> None:
    batcher = MicroBatcher(_runtime(tiny_causal), max_size=32, max_wait_s=0.001)
    cls = TaskHead("sentiment", TaskKind.CLASSIFICATION, ("positive", "negative"))
    gen = TaskHead("echo", TaskKind.GENERATION)
    mc = TaskHead("pick", TaskKind.MULTIPLE_CHOICE)
    prompts = [torch.randn(2, tiny_causal.hidden_size) for _ in range(3)]
    items = [
        Item(("a", 1), cls, prompts[0], Example("the movie was great", "")),
        Item(("b", 1), gen, prompts[1], Example("repeat: hello", "")),
        Item(("c", 1), mc, prompts[2], Example("which colour?", "", ("red", "blue", "green"))),
        Item(("a", 1), cls, prompts[0], Example("the food was awful", "")),
        Item(("b", 1), gen, prompts[1], Example("repeat: world", "")),
    ]
    mixed = batcher.run_batch(items)
    for item, got in zip(items, mixed, strict=True):
        (alone,) = batcher.run_batch([item])
        assert got.output == alone.output
        if got.probabilities is not None:
            assert torch.allclose(torch.tensor(got.probabilities), torch.tensor(alone.probabilities), atol=1e-5)


def _mixed_items(bb: Backbone, version: int = 1) -> list[Item]:
    cls = TaskHead("sentiment", TaskKind.CLASSIFICATION, ("positive", "negative", "rather mixed"))
    gen = TaskHead("echo", TaskKind.GENERATION)
    mc = TaskHead("pick", TaskKind.MULTIPLE_CHOICE)
    gen_seed = torch.Generator().manual_seed(7)
    prompts = [torch.randn(2, bb.hidden_size, generator=gen_seed) for _ in range(3)]
    return [
        Item(("a", version), cls, prompts[0], Example("the movie was great", "")),
        Item(("b", version), gen, prompts[1], Example("repeat: hello", "")),
        Item(("c", version), mc, prompts[2], Example("which colour?", "", ("red", "blue", "dark green"))),
        Item(("a", version), cls, prompts[0], Example("the food was awful and the service slow", "")),
        Item(("b", version), gen, prompts[1], Example("repeat: world", "")),
    ]


def _counter(metric, label: str | None = None) -> float:  # type: ignore[no-untyped-def]
    return (metric.labels(label) if label else metric)._value.get()


def test_prefix_cache_gives_the_answers_of_the_prompts(tiny_causal: Backbone) -> None:
    """Each task's prompt keys and values computed once and reused: the same outputs, probabilities and scores
    (1e-4) as running the prompts, for a batch mixing classification, generation and multiple choice."""
    runtime = _runtime(tiny_causal)
    plain = MicroBatcher(runtime, max_size=32, max_wait_s=0.001)
    cache = PrefixKVCache(tiny_causal, max_bytes=2**20)
    cached = MicroBatcher(runtime, max_size=32, max_wait_s=0.001, prefix_cache=cache)
    items = _mixed_items(tiny_causal)
    misses, hits = _counter(metrics.PREFIX_CACHE, "miss"), _counter(metrics.PREFIX_CACHE, "hit")
    expected = plain.run_batch(items)
    for _ in range(2):  # first all misses, then all hits
        got = cached.run_batch(items)
        for e, g in zip(expected, got, strict=True):
            assert e.output == g.output
            for a, b in ((e.probabilities, g.probabilities), (e.scores, g.scores)):
                if a is not None:
                    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    assert _counter(metrics.PREFIX_CACHE, "miss") - misses == 3 and _counter(metrics.PREFIX_CACHE, "hit") - hits == 3
    # each entry holds its task's prompt and source prefix ("{name}:") positions
    held = [tiny_causal.prompt_kv(items[i].prompt[None], [items[i].head.source_prefix]).nbytes for i in (0, 1, 2)]
    prompt_only = tiny_causal.prompt_kv(items[0].prompt[None]).nbytes
    assert len(cache) == 3 and cache.nbytes == sum(held) and min(held) > prompt_only


def test_prefix_cache_entries_are_keyed_by_the_source_prefix_too(tiny_causal: Backbone) -> None:
    prompts = torch.randn(1, 2, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(5))
    cache = PrefixKVCache(tiny_causal, max_bytes=2**20)
    first = cache.stacked([("a", 1)], prompts, ["sentiment:"])
    assert ("a", 1) in cache and first.source_prefixes == (tuple(tiny_causal.tokenizer("sentiment:").input_ids),)
    # the same task and version with another source prefix is not served the old entry, which it replaces
    other = cache.stacked([("a", 1)], prompts, ["a renamed task:"])
    assert other.source_prefixes == (tuple(tiny_causal.tokenizer("a renamed task:").input_ids),)
    assert len(cache) == 1 and cache.nbytes == other.nbytes
    assert cache.stacked([("a", 1)], prompts).width == 2  # no prefix: the prompt alone
    with pytest.raises(ValueError, match="2 source prefixes for 1 tasks"):
        cache.stacked([("a", 1)], prompts, ["x:", "y:"])


def test_many_missing_tasks_are_computed_a_few_per_pass_with_the_same_keys_and_values(tiny_causal: Backbone) -> None:
    tasks = MISSES_PER_PASS + 5
    prompts = torch.randn(tasks, 2, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(6))
    names = [f"task number {'x' * (i % 4)}:" for i in range(tasks)]  # prefixes of different lengths
    expected = tiny_causal.prompt_kv(prompts, names)  # all in one pass
    passes = []
    original = tiny_causal.prompt_kv

    def counted(p: torch.Tensor, prefixes: list[str] | None = None) -> object:
        passes.append(p.shape[0])
        return original(p, prefixes)

    cache = PrefixKVCache(tiny_causal, max_bytes=2**30)
    tiny_causal.prompt_kv = counted  # type: ignore[method-assign]
    try:
        got = cache.stacked([(f"t{i}", 1) for i in range(tasks)], prompts, names)
    finally:
        del tiny_causal.prompt_kv
    assert passes == [MISSES_PER_PASS, 5] and len(cache) == tasks
    for entry in cache._items.values():  # each kept entry owns its tensors: none pins a pass's whole batch
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in (*entry.keys, *entry.values))
    assert got.source_prefixes == expected.source_prefixes and got.width == expected.width
    for a, b in zip((*got.keys, *got.values), (*expected.keys, *expected.values), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_batch_of_cached_and_missing_tasks_equals_the_prompts_run_at_once(tiny_causal: Backbone) -> None:
    """Hits and misses interleaved, misses over more than one pass, prefixes of different lengths and an entry
    pushed out while the batch is filled: every row holds its own task's keys and values, zero-padded."""
    tasks = MISSES_PER_PASS + 7
    prompts = torch.randn(tasks, 2, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(11))
    names = [f"task {'y' * (i % 5)}:" for i in range(tasks)]
    expected = tiny_causal.prompt_kv(prompts, names)
    one = max(r.nbytes for r in expected.split())
    cache = PrefixKVCache(tiny_causal, max_bytes=(tasks - 3) * one)  # full before the batch ends: entries go
    held = list(range(1, tasks, 3))  # every third task cached beforehand, the rest missing
    cache.stacked([(f"t{i}", 1) for i in held], prompts[held], [names[i] for i in held])
    hits = _counter(metrics.PREFIX_CACHE, "hit")
    got = cache.stacked([(f"t{i}", 1) for i in range(tasks)], prompts, names)
    assert _counter(metrics.PREFIX_CACHE, "hit") - hits == len(held)
    assert got.source_prefixes == expected.source_prefixes and got.width == expected.width
    for a, b in zip((*got.keys, *got.values), (*expected.keys, *expected.values), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert cache.nbytes <= cache.max_bytes


def test_prefix_cache_is_bounded_in_bytes_and_never_stale(tiny_causal: Backbone) -> None:
    items = _mixed_items(tiny_causal)
    prompts = torch.stack([items[i].prompt for i in (0, 1, 2)])
    one = tiny_causal.prompt_kv(prompts[:1]).nbytes
    cache = PrefixKVCache(tiny_causal, max_bytes=2 * one)
    evictions, rejected = _counter(metrics.PREFIX_CACHE_EVICTIONS), _counter(metrics.PREFIX_CACHE_REJECTED)
    got = cache.stacked([("a", 1), ("b", 1), ("c", 1)], prompts)  # three in a batch, two fit
    assert got.batch == 3  # the one not kept still serves its row
    # "c" was asked for no more often than "a", the entry it would push out: not kept
    assert len(cache) == 2 and ("c", 1) not in cache and cache.nbytes == 2 * one
    assert _counter(metrics.PREFIX_CACHE_REJECTED) - rejected == 1
    cache.stacked([("c", 1)], prompts[2:])  # asked for again: now more often than "a", which goes
    assert ("c", 1) in cache and ("a", 1) not in cache and len(cache) == 2
    assert _counter(metrics.PREFIX_CACHE_EVICTIONS) - evictions == 1
    assert metrics.PREFIX_CACHE_BYTES._value.get() == 2 * one
    # a retrained task (new version) replaces its entry: the old keys and values are never served again
    other = torch.randn(1, 2, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(9))
    new = cache.stacked([("b", 2)], other)
    assert ("b", 1) not in cache and ("b", 2) in cache
    assert torch.allclose(new.keys[0], tiny_causal.prompt_kv(other).keys[0])
    # off (0 bytes): computed for the batch, kept nowhere
    off = PrefixKVCache(tiny_causal, max_bytes=0)
    off.stacked([("a", 1)], prompts[:1])
    assert len(off) == 0 and off.nbytes == 0


def test_prefix_cache_keeps_serving_a_cycle_larger_than_itself(tiny_causal: Backbone) -> None:
    """Round-robin over twice as many tasks as the cache holds: plain LRU would evict each entry before its next
    use and never hit; with admission by lookup count the entries held stay, and the second pass hits on them."""
    prompts = torch.randn(8, 2, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(3))
    one = tiny_causal.prompt_kv(prompts[:1]).nbytes
    cache = PrefixKVCache(tiny_causal, max_bytes=4 * one)
    hits = _counter(metrics.PREFIX_CACHE, "hit")
    for _ in range(3):
        for k in range(8):
            cache.stacked([(f"t{k}", 1)], prompts[k:k + 1])
    assert _counter(metrics.PREFIX_CACHE, "hit") - hits == 2 * 4  # passes 2 and 3: the 4 tasks held
    assert len(cache) == 4 and cache.nbytes == 4 * one
    # a task that becomes hot gets in once asked for more often than the least recently used entry (3 lookups)
    for _ in range(3):
        cache.stacked([("hot", 1)], prompts[:1])
    assert ("hot", 1) not in cache
    cache.stacked([("hot", 1)], prompts[:1])
    assert ("hot", 1) in cache and ("t0", 1) not in cache and len(cache) == 4


def test_seq2seq_backbones_run_without_a_prefix_cache(tiny_seq2seq: Backbone, tiny_causal: Backbone) -> None:
    with pytest.raises(ValueError, match="attends both ways"):
        PrefixKVCache(tiny_seq2seq, 2**20)
    assert prefix_cache_for(_runtime(tiny_seq2seq), Settings()) is None
    assert prefix_cache_for(_runtime(tiny_causal), Settings(prefix_cache_bytes=0)) is None
    assert prefix_cache_for(_runtime(tiny_causal), Settings()).max_bytes == 448 * 2**20  # the CPU default


def test_prompt_cache_is_keyed_by_version_and_bounded() -> None:
    cache = PromptCache(capacity=2)
    calls = []

    def make(value: float):  # type: ignore[no-untyped-def]
        return lambda: calls.append(value) or torch.full((1,), value)

    assert float(cache.get_or_compute("t", 1, make(1.0))) == 1.0
    assert float(cache.get_or_compute("t", 1, make(9.0))) == 1.0  # a hit
    assert float(cache.get_or_compute("t", 2, make(2.0))) == 2.0  # retrained: never the stale prompt
    assert len(cache) == 1
    assert cache.nbytes == 4  # one float32
    cache.get_or_compute("u", 1, make(3.0))
    cache.get_or_compute("v", 1, make(4.0))
    assert len(cache) == 2 and calls == [1.0, 2.0, 3.0, 4.0]
    assert cache.nbytes == 8  # "t" evicted: its bytes went with it
    assert float(cache.get_or_compute("t", 2, make(5.0))) == 5.0  # evicted, so computed again
    cache.get_or_compute("v", 2, make(6.0))  # retrained while held: one version of "v" only
    assert len(cache) == 2 and cache.nbytes == 8 and calls[-2:] == [5.0, 6.0]
    assert float(cache.get_or_compute("t", 2, make(7.0))) == 5.0  # still held: "u" went first


class _RecordingBatcher(MicroBatcher):
    """The real batcher, remembering how many items each forward pass got."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def run_batch(self, items: list[Item]):  # type: ignore[no-untyped-def]
        self.sizes.append(len(items))
        return super().run_batch(items)


def test_items_already_waiting_fill_the_batch_without_waiting(tiny_causal: Backbone) -> None:
    """40 items queued at once with no wait allowed: forwards of 32 and 8, not 40 of one (under load the
    HTTP work between awaited items used to run out the wait at about half a batch)."""
    head = TaskHead("sentiment", TaskKind.CLASSIFICATION, ("positive", "negative"))
    prompt = torch.randn(2, tiny_causal.hidden_size)
    items = [Item(("a", 1), head, prompt, Example(f"the movie was number {i}", "")) for i in range(40)]

    async def scenario() -> list[int]:
        batcher = _RecordingBatcher(_runtime(tiny_causal), max_size=32, max_wait_s=0.0)
        batcher.start()
        answers = await batcher.submit(items)
        await batcher.stop()
        assert len(answers) == 40
        return batcher.sizes

    assert asyncio.run(scenario()) == [32, 8]


def test_a_poisoned_row_fails_only_itself(tiny_causal: Backbone) -> None:
    """A row the model cannot take (a lone surrogate reaches the tokenizer, as an input that bypassed the API's
    validation would), batched with good rows of the same task and of another: the good rows are answered as
    if alone, only the poisoned row gets an error; through the micro-batcher, only its request fails."""
    batcher = MicroBatcher(_runtime(tiny_causal), max_size=32, max_wait_s=0.05)
    cls = TaskHead("sentiment", TaskKind.CLASSIFICATION, ("positive", "negative"))
    prompt = torch.randn(2, tiny_causal.hidden_size)
    good = [Item(("a", 1), cls, prompt, Example(text, "")) for text in ("the movie was great", "it was awful")]
    other = Item(("b", 1), cls, torch.randn(2, tiny_causal.hidden_size), Example("fine", ""))
    poisoned = Item(("a", 1), cls, prompt, Example("bad \ud800 row", ""))
    with pytest.raises((UnicodeError, TypeError, ValueError)):  # the row does fail on its own
        batcher._run_batch([poisoned])
    results = batcher.run_batch([good[0], poisoned, other, good[1]])
    assert isinstance(results[1], Exception)
    for got, item in zip((results[0], results[2], results[3]), (good[0], other, good[1]), strict=True):
        (alone,) = batcher.run_batch([item])
        assert not isinstance(got, BaseException) and got.output == alone.output

    async def concurrent() -> list[object]:
        batcher.start()
        try:
            return await asyncio.gather(batcher.submit(good), batcher.submit([poisoned]), batcher.submit([other]),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    answered_good, failed, answered_other = asyncio.run(concurrent())
    assert isinstance(failed, Exception)
    assert isinstance(answered_good, list) and len(answered_good) == 2
    assert isinstance(answered_other, list) and len(answered_other) == 1


def test_a_token_budget_closes_batches_by_what_their_rows_feed_the_model(tiny_causal: Backbone) -> None:
    """With IPT_BATCH_MAX_TOKENS a batch closes before the item that would pass the budget, which opens the next
    one; an item larger than the budget still runs (alone); answers equal those of a batcher without a budget.
    With the prefix KV cache a row costs fewer tokens (no prompt, no "{name}:"), so more rows share a pass."""
    head = TaskHead("sentiment", TaskKind.CLASSIFICATION, ("positive", "negative"))
    prompt = torch.randn(2, tiny_causal.hidden_size)
    texts = ["the movie was great"] * 12 + ["a very long review " * 6, "short"]
    items = [Item(("a", 1), head, prompt, Example(text, "")) for text in texts]
    runtime = _runtime(tiny_causal)
    per_row = MicroBatcher(runtime, 32, 0.0, max_tokens=1).row_tokens(items[0])
    source = f"sentiment: {texts[0]}\nAnswer:"
    assert per_row == 2 + tiny_causal.row_tokens(source, [" positive", " negative"])  # prompt n = 2

    async def scenario(batcher: _RecordingBatcher) -> tuple[list[int], list[object]]:
        batcher.start()
        answers = await batcher.submit([Item(i.key, i.head, i.prompt, i.example) for i in items])
        await batcher.stop()
        return batcher.sizes, answers

    sizes, answers = asyncio.run(scenario(_RecordingBatcher(runtime, 32, 0.0, max_tokens=3 * per_row + 1)))
    assert sizes == [3, 3, 3, 3, 1, 1]  # 12 rows of per_row tokens, then the long one alone, then "short"
    _, unbounded = asyncio.run(scenario(_RecordingBatcher(runtime, 32, 0.0)))
    assert [a.output for a in answers] == [a.output for a in unbounded]  # type: ignore[attr-defined]
    cached = _RecordingBatcher(runtime, 32, 0.0, prefix_cache=PrefixKVCache(tiny_causal, 10**8),
                               max_tokens=3 * per_row + 1)
    assert cached.row_tokens(items[0]) < per_row - 2
    cached_sizes, _ = asyncio.run(scenario(cached))
    assert cached_sizes[0] > 3
