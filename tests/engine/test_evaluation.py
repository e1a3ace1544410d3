"""Batched prediction over several tasks at once, each with its own prompt."""

from __future__ import annotations

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.errors import InvalidTaskError
from ipt_engine.evaluation import evaluate, predict
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
