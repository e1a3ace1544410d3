"""The prefix KV cache of soft prompts: scores and generations with a prompt's cached keys and values equal
those with the prompt itself, for mixed batches of many tasks, options of different lengths and generation, also
when the cache holds each task's source prefix ("{name}:") after its prompt."""

from __future__ import annotations

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.prompt_kv import PromptKV
from ipt_engine.tasks import TaskKind, source_prefix, to_text_pair

SOURCES = ["the movie was great", "a long and winding review of a film that nobody liked", "ok", "so so"]
OPTIONS = [[" positive", " negative"], [" yes", " no", " maybe not at all"], [" a", " bb bb bb"], [" x", " y"]]


def _prompts(backbone: Backbone, tasks: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, n, backbone.hidden_size, generator=gen) * 0.5


def test_option_scores_with_the_cache_equal_the_scores_with_the_prompts(tiny_causal: Backbone) -> None:
    per_task = _prompts(tiny_causal, 3)
    rows_task = [0, 2, 1, 2]  # rows of three tasks, mixed, one task twice
    prompts = per_task[rows_task]
    kv = tiny_causal.prompt_kv(per_task)  # once per task
    assert kv.batch == 3 and kv.n_prompt == 3
    expected = tiny_causal.score_options(prompts, SOURCES, OPTIONS)
    got = tiny_causal.score_options(None, SOURCES, OPTIONS, prompt_kv=kv.select(rows_task))
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e.log_likelihoods, g.log_likelihoods, atol=1e-4)
        assert torch.equal(e.num_tokens, g.num_tokens)
    # per-task caches computed separately and stacked give the same as one batched computation
    stacked = PromptKV.stack([tiny_causal.prompt_kv(per_task[i:i + 1]) for i in rows_task])
    again = tiny_causal.score_options(None, SOURCES, OPTIONS, prompt_kv=stacked)
    for e, g in zip(expected, again, strict=True):
        assert torch.allclose(e.log_likelihoods, g.log_likelihoods, atol=1e-4)
    # and a different prompt's cache gives different scores (the cache is used, not ignored)
    other = tiny_causal.prompt_kv(_prompts(tiny_causal, 4, seed=1))
    changed = tiny_causal.score_options(None, SOURCES, OPTIONS, prompt_kv=other)
    assert not torch.allclose(changed[0].log_likelihoods, expected[0].log_likelihoods, atol=1e-4)


def test_a_small_token_budget_gives_the_same_scores_with_the_cache(tiny_causal: Backbone) -> None:
    prompts = _prompts(tiny_causal, 4)
    kv = tiny_causal.prompt_kv(prompts)
    expected = tiny_causal.score_options(prompts, SOURCES, OPTIONS)
    budget = tiny_causal.max_batch_tokens
    try:
        tiny_causal.max_batch_tokens = 24  # a forward pass per row or two
        got = tiny_causal.score_options(None, SOURCES, OPTIONS, prompt_kv=kv)
    finally:
        tiny_causal.max_batch_tokens = budget
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e.log_likelihoods, g.log_likelihoods, atol=1e-4)


def test_generation_with_the_cache_equals_generation_with_the_prompts(tiny_causal: Backbone) -> None:
    prompts = _prompts(tiny_causal, 4, seed=2) * 4
    kv = tiny_causal.prompt_kv(prompts)
    expected = tiny_causal.generate(prompts, SOURCES, max_new_tokens=6)
    assert tiny_causal.generate(None, SOURCES, max_new_tokens=6, prompt_kv=kv) == expected
    # one row alone, from a batch's cache
    assert tiny_causal.generate(None, SOURCES[1:2], max_new_tokens=6, prompt_kv=kv.select([1])) == expected[1:2]


