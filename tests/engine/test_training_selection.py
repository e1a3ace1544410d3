"""Selection and stopping as a study needs them: patience counted in steps, dev-score ties broken by dev loss,
and a per-task history of every evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ipt_engine.backbone import Backbone
from ipt_engine.ist import intrinsic_subspace_tune
from ipt_engine.subspace import ProjB, SubspaceConfig
from ipt_engine.training import PromptParameters, TrainConfig, _SelectionState
from tests.conftest import make_task


class _Table(PromptParameters):
    """Per-task parameters with one scalar per task: enough to see which row selection keeps."""

    def __init__(self, num: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(num, 1))

    @property
    def task_table(self) -> nn.Parameter:
        return self.table


def test_a_tie_of_the_dev_score_goes_to_the_lower_dev_loss() -> None:
    params, state = _Table(1), _SelectionState(1)
    config = TrainConfig(patience=2)
    for step, value, score, loss in ((0, 0.0, 0.5, 2.0), (4, 1.0, 0.5, 1.5), (8, 2.0, 0.5, 1.8), (12, 3.0, 0.25, 0.1)):
        params.table.data.fill_(value)
        state.update(params, [0], [score], step, config, [loss])
    assert state.best_step == [4] and state.best_loss == [1.5] and state.best_score == [0.5]
    state.restore(params)
    assert params.table.detach().item() == 1.0
    # without dev losses a tie is no progress: the first of the tied evaluations is kept
    params, plain = _Table(1), _SelectionState(1)
    for step, value, score in ((0, 0.0, 0.5), (4, 1.0, 0.5)):
        params.table.data.fill_(value)
        plain.update(params, [0], [score], step, TrainConfig(patience=5))
    assert plain.best_step == [0] and plain.best_loss == [math.inf]


@pytest.mark.parametrize(("patience", "patience_steps", "stops_at"), [(2, None, 8), (100, 10, 12), (100, 12, 16)])
def test_patience_counts_evaluations_or_steps(patience: int, patience_steps: int | None, stops_at: int) -> None:
    """Best at step 2, then evaluations at steps 4, 8, 12 and 16 that never beat it. Counted in evaluations,
    patience 2 stops at the second evaluation without progress (step 8); counted in steps, a task stops at the
    first evaluation at least `patience_steps` steps after its best (10: step 12; 12: step 16)."""
    params, state = _Table(1), _SelectionState(1)
    config = TrainConfig(patience=patience, patience_steps=patience_steps)
    stopped = None
    for step, score in ((0, 0.1), (2, 0.9), (4, 0.5), (8, 0.5), (12, 0.5), (16, 0.5)):
        state.update(params, [0], [score], step, config)
        if not state.active and stopped is None:
            stopped = step
    assert stopped == stops_at and state.best_step == [2]


def test_ist_keeps_a_history_of_every_evaluation(tiny_causal: Backbone) -> None:
    proj_b = ProjB(SubspaceConfig(2, tiny_causal.hidden_size, 3, 8))
    tasks = [make_task("a"), make_task("b")]
    config = TrainConfig(learning_rate=0.5, max_steps=6, batch_size=4, eval_every=2, patience=10, dev_loss=True)
    results = intrinsic_subspace_tune(tiny_causal, tasks, proj_b, config)
    for r in results:
        assert [h["step"] for h in r.history] == [0, 2, 4, 6]
        assert r.history[0]["train_loss"] is None and r.history[0]["norm"] == 0.0  # z starts at 0
        assert all(h["train_loss"] > 0 and h["dev_loss"] > 0 for h in r.history[1:])
        assert r.history[-1]["norm"] > 0  # z moved
        best = next(h for h in r.history if h["step"] == r.best_step)
        assert best["dev"] == pytest.approx(r.dev_score)
        assert abs(float(r.z.norm()) - best["norm"]) < 1e-5  # the kept z is the one of the best evaluation
    # the history is the task's own: training it alone gives the same entries
    alone = intrinsic_subspace_tune(tiny_causal, tasks[:1], proj_b, config)[0]
    for a, b in zip(alone.history, results[0].history, strict=True):
        assert a["dev"] == pytest.approx(b["dev"]) and a["norm"] == pytest.approx(b["norm"], abs=1e-5)
        assert (a["dev_loss"] is None) == (b["dev_loss"] is None)
        if a["dev_loss"] is not None:
            assert a["dev_loss"] == pytest.approx(b["dev_loss"], abs=1e-4)
