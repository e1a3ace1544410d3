"""Micro-batching: rows of many tasks in one forward pass give the same answers as one task at a time;
the prompt cache is keyed by (task, version) and bounded."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.tasks import Example, TaskHead, TaskKind
from service.predictor import Item, MicroBatcher, PromptCache
from service.runtime import Runtime


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


def test_prompt_cache_is_keyed_by_version_and_bounded() -> None:
    cache = PromptCache(capacity=2)
    calls = []

    def make(value: float):  # type: ignore[no-untyped-def]
        return lambda: calls.append(value) or torch.full((1,), value)

    assert float(cache.get_or_compute("t", 1, make(1.0))) == 1.0
    assert float(cache.get_or_compute("t", 1, make(9.0))) == 1.0  # a hit
    assert float(cache.get_or_compute("t", 2, make(2.0))) == 2.0  # retrained: never the stale prompt
    assert len(cache) == 1
    cache.get_or_compute("u", 1, make(3.0))
    cache.get_or_compute("v", 1, make(4.0))
    assert len(cache) == 2 and calls == [1.0, 2.0, 3.0, 4.0]


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