def test_cache_sizes_and_refusals(tiny_causal: Backbone, tiny_seq2seq: Backbone) -> None:
    prompts = _prompts(tiny_causal, 2)
    kv = tiny_causal.prompt_kv(prompts)
    config = tiny_causal.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_layer = 2 * 2 * config.num_key_value_heads * 3 * head_dim * 4  # keys + values, 2 rows, n = 3, fp32
    assert kv.nbytes == per_layer * config.num_hidden_layers
    assert [r.nbytes for r in kv.split()] == [kv.nbytes // 2] * 2
    with pytest.raises(ValueError, match="not both"):
        tiny_causal.score_options(prompts, SOURCES[:2], OPTIONS[:2], prompt_kv=kv)
    with pytest.raises(ValueError, match="2 rows for 4 inputs"):
        tiny_causal.generate(None, SOURCES, prompt_kv=kv)
    with pytest.raises(ValueError, match="different shapes"):
        PromptKV.stack([kv, tiny_causal.prompt_kv(_prompts(tiny_causal, 1, n=5))])
    with pytest.raises(ValueError, match="seq2seq"):
        tiny_seq2seq.prompt_kv(torch.zeros(1, 3, tiny_seq2seq.hidden_size))


NAMES = ["sentiment", "a much longer task name of many words", ""]  # source prefixes of 2, many and 1 token(s)


def _prefixed_rows() -> tuple[list[int], list[str]]:
    """Rows of the three tasks, mixed; the last row's source does not start with its task's prefix."""
    rows_task = [1, 0, 2, 1, 0]
    sources = [to_text_pair(NAMES[t], TaskKind.CLASSIFICATION, SOURCES[k % len(SOURCES)]).source
               for k, t in enumerate(rows_task[:-1])]
    return rows_task, [*sources, "no prefix here: " + SOURCES[0]]


def test_source_prefixes_cached_after_the_prompts_give_the_scores_of_the_prompts(tiny_causal: Backbone) -> None:
    per_task = _prompts(tiny_causal, 3)
    rows_task, sources = _prefixed_rows()
    options = [OPTIONS[k % len(OPTIONS)] for k in range(len(sources))]
    kv = tiny_causal.prompt_kv(per_task, [source_prefix(name) for name in NAMES])
    lengths = [len(tiny_causal.tokenizer(source_prefix(name)).input_ids) for name in NAMES]
    assert kv.n_prompt == 3 and kv.lengths == tuple(3 + k for k in lengths) and kv.width == 3 + max(lengths)
    assert len(set(kv.lengths)) == 3  # rows of different widths, padded
    expected = tiny_causal.score_options(per_task[rows_task], sources, options)
    got = tiny_causal.score_options(None, sources, options, prompt_kv=kv.select(rows_task))
    stacked = PromptKV.stack([tiny_causal.prompt_kv(per_task[t:t + 1], [source_prefix(NAMES[t])]) for t in rows_task])
    again = tiny_causal.score_options(None, sources, options, prompt_kv=stacked)
    for e, g, a in zip(expected, got, again, strict=True):
        assert torch.allclose(e.log_likelihoods, g.log_likelihoods, atol=1e-4)
        assert torch.allclose(e.log_likelihoods, a.log_likelihoods, atol=1e-4)
        assert torch.equal(e.num_tokens, g.num_tokens)
    # the cached prefix positions are used (not recomputed): spoil them, and only the rows that skip them change
    spoiled = PromptKV(tuple(k.clone() for k in kv.keys), tuple(v.clone() for v in kv.values), kv.n_prompt,
                       kv.source_prefixes)
    for v in spoiled.values:
        v[:, :, kv.n_prompt:] += 1.0
    changed = tiny_causal.score_options(None, sources, options, prompt_kv=spoiled.select(rows_task))
    moved = [not torch.allclose(e.log_likelihoods, c.log_likelihoods, atol=1e-4)
             for e, c in zip(expected, changed, strict=True)]
    assert moved == [True, True, True, True, False]


def test_generation_with_cached_source_prefixes_equals_generation_with_the_prompts(tiny_causal: Backbone) -> None:
    per_task = _prompts(tiny_causal, 3, seed=2) * 4
    rows_task, sources = _prefixed_rows()
    kv = tiny_causal.prompt_kv(per_task, [source_prefix(name) for name in NAMES]).select(rows_task)
    expected = tiny_causal.generate(per_task[rows_task], sources, max_new_tokens=6)
    assert tiny_causal.generate(None, sources, max_new_tokens=6, prompt_kv=kv) == expected


def test_split_and_stack_keep_each_rows_own_positions(tiny_causal: Backbone) -> None:
    kv = tiny_causal.prompt_kv(_prompts(tiny_causal, 3), [source_prefix(name) for name in NAMES])
    rows = kv.split()
    assert [r.width for r in rows] == list(kv.lengths)  # no padding kept per row
    assert sum(r.nbytes for r in rows) < kv.nbytes
    back = PromptKV.stack(rows)
    assert back.source_prefixes == kv.source_prefixes
    for a, b in zip(back.keys, kv.keys, strict=True):
        assert torch.equal(a, b)  # padding positions are zeros in both
    mixed = PromptKV.stack([kv.select([0, 1]), rows[2]])  # a two-row part (padded inside) and a row of its own
    assert all(torch.equal(a, b) for a, b in zip((*mixed.keys, *mixed.values), (*kv.keys, *kv.values), strict=True))
    assert kv.prompt_only().width == 3 and kv.prompt_only().lengths == (3, 3, 3)
    assert kv.select([2, 2]).width == kv.lengths[2]  # trimmed to the widest selected row
    with pytest.raises(ValueError, match="2 source prefixes for 3 prompts"):
        tiny_causal.prompt_kv(_prompts(tiny_causal, 3), NAMES[:2])


def test_a_batch_filled_in_place_equals_its_rows_stacked(tiny_causal: Backbone) -> None:
    """`empty_like` + `place` (rows written where they belong, in any order) gives what `stack` gives, and a row
    is refused where the batch was sized for another source prefix."""
    kv = tiny_causal.prompt_kv(_prompts(tiny_causal, 3), [source_prefix(name) for name in NAMES])
    rows = kv.split()
    order = [2, 0, 1]
    batch = PromptKV.empty_like(rows[0], [kv.source_prefixes[i] for i in order])
    for t in (*batch.keys, *batch.values):
        t.fill_(float("nan"))  # uninitialised memory: every position must be written
    batch.place([1, 2], kv.select([0, 1]))  # a padded part into scattered rows
    batch.place([0], rows[2])
    expected = PromptKV.stack([rows[i] for i in order])
    assert batch.source_prefixes == expected.source_prefixes and batch.width == expected.width
    assert all(torch.equal(a, b) for a, b in zip((*batch.keys, *batch.values), (*expected.keys, *expected.values),
                                                 strict=True))
    if kv.source_prefixes[0] != kv.source_prefixes[2]:
        with pytest.raises(ValueError, match="source prefixes"):
            batch.place([0], rows[0])
    with pytest.raises(ValueError, match="cannot place 2 rows"):
        batch.place([0], kv.select([0, 1]))


def test_a_tokenizer_that_ends_every_text_with_eos_still_shares_the_prefix(tiny_causal: Backbone) -> None:
    """The cached prefix is what sources starting with it keep: not the EOS such a tokenizer ends "name:" with."""
    from tokenizers import processors

    from ipt_engine.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("</s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    assert tok("sentiment:").input_ids[-1] == eos
    plain, tiny_causal.tokenizer = tiny_causal.tokenizer, tok
    try:
        prompts = _prompts(tiny_causal, 1)
        kv = tiny_causal.prompt_kv(prompts, ["sentiment:"])
        assert kv.source_prefixes == (tuple(tok("sentiment:").input_ids[:-1]),)
        sources = [to_text_pair("sentiment", TaskKind.CLASSIFICATION, SOURCES[0]).source]
        expected = tiny_causal.score_options(prompts, sources, OPTIONS[:1])
        got = tiny_causal.score_options(None, sources, OPTIONS[:1], prompt_kv=kv)
        assert torch.allclose(expected[0].log_likelihoods, got[0].log_likelihoods, atol=1e-4)
    finally:
        tiny_causal.tokenizer = plain


def test_a_forward_on_the_cache_reads_its_tensors_uncopied_and_leaves_them_unchanged(tiny_causal: Backbone) -> None:
    prompts = _prompts(tiny_causal, 4, seed=3)
    kv = tiny_causal.prompt_kv(prompts, [source_prefix(f"task{i}") for i in range(4)])
    held = [t.clone() for t in (*kv.keys, *kv.values)]
    cache = kv.to_cache()
    assert [layer.keys.data_ptr() for layer in cache.layers] == [k.data_ptr() for k in kv.keys]
    assert cache.get_seq_length() == kv.width
    # a scoring pass's cache hands attention the cached positions and the new ones, and keeps only the cached
    new = torch.ones(4, kv.keys[0].shape[1], 2, kv.keys[0].shape[3])
    read_only = kv.to_cache(grow=False)
    keys, values = read_only.update(new, new, 0)
    assert keys.shape[2] == values.shape[2] == kv.width + 2 and torch.equal(keys[:, :, :kv.width], kv.keys[0])
    assert read_only.get_seq_length() == kv.width and read_only.layers[0].keys is kv.keys[0]
    cache.update(new, new, 0)
    assert cache.get_seq_length() == kv.width + 2  # a decoding pass's cache grows
    assert kv.select(range(4)) is kv  # rows in place: no copy
    assert kv.select([1, 0, 2, 3]) is not kv
    sources = [to_text_pair(f"task{i}", TaskKind.CLASSIFICATION, s).source for i, s in enumerate(SOURCES)]
    first = tiny_causal.score_options(None, sources, OPTIONS, prompt_kv=kv)
    again = tiny_causal.score_options(None, sources, OPTIONS, prompt_kv=kv)
    tiny_causal.generate(None, sources, max_new_tokens=3, prompt_kv=kv)
    assert all(torch.equal(a, b) for a, b in zip(held, (*kv.keys, *kv.values), strict=True))
    expected = tiny_causal.score_options(prompts, sources, OPTIONS)
    for e, f, g in zip(expected, first, again, strict=True):
        assert torch.allclose(e.log_likelihoods, f.log_likelihoods, atol=1e-4)
        assert torch.equal(f.log_likelihoods, g.log_likelihoods)
