"""Backbone: frozen weights, per-row soft prompts, batching invariance, scoring, generation, truncation."""

from __future__ import annotations

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.errors import BackboneLoadError, InputTruncatedWarning
from ipt_engine.option_packing import packed_width

SOURCES_A = ["sentiment: the movie was great\nAnswer:", "sentiment: the food was awful\nAnswer:"]
SOURCES_B = ["topic: rain tomorrow and sun\nAnswer:", "topic: the team won the match yesterday\nAnswer:",
             "topic: hello\nAnswer:"]
OPTIONS_A = [[" positive", " negative"]] * 2
OPTIONS_B = [[" weather", " sports", " food news"]] * 3


def _prompts(backbone: Backbone, rows: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, backbone.hidden_size, generator=gen) * 0.5


def test_backbone_is_frozen_and_in_eval_mode(tiny_backbone: Backbone) -> None:
    assert not tiny_backbone.model.training
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())


def test_gradients_reach_only_the_prompts(tiny_backbone: Backbone) -> None:
    prompts = _prompts(tiny_backbone, 2).requires_grad_(True)
    ll, count = tiny_backbone.target_log_likelihood(prompts, SOURCES_A, [" positive", " negative"])
    assert ll.shape == (2,) and bool((count > 0).all())
    (-ll.sum()).backward()
    assert prompts.grad is not None and bool((prompts.grad.abs().sum(dim=(1, 2)) > 0).all())
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_mixed_task_batch_equals_single_task_batches(tiny_backbone: Backbone) -> None:
    """Rows of two tasks (two prompts) in one batch score exactly as in two single-task batches."""
    pa, pb = _prompts(tiny_backbone, 1, seed=1), _prompts(tiny_backbone, 1, seed=2)
    alone_a = tiny_backbone.score_options(pa.expand(2, -1, -1), SOURCES_A, OPTIONS_A)
    alone_b = tiny_backbone.score_options(pb.expand(3, -1, -1), SOURCES_B, OPTIONS_B)
    order = [("b", 0), ("a", 0), ("b", 1), ("b", 2), ("a", 1)]  # interleaved on purpose
    src = {"a": SOURCES_A, "b": SOURCES_B}
    opts = {"a": OPTIONS_A, "b": OPTIONS_B}
    prompt = {"a": pa[0], "b": pb[0]}
    mixed = tiny_backbone.score_options(torch.stack([prompt[t] for t, _ in order]),
                                        [src[t][i] for t, i in order], [opts[t][i] for t, i in order])
    alone = {"a": alone_a, "b": alone_b}
    for (task, i), got in zip(order, mixed, strict=True):
        torch.testing.assert_close(got.log_likelihoods, alone[task][i].log_likelihoods, atol=1e-4, rtol=0)
        assert torch.equal(got.num_tokens, alone[task][i].num_tokens)
    # and the training loss agrees too
    ll_mixed, _ = tiny_backbone.target_log_likelihood(torch.stack([prompt["a"], prompt["b"]]),
                                                      [SOURCES_A[0], SOURCES_B[1]], [" positive", " sports"])
    ll_a, _ = tiny_backbone.target_log_likelihood(pa, SOURCES_A[:1], [" positive"])
    ll_b, _ = tiny_backbone.target_log_likelihood(pb, SOURCES_B[1:2], [" sports"])
    torch.testing.assert_close(ll_mixed, torch.cat([ll_a, ll_b]).detach(), atol=1e-4, rtol=0)


def test_prompt_changes_the_scores(tiny_backbone: Backbone) -> None:
    a = tiny_backbone.score_options(_prompts(tiny_backbone, 2, seed=1), SOURCES_A, OPTIONS_A)
    b = tiny_backbone.score_options(_prompts(tiny_backbone, 2, seed=2), SOURCES_A, OPTIONS_A)
    assert not torch.allclose(a[0].log_likelihoods, b[0].log_likelihoods)


def test_scoring_packs_rows_into_few_forward_passes(tiny_causal: Backbone) -> None:
    calls = []  # the embedding layer runs once per forward pass
    handle = tiny_causal.model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    budget = tiny_causal.max_batch_tokens
    try:
        tiny_causal.score_options(None, SOURCES_B, OPTIONS_B)
        assert len(calls) == 1  # 3 rows x 3 options fit the budget: one pass scores every option of every row
        calls.clear()
        tiny_causal.max_batch_tokens = 40
        tiny_causal.score_options(None, SOURCES_B, OPTIONS_B)
        assert len(calls) > 1  # a small budget splits them
    finally:
        tiny_causal.max_batch_tokens = budget
        handle.remove()


