"""Every option of a row scored in the row's one pass: the packed layout, and the same scores under each attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.option_packing import pack_rows, packed_width

SOURCES = ["the movie was great", "a long and winding review of a film that nobody liked", "ok"]
OPTIONS = [[" positive", " negative"], [" yes", " no", " maybe not at all"], [" a", " bb bb bb"]]


def test_options_sit_after_their_source_and_never_see_each_other() -> None:
    packed = pack_rows([[11, 12, 13], [21]], [[(0, [31, 32]), (1, [41, 42, 43])], [(2, [51])]], pad_id=0)
    assert packed.width == packed_width([11, 12, 13], [[31, 32], [41, 42, 43]]) == 3 + 1 + 2
    assert packed.ids.tolist() == [[11, 12, 13, 31, 41, 42], [21, 0, 0, 0, 0, 0]]
    # each option's tokens take the positions right after the source, as if it were alone
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 3, 4]
    a = packed.allowed[0]
    assert a[2, :3].all() and not a[2, 3:].any()  # the last source token sees the source only
    assert a[3, :4].all() and not a[3, 4:].any()  # option 1 sees the source and itself
    assert a[5, :3].all() and not a[5, 3] and a[5, 4:6].all()  # option 2 never sees option 1
    assert packed.allowed[1, 3].tolist() == [False, False, False, True, False, False]  # padding: itself only
    # first tokens come from the last source column, later ones from the option's own columns
    picks = list(zip(packed.pick_row.tolist(), packed.pick_col.tolist(), packed.pick_token.tolist(),
                     packed.pick_pair.tolist(), strict=True))
    assert picks == [(0, 2, 31, 0), (0, 3, 32, 0), (0, 2, 41, 1), (0, 4, 42, 1), (0, 5, 43, 1), (1, 0, 51, 2)]
    mask = packed.attention_mask(2, prompt_queries=True)
    assert mask.shape == (2, 1, 8, 8) and mask[0, 0, 0].tolist() == [True] + [False] * 7  # the prompt is causal
    assert mask[0, 0, 2:, :2].all()  # every column sees the whole prompt
    assert packed.attention_mask(2, prompt_queries=False).shape == (2, 1, 6, 8)


def test_eager_attention_gives_the_scores_of_sdpa(tiny_causal: Backbone, tiny_model_dirs: dict[str, Path]) -> None:
    eager = Backbone.load(str(tiny_model_dirs["llama"]), device="cpu")
    eager.model.set_attn_implementation("eager")
    assert eager.model.config._attn_implementation == "eager"
    prompts = torch.randn(3, 4, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(0))
    with_sdpa = tiny_causal.score_options(prompts, SOURCES, OPTIONS)
    for a, b in zip(with_sdpa, eager.score_options(prompts, SOURCES, OPTIONS), strict=True):
        torch.testing.assert_close(a.log_likelihoods, b.log_likelihoods, atol=1e-4, rtol=0)


def test_an_empty_input_on_a_prompt_cache_is_refused(tiny_causal: Backbone) -> None:
    prompts = torch.randn(1, 3, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(1))
    with_prompts = tiny_causal.score_options(prompts, [""], [[" a", " b"]])  # scored from the prompt's last position
    assert torch.isfinite(with_prompts[0].log_likelihoods).all()
    with pytest.raises(ValueError, match="empty input cannot be scored on a prompt cache"):
        tiny_causal.score_options(None, [""], [[" a", " b"]], prompt_kv=tiny_causal.prompt_kv(prompts))


@pytest.mark.parametrize("seed", range(4))
def test_random_rows_score_as_their_full_sequences(tiny_causal: Backbone, seed: int) -> None:
    """Rows of random lengths with 1 to 5 options of 1 to 6 words, in one pass or cut by a small budget, with the
    prompts or their cache: every option's log-likelihood equals that of its whole sequence scored alone."""
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "the", "a", "cat", "runs", "fast", "slowly", "over", "under", "42", "news"]
    sources = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(5)]
    options = [[" " + " ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 5))]
               for _ in sources]
    prompts = torch.randn(len(sources), 3, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(seed))
    budget = tiny_causal.max_batch_tokens
    try:
        tiny_causal.max_batch_tokens = rng.choice([8192, 40])
        scored = tiny_causal.score_options(prompts, sources, options)
        cached = tiny_causal.score_options(None, sources, options, prompt_kv=tiny_causal.prompt_kv(prompts))
    finally:
        tiny_causal.max_batch_tokens = budget
    for i, opts in enumerate(options):
        alone, count = tiny_causal.target_log_likelihood(prompts[i:i + 1].expand(len(opts), -1, -1),
                                                         [sources[i]] * len(opts), opts)
        torch.testing.assert_close(scored[i].log_likelihoods, alone.detach(), atol=1e-4, rtol=0)
        torch.testing.assert_close(cached[i].log_likelihoods, alone.detach(), atol=1e-4, rtol=0)
        assert torch.equal(scored[i].num_tokens, count)
