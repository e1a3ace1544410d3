"""Full-batch L-BFGS IST on a tiny random backbone: it lowers the full train loss, keeps the best-dev z with
its history, runs each task alone (batching cannot change a task's result), and validates its inputs."""

from __future__ import annotations

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.ist_lbfgs import LBFGSConfig, lbfgs_subspace_tune
from ipt_engine.subspace import ProjB, SubspaceConfig
from ipt_engine.tasks import TaskKind
from tests.conftest import make_task, train_loss


@pytest.fixture(scope="module")
def proj_b(tiny_causal: Backbone) -> ProjB:
    torch.manual_seed(0)
    return ProjB(SubspaceConfig(2, tiny_causal.hidden_size, 4, 16))


def test_lbfgs_lowers_the_full_train_loss_and_records_it(tiny_causal: Backbone, proj_b: ProjB) -> None:
    task = make_task("gen", TaskKind.GENERATION, n=8)
    (r,) = lbfgs_subspace_tune(tiny_causal, [task], proj_b, LBFGSConfig(max_iterations=4, patience=10,
                                                                        max_new_tokens=4))
    start = train_loss(tiny_causal, task, proj_b(torch.zeros(1, 4)).detach())
    assert [h["step"] for h in r.history] == list(range(5)) and r.steps == 4
    losses = [h["train_loss"] for h in r.history[1:]]
    assert losses[-1] < start - 0.05  # L-BFGS with a strong-Wolfe line search never accepts a worse point
    assert all(b <= a + 1e-5 for a, b in zip([start, *losses], losses, strict=False))
    assert train_loss(tiny_causal, task, proj_b(r.z[None]).detach()) < start  # the kept z fits better
    best = r.history[r.best_step]
    assert best["dev"] == pytest.approx(r.dev_score) and abs(float(r.z.norm()) - best["norm"]) < 1e-5
    assert r.error is None and r.z.device.type == "cpu"


def test_each_task_gets_what_it_gets_alone(tiny_causal: Backbone, proj_b: ProjB) -> None:
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE)]
    config = LBFGSConfig(max_iterations=2, patience=10)
    together = lbfgs_subspace_tune(tiny_causal, tasks, proj_b, config)
    for i, task in enumerate(tasks):
        (alone,) = lbfgs_subspace_tune(tiny_causal, [task], proj_b, config)
        assert torch.allclose(together[i].z, alone.z, atol=1e-6) and together[i].dev_score == alone.dev_score
        assert [h["train_loss"] for h in together[i].history] == pytest.approx(
            [h["train_loss"] for h in alone.history], abs=1e-6)


def test_proj_b_is_left_as_it_was_and_inputs_are_checked(tiny_causal: Backbone, proj_b: ProjB) -> None:
    before = {k: v.clone() for k, v in proj_b.state_dict().items()}
    proj_b.train()
    lbfgs_subspace_tune(tiny_causal, [make_task()], proj_b, LBFGSConfig(max_iterations=1))
    assert proj_b.training and all(torch.equal(before[k], v) for k, v in proj_b.state_dict().items())
    assert all(p.requires_grad for p in proj_b.parameters())
    with pytest.raises(ValueError, match="initial_z"):
        lbfgs_subspace_tune(tiny_causal, [make_task()], proj_b, LBFGSConfig(), initial_z=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="max_iterations"):
        LBFGSConfig(max_iterations=0)