def test_option_probabilities_are_a_distribution(tiny_backbone: Backbone) -> None:
    scores = tiny_backbone.score_options(None, SOURCES_B, OPTIONS_B)
    for s in scores:
        probs = s.probabilities()
        assert probs.shape == (3,) and abs(float(probs.sum()) - 1) < 1e-5
        # the probability of each option's whole sequence, renormalised over the options
        seq = s.log_likelihoods.double().exp()  # float64: totals of -200 nats still have a value
        assert torch.allclose(probs.double(), seq / seq.sum(), atol=1e-6)
        assert s.best() == int(s.scores().argmax()) and s.best(False) == int(probs.argmax())
        assert not torch.equal(s.scores(True), s.scores(False))  # option lengths differ


def test_generation_is_batch_invariant(tiny_backbone: Backbone) -> None:
    prompts = _prompts(tiny_backbone, 3, seed=3)
    together = tiny_backbone.generate(prompts, SOURCES_B, max_new_tokens=6)
    alone = [tiny_backbone.generate(prompts[i:i + 1], SOURCES_B[i:i + 1], max_new_tokens=6)[0] for i in range(3)]
    assert together == alone
    assert all(isinstance(t, str) for t in together)


def test_greedy_generation_matches_transformers_generate(tiny_causal: Backbone) -> None:
    ids = tiny_causal.tokenizer(SOURCES_B[0], return_tensors="pt").input_ids
    ref = tiny_causal.model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5,
                                     pad_token_id=tiny_causal.tokenizer.pad_token_id, eos_token_id=None)
    expected = tiny_causal.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()
    eos = tiny_causal._eos
    tiny_causal._eos = None  # generate exactly 5 tokens, as the reference does
    try:
        assert tiny_causal.generate(None, SOURCES_B[:1], max_new_tokens=5) == [expected]
    finally:
        tiny_causal._eos = eos


def test_long_input_is_cut_from_the_left_with_a_warning(tiny_causal: Backbone) -> None:
    long_source = "word " * 400 + "END\nAnswer:"
    before = tiny_causal.truncated_inputs
    with pytest.warns(InputTruncatedWarning, match="cut from the left"):
        ll, _ = tiny_causal.target_log_likelihood(_prompts(tiny_causal, 1), [long_source], [" positive"])
    assert torch.isfinite(ll).all()
    assert tiny_causal.truncated_inputs == before + 1
    with pytest.warns(InputTruncatedWarning):
        (row,) = tiny_causal._tokenize(0, long_source, [" positive"], n_prompt=4)
    assert 4 + row.length <= tiny_causal.max_length
    assert tiny_causal.tokenizer.decode(row.source).endswith("END\nAnswer:")  # the end survives


def test_long_input_is_cut_for_seq2seq_too(tiny_seq2seq: Backbone) -> None:
    with pytest.warns(InputTruncatedWarning):
        out = tiny_seq2seq.score_options(None, ["word " * 400], [[" a", " b"]])
    assert out[0].log_likelihoods.shape == (2,)


def test_bad_prompt_shape_is_rejected(tiny_causal: Backbone) -> None:
    with pytest.raises(ValueError, match=r"prompts must have shape \[batch=2"):
        tiny_causal.score_options(torch.zeros(3, 4, tiny_causal.hidden_size), SOURCES_A, OPTIONS_A)
    with pytest.raises(ValueError, match="d="):
        tiny_causal.generate(torch.zeros(2, 4, tiny_causal.hidden_size + 1), SOURCES_A)


def test_dtype_is_configurable(tiny_model_dirs: dict) -> None:
    bb = Backbone.load(str(tiny_model_dirs["llama"]), device="cpu", dtype="bfloat16")
    assert bb.dtype == torch.bfloat16
    ll, _ = bb.target_log_likelihood(torch.zeros(1, 2, bb.hidden_size), SOURCES_A[:1], [" positive"])
    assert ll.dtype == torch.float32 and torch.isfinite(ll).all()


def test_unknown_backbone_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(BackboneLoadError, match="could not load backbone"):
        Backbone.load(str(tmp_path / "no-such-model"))


def test_option_scores_equal_the_full_sequence_log_likelihood(tiny_backbone: Backbone) -> None:
    """Scoring every option of a row in its one packed pass gives the same numbers as scoring each full sequence."""
    prompts = _prompts(tiny_backbone, 3, seed=4)
    options = [[" weather", " sports", " food news today"], [" a"], [" sports", " weather report"]]
    scored = tiny_backbone.score_options(prompts, SOURCES_B, options)
    for i, opts in enumerate(options):
        ll, count = tiny_backbone.target_log_likelihood(prompts[i:i + 1].expand(len(opts), -1, -1),
                                                        [SOURCES_B[i]] * len(opts), opts)
        torch.testing.assert_close(scored[i].log_likelihoods, ll.detach(), atol=1e-4, rtol=0)
        assert torch.equal(scored[i].num_tokens, count)


