"""Batched prediction over several tasks at once, each with its own prompt."""

from __future__ import annotations

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.errors import InvalidTaskError
from ipt_engine.evaluation import evaluate, predict, predict_with_prompts, row_groups
from ipt_engine.tasks import Example, TaskKind
from tests.conftest import make_task


def test_mixed_tasks_predict_like_separate_calls(tiny_causal: Backbone) -> None:
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE), make_task("c", TaskKind.GENERATION)]
    prompts = torch.randn(3, 2, tiny_causal.hidden_size)
    together = predict(tiny_causal, tasks, [t.dev for t in tasks], prompts, max_new_tokens=3)
    for i, task in enumerate(tasks):
        alone = predict(tiny_causal, [task], [task.dev], prompts[i:i + 1], max_new_tokens=3)[0]
        assert [p.output for p in together[i]] == [p.output for p in alone]
        for a, b in zip(together[i], alone, strict=True):
            if a.probabilities is not None:
                assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    assert together[0][0].options == ("positive", "negative") and together[2][0].probabilities is None
    scores = evaluate(tiny_causal, tasks, prompts, "dev", max_new_tokens=3)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)


def test_prediction_without_options_is_a_clear_error(tiny_causal: Backbone) -> None:
    task = make_task("mc", TaskKind.MULTIPLE_CHOICE)
    with pytest.raises(InvalidTaskError, match="0 answer option"):
        predict(tiny_causal, [task], [[Example("which?", "x")]], None)


def test_predict_with_prompts_runs_each_prompt_once_and_answers_the_same(tiny_causal: Backbone) -> None:
    """The prompt's keys and values computed once per task give the answers of the prompt run with every row,
    also when the tasks are split into several groups (max_rows)."""
    tasks = [make_task("a", n=10), make_task("b", TaskKind.MULTIPLE_CHOICE, n=8), make_task("c", TaskKind.GENERATION),
             make_task("d", n=12)]
    prompts = torch.randn(4, 2, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(0)) * 2
    examples = [t.train for t in tasks]  # 8, 6, 4 and 10 rows
    plain = predict(tiny_causal, tasks, examples, prompts, max_new_tokens=3)
    for max_rows in (256, 9, 1):
        cached = predict_with_prompts(tiny_causal, tasks, examples, prompts, max_new_tokens=3, max_rows=max_rows)
        for p_task, c_task in zip(plain, cached, strict=True):
            assert [p.output for p in p_task] == [c.output for c in c_task]
            for p, c in zip(p_task, c_task, strict=True):
                if p.scores is not None:
                    assert c.scores == pytest.approx(p.scores, abs=1e-4)
                    assert c.probabilities == pytest.approx(p.probabilities, abs=1e-4)
    # the prompts matter: other prompts give other scores
    other = predict_with_prompts(tiny_causal, tasks, examples, -prompts, max_new_tokens=3)
    assert other[0][0].scores != pytest.approx(plain[0][0].scores, abs=1e-4)
    with pytest.raises(ValueError, match="4 tasks but 3 prompts"):
        predict_with_prompts(tiny_causal, tasks, examples, prompts[:3])


def test_predict_with_prompts_on_a_seq2seq_backbone_takes_the_plain_path(tiny_seq2seq: Backbone) -> None:
    tasks = [make_task("a"), make_task("c", TaskKind.GENERATION)]
    prompts = torch.randn(2, 2, tiny_seq2seq.hidden_size)
    plain = predict(tiny_seq2seq, tasks, [t.dev for t in tasks], prompts, max_new_tokens=3)
    again = predict_with_prompts(tiny_seq2seq, tasks, [t.dev for t in tasks], prompts, max_new_tokens=3)
    assert [[p.output for p in ps] for ps in plain] == [[p.output for p in ps] for ps in again]


def test_row_groups_keep_order_and_bound_the_rows() -> None:
    assert row_groups([3, 4, 2, 10, 1], 7) == [[0, 1], [2], [3], [4]]
    assert row_groups([3, 4, 2, 10, 1], 100) == [[0, 1, 2, 3, 4]]
    assert row_groups([], 5) == []
