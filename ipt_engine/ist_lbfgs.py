"""IST with full-batch L-BFGS: a second-order optimiser for a parameter vector of 5 to 250 floats.

AdamW moves every coordinate of z by about its step size per step, whatever the curvature, and samples a few
rows per step from a train set of only 32 to 64 rows. Here each task's loss is the mean over *all* its train
rows (a deterministic function of z), and L-BFGS with a strong-Wolfe line search steps along curvature-scaled
directions; dev is evaluated after every iteration and the z with the lowest dev loss is kept
(`ipt_engine.ist_full_batch`).

Tasks run one after another, each alone, so batching tasks cannot change what a task gets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ipt_engine.backbone import Backbone
from ipt_engine.device import check_train_precision, train_autocast_dtype
from ipt_engine.ist import ISTResult
from ipt_engine.ist_full_batch import DevSelection, TrainObjective, check_initial_z, run_per_task
from ipt_engine.subspace import ProjB
from ipt_engine.tasks import Task
from ipt_engine.training import EvalHook, check_trainable


@dataclass(frozen=True)
class LBFGSConfig:
    """Settings of full-batch L-BFGS IST."""

    max_iterations: int = 15  # L-BFGS iterations (each: one direction, a strong-Wolfe line search along it)
    patience: int = 5  # iterations without a lower dev loss before a task stops
    history_size: int = 10  # curvature pairs L-BFGS keeps
    option_loss: bool = True  # tasks with answer options: cross-entropy over the options (see TrainObjective)
    max_rows_per_forward: int = 64  # a task's train rows are split into accumulated micro-batches
    max_new_tokens: int = 32  # greedy decoding length when evaluating generation tasks
    train_precision: str = "auto"  # the train passes' autocast (ipt_engine.device.train_autocast_dtype)

    def __post_init__(self) -> None:
        check_train_precision(self.train_precision)
        for name in ("max_iterations", "patience", "history_size", "max_rows_per_forward"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def lbfgs_subspace_tune(backbone: Backbone, tasks: Sequence[Task], proj_b: ProjB, config: LBFGSConfig,
                        initial_z: Tensor | None = None, on_evaluate: EvalHook | None = None) -> list[ISTResult]:
    """IST of each task with full-batch L-BFGS from `initial_z` ([num_tasks, d_I], default zeros).

    Returns one ISTResult per task, in order; `steps` counts L-BFGS iterations and the history has one entry
    per evaluation (iteration 0 is the start). The kept z is the one with the lowest dev loss."""
    check_trainable(tasks)
    starts = check_initial_z(initial_z, len(tasks), proj_b.config.d_intrinsic)
    autocast = train_autocast_dtype(config.train_precision, backbone.device, backbone.dtype)

    def tune_one(index: int, task: Task) -> ISTResult:
        objective = TrainObjective(backbone, task, proj_b, config.max_rows_per_forward, config.option_loss,
                                   autocast)
        selection = DevSelection(backbone, task, proj_b, patience=config.patience,
                                 max_new_tokens=config.max_new_tokens, option_loss=config.option_loss,
                                 task_index=index, on_evaluate=on_evaluate)
        return _tune_one(objective, selection, config, starts[index])

    return run_per_task(backbone, tasks, proj_b, tune_one)


def _tune_one(objective: TrainObjective, selection: DevSelection, config: LBFGSConfig, start: Tensor) -> ISTResult:
    z = nn.Parameter(start.detach().float().clone())
    # one iteration per step() so that dev is evaluated after each; the curvature history persists across steps
    optimizer = torch.optim.LBFGS([z], lr=1.0, max_iter=1, history_size=config.history_size,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        losses, grads = objective.row_losses_and_grads(z.detach())
        z.grad = grads.mean(0)
        return losses.mean()

    stop = selection.observe(0, z.detach(), None)
    iteration = 0
    while not stop and iteration < config.max_iterations:
        iteration += 1
        optimizer.step(closure)
        loss = float(objective.row_losses(z.detach()).mean())  # at the new z (step() returns the loss before it)
        if not math.isfinite(loss) or not bool(torch.isfinite(z.detach()).all()):
            selection.error = f"loss became {loss} at L-BFGS iteration {iteration}; the best z so far was kept"
            break
        stop = selection.observe(iteration, z.detach(), loss)
    return selection.result(iteration)