def test_long_input_is_cut_once_per_row_when_scoring_options(tiny_causal: Backbone) -> None:
    before = tiny_causal.truncated_inputs
    with pytest.warns(InputTruncatedWarning) as record:
        tiny_causal.score_options(None, ["word " * 400 + "END\nAnswer:"], [[" a", " b", " c d e f"]])
    # count our warning by its category: pytest.warns records every warning raised inside the block
    truncations = [w for w in record if issubclass(w.category, InputTruncatedWarning)]
    assert tiny_causal.truncated_inputs == before + 1 and len(truncations) == 1


def test_rows_without_options_or_input_are_rejected(tiny_causal: Backbone) -> None:
    with pytest.raises(ValueError, match=r"rows \[1\] have no answer options"):
        tiny_causal.score_options(None, SOURCES_A, [[" a", " b"], []])
    assert tiny_causal.score_options(None, [], []) == []
    # an empty input with no prompt is conditioned on BOS rather than scored from a padding position
    ll, count = tiny_causal.target_log_likelihood(None, [""], [" positive"])
    assert torch.isfinite(ll).all() and int(count[0]) > 0


def test_a_small_token_budget_gives_the_same_scores(tiny_causal: Backbone) -> None:
    prompts = _prompts(tiny_causal, 3, seed=5)
    full = tiny_causal.score_options(prompts, SOURCES_B, OPTIONS_B)
    budget = tiny_causal.max_batch_tokens
    try:
        for small in (1, 20, 60):
            tiny_causal.max_batch_tokens = small
            chunked = tiny_causal.score_options(prompts, SOURCES_B, OPTIONS_B)
            for a, b in zip(full, chunked, strict=True):
                torch.testing.assert_close(a.log_likelihoods, b.log_likelihoods, atol=1e-4, rtol=0)
    finally:
        tiny_causal.max_batch_tokens = budget


def test_rows_of_mixed_lengths_train_in_length_sorted_passes(tiny_causal: Backbone) -> None:
    """With a token budget smaller than the padded batch, target log-likelihoods (the training loss) come from
    several forward passes of similar lengths: the same values and the same gradients as one padded pass."""
    sources = ["a", "a much longer source sentence with many words in it", "mid length one", "b"]
    targets = [" x", " a longer target", " y", " zz zz"]
    base = _prompts(tiny_causal, 4, seed=6)
    results = []
    budget = tiny_causal.max_batch_tokens
    try:
        for small in (budget, 30):
            tiny_causal.max_batch_tokens = small
            prompts = base.clone().requires_grad_(True)
            ll, count = tiny_causal.target_log_likelihood(prompts, sources, targets)
            (ll * torch.arange(1, 5)).sum().backward()  # a different weight per row: rows must not be swapped
            results.append((ll.detach(), count, prompts.grad))
    finally:
        tiny_causal.max_batch_tokens = budget
    (ll_one, count_one, grad_one), (ll_split, count_split, grad_split) = results
    torch.testing.assert_close(ll_one, ll_split, atol=1e-4, rtol=0)
    assert torch.equal(count_one, count_split)
    torch.testing.assert_close(grad_one, grad_split, atol=1e-4, rtol=1e-4)


def test_row_tokens_counts_what_a_scoring_pass_feeds(tiny_causal: Backbone) -> None:
    """`row_tokens` (what the service's token budget counts) equals the packed width the backbone feeds: the
    source, and each option's tokens with EOS less the last; a cached source prefix is not fed again."""
    cases = [("sentiment: the movie was great\nAnswer:", [" positive", " negative"]),
             ("pick: which colour?\nAnswer:", [" red", " blue", " dark green"]),
             ("echo: repeat hello\nAnswer:", None)]
    for source, options in cases:
        rows = tiny_causal._tokenize(0, source, options or [], 0)
        fed = packed_width(rows[0].source, [r.target for r in rows]) if options else len(rows[0].source)
        assert tiny_causal.row_tokens(source, options) == fed
        prefix = source.split(" ")[0]
        skipped = len(tiny_causal._source_prefix_ids(prefix))
        assert tiny_causal.row_tokens(source, options, cached_prefix=prefix) == fed - skipped


def test_scores_and_gradients_are_the_same_when_the_head_runs_a_few_positions_at_a_time(
        tiny_causal: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    import ipt_engine.backbone as backbone_module

    sources = ["the movie was great", "a long and winding review of a film", "ok"]
    options = [[" positive", " negative"], [" yes", " no", " maybe not at all"], [" a", " bb bb bb"]]
    base = torch.randn(3, 2, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(4))

    def scored() -> tuple[torch.Tensor, torch.Tensor]:
        prompts = base.clone().requires_grad_()
        sums, _ = tiny_causal.option_log_likelihoods(prompts, sources, options)
        sums.sum().backward()
        assert prompts.grad is not None
        return sums.detach(), prompts.grad

    whole, whole_grad = scored()
    monkeypatch.setattr(backbone_module, "HEAD_COLUMNS", 3)  # many slices of the scored positions
    sliced, sliced_grad = scored()
    assert torch.allclose(whole, sliced, atol=1e-5) and torch.allclose(whole_grad, sliced_grad, atol=1e-5)
