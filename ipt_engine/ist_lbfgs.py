"""IST with full-batch L-BFGS: a second-order optimiser for a parameter vector of 5 to 250 floats.

AdamW moves every coordinate of z by about its step size per step, whatever the curvature, and samples a few
rows per step from a train set of only 32 to 64 rows. Here each task's loss is the mean over *all* its train
rows (a deterministic function of z), and L-BFGS with a strong-Wolfe line search steps along curvature-scaled
directions; dev is evaluated after every iteration and the best z (dev score, ties to the lower dev loss) is
kept, as in `ipt_engine.training`.

Tasks run one after another, each alone, so batching tasks cannot change what a task gets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ipt_engine.backbone import Backbone
from ipt_engine.evaluation import evaluate
from ipt_engine.ist import ISTResult
from ipt_engine.subspace import ProjB
from ipt_engine.tasks import Task
from ipt_engine.training import check_trainable, mean_dev_losses


@dataclass(frozen=True)
class LBFGSConfig:
    """Settings of full-batch L-BFGS IST."""

    max_iterations: int = 15  # L-BFGS iterations (each: one direction, a strong-Wolfe line search along it)
    patience: int = 5  # iterations without a dev improvement before a task stops
    history_size: int = 10  # curvature pairs L-BFGS keeps
    max_rows_per_forward: int = 64  # a task's train rows are split into accumulated micro-batches
    max_new_tokens: int = 32  # greedy decoding length when evaluating generation tasks

    def __post_init__(self) -> None:
        for name in ("max_iterations", "patience", "history_size", "max_rows_per_forward"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def lbfgs_subspace_tune(backbone: Backbone, tasks: Sequence[Task], proj_b: ProjB, config: LBFGSConfig,
                        initial_z: Tensor | None = None) -> list[ISTResult]:
    """IST of each task with full-batch L-BFGS from `initial_z` ([num_tasks, d_I], default zeros).

    Returns one ISTResult per task, in order; `steps` counts L-BFGS iterations and the history has one entry
    per evaluation (iteration 0 is the start)."""
    check_trainable(tasks)
    d_i = proj_b.config.d_intrinsic
    if initial_z is None:
        initial_z = torch.zeros(len(tasks), d_i)
    if tuple(initial_z.shape) != (len(tasks), d_i):
        raise ValueError(f"initial_z must be [{len(tasks)}, {d_i}], got {tuple(initial_z.shape)}")
    home, was_training = next(proj_b.parameters()).device, proj_b.training
    was_trainable = [p.requires_grad for p in proj_b.parameters()]
    proj_b.to(backbone.device).eval().requires_grad_(False)
    try:
        return [_tune_one(backbone, task, proj_b, config, initial_z[i]) for i, task in enumerate(tasks)]
    finally:
        for p, flag in zip(proj_b.parameters(), was_trainable, strict=True):
            p.requires_grad_(flag)
        proj_b.to(home).train(was_training)


def _tune_one(backbone: Backbone, task: Task, proj_b: ProjB, config: LBFGSConfig, start: Tensor) -> ISTResult:
    began = time.perf_counter()
    z = nn.Parameter(start.detach().float().clone().to(backbone.device))
    pairs = [task.text_pair(e) for e in task.train]
    # one iteration per step() so that dev is evaluated after each; the curvature history persists across steps
    optimizer = torch.optim.LBFGS([z], lr=1.0, max_iter=1, history_size=config.history_size,
                                  line_search_fn="strong_wolfe")

    def train_loss(backward: bool) -> Tensor:
        """The mean per-row loss over every train row (with its gradient in z.grad when `backward`)."""
        total = torch.zeros((), device=backbone.device)
        for s in range(0, len(pairs), config.max_rows_per_forward):
            chunk = pairs[s:s + config.max_rows_per_forward]
            prompts = proj_b(z[None]).expand(len(chunk), -1, -1)
            ll, count = backbone.target_log_likelihood(prompts, [p.source for p in chunk], [p.target for p in chunk])
            loss = -(ll / count.clamp(min=1)).sum() / len(pairs)
            if backward:
                loss.backward()
            total = total + loss.detach()
        return total

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        return train_loss(backward=True)

    def evaluate_dev() -> tuple[float, float]:
        with torch.no_grad():
            prompt = proj_b(z.detach()[None])
            score = evaluate(backbone, [task], prompt, "dev", max_new_tokens=config.max_new_tokens)[0]
            return score, mean_dev_losses(backbone, [task], prompt)[0]

    score, dev_loss = evaluate_dev()
    best = (score, -dev_loss, 0, z.detach().clone())
    history: list[dict[str, float | None]] = [{"step": 0, "train_loss": None, "dev_loss": dev_loss, "dev": score,
                                                "norm": float(z.detach().norm())}]
    error, iteration, since_best = None, 0, 0
    for iteration in range(1, config.max_iterations + 1):
        optimizer.step(closure)
        with torch.no_grad():
            loss = float(train_loss(backward=False))  # at the new z (step() returns the loss before it)
        if not math.isfinite(loss) or not bool(torch.isfinite(z.detach()).all()):
            error = f"loss became {loss} at L-BFGS iteration {iteration}; the best z so far was kept"
            break
        score, dev_loss = evaluate_dev()
        history.append({"step": iteration, "train_loss": loss, "dev_loss": dev_loss, "dev": score,
                        "norm": float(z.detach().norm())})
        if (score, -dev_loss) > best[:2]:
            best, since_best = (score, -dev_loss, iteration, z.detach().clone()), 0
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    return ISTResult(task.name, best[3].cpu(), best[0], iteration, best[2], time.perf_counter() - began, error,
                     history)
