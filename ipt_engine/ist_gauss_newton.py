"""IST with damped Gauss-Newton (Levenberg-Marquardt) steps in the d_I dimensions of z.

z has 5 to 250 coordinates, so second-order steps are cheap to solve; what costs is the model. Each
iteration takes one forward and one backward pass over a task's whole train set (32 to 64 rows), which gives
every row's loss and every row's gradient g_i = d loss_i / dz ([N, d_I], `TrainObjective`). With the mean
gradient g and the (empirical Fisher) curvature F = G^T G / N, the step solves

    (F + lambda * D) delta = -g,        D = J^T J,   J = d Proj_b(z) / dz   ([n*d, d_I]),

so the damping measures a step by how far it moves the *prompt* (D is the metric Proj_b induces on z, plus
a small multiple of the identity for directions that do not move the prompt): a whitened parametrisation
of z. lambda adapts (Nielsen's rule): a step that lowers the train loss is taken and lambda shrinks as far as
the quadratic model predicted the decrease well; a step that does not is refused (z stays) and lambda grows.
Far from a fit the empirical Fisher overstates the curvature (steps of a few tenths in |z| that barely moved
dev), so a taken step that achieved at least half its first-order decrease doubles the next step's scale (up
to `max_scale`), and a refused one shrinks it back before lambda grows.
The gradient at a taken step comes from the same pass that measured its loss, so an accepted iteration costs
one forward-backward, and dev (`DevSelection`) is evaluated after each taken step.

With answer options the exact Gauss-Newton matrix of the option loss is available instead of F
(`curvature="ggn"`, `TrainObjective.row_losses_grads_and_ggn`: K - 1 backward passes for K options). Measured
on the category task from z = 0 with the 12-task subspace (1 thread, bfloat16): it reached train loss 0.355 at
iteration 11 against the empirical Fisher's 0.337, at 1.4x the time per iteration, so the slow tail is not the
curvature estimate's doing; the empirical Fisher stays the default.

Where to start matters as much as how to step: `start_candidates` (e.g. z = 0 and the subspace's known task
vectors) are scored by their train loss on a few rows, with forward passes only, and the best one is the
start. Tasks run one after another, each alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ipt_engine.backbone import Backbone
from ipt_engine.device import check_train_precision, train_autocast_dtype
from ipt_engine.ist import ISTResult
from ipt_engine.ist_full_batch import DevSelection, TrainObjective, check_initial_z, run_per_task
from ipt_engine.subspace import ProjB
from ipt_engine.tasks import Task
from ipt_engine.training import EvalHook, check_trainable

log = logging.getLogger(__name__)


CURVATURES = ("ggn", "fisher")


@dataclass(frozen=True)
class GaussNewtonConfig:
    """Settings of Levenberg-Marquardt IST."""

    max_iterations: int = 12  # forward-backward passes over the train set (taken and refused steps)
    patience: int = 4  # iterations without a lower dev loss before a task stops
    damping: float = 1.0  # the first lambda, relative to trace(F) / trace(D)
    max_scale: float = 64.0  # steps may grow to this multiple of the damped Gauss-Newton step while the
    # train loss falls at least half as much as its first-order prediction
    tolerance: float = 1e-3  # stop when the model predicts a decrease below this (nats per token)
    start_rows: int = 16  # train rows scoring the best start candidates (forward only; see choose_start)
    option_loss: bool = True  # tasks with answer options: cross-entropy over the options (see TrainObjective)
    max_rows_per_forward: int = 64  # a task's train rows are split into micro-batches
    max_new_tokens: int = 32  # greedy decoding length when evaluating generation tasks
    train_precision: str = "auto"  # the train passes' autocast (ipt_engine.device.train_autocast_dtype); dev is
    # scored in the model's dtype
    curvature: str = "fisher"  # "ggn": the option loss's exact Gauss-Newton matrix (K - 1 backward passes for K
    # options); "fisher": the empirical Fisher G^T G / N (one backward pass). Generation tasks, and tasks with
    # more than `max_ggn_options` options, use the empirical Fisher
    max_ggn_options: int = 5

    def __post_init__(self) -> None:
        check_train_precision(self.train_precision)
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {list(CURVATURES)}, got {self.curvature!r}")
        for name in ("max_iterations", "patience", "start_rows", "max_rows_per_forward", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("damping", "tolerance"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")


def gauss_newton_subspace_tune(backbone: Backbone, tasks: Sequence[Task], proj_b: ProjB, config: GaussNewtonConfig,
                               *, initial_z: Tensor | None = None, start_candidates: Tensor | None = None,
                               on_evaluate: EvalHook | None = None) -> list[ISTResult]:
    """IST of each task with Levenberg-Marquardt steps. Returns one ISTResult per task, in order.

    Args:
        initial_z: [num_tasks, d_I] fixed starts (default zeros); mutually exclusive with start_candidates.
        start_candidates: [k, d_I] starts every task chooses from, by train loss on `config.start_rows` rows.
        on_evaluate: called after each dev evaluation with (iteration, {task index: dev score}); a task whose
            index it returns stops (its result carries STOPPED_BY_REQUEST).
    Each result's `steps` counts iterations (forward-backward passes); its history has one entry per dev
    evaluation: step, train_loss, dev_loss, dev, norm (|z|), seconds (since the task began), damping."""
    check_trainable(tasks)
    d_i = proj_b.config.d_intrinsic
    if initial_z is not None and start_candidates is not None:
        raise ValueError("give initial_z or start_candidates, not both")
    if start_candidates is not None and (start_candidates.dim() != 2 or start_candidates.shape[0] == 0
                                         or start_candidates.shape[1] != d_i):
        raise ValueError(f"start_candidates must be [k >= 1, d_I={d_i}], got {tuple(start_candidates.shape)}")
    starts = check_initial_z(initial_z, len(tasks), d_i)
    autocast = train_autocast_dtype(config.train_precision, backbone.device, backbone.dtype)

    def tune_one(index: int, task: Task) -> ISTResult:
        objective = TrainObjective(backbone, task, proj_b, config.max_rows_per_forward, config.option_loss,
                                   autocast)
        start = starts[index] if start_candidates is None else choose_start(objective, start_candidates,
                                                                            config.start_rows)
        selection = DevSelection(backbone, task, proj_b, patience=config.patience,
                                 max_new_tokens=config.max_new_tokens, option_loss=config.option_loss,
                                 task_index=index, on_evaluate=on_evaluate)
        return _tune_one(objective, selection, proj_b, config, start)

    return run_per_task(backbone, tasks, proj_b, tune_one)


def choose_start(objective: TrainObjective, candidates: Tensor, max_rows: int, keep: int = 8,
                 screen_above: int = 16) -> Tensor:
    """The candidate z ([k, d_I] rows) with the lowest mean train loss over `max_rows` train rows spread over the
    train set: [d_I]. Forward passes only. Up to `screen_above` candidates are all scored on those rows. More (a
    subspace may ship ~100 task vectors) are screened first on half of them, and only the `keep` best, with the
    first two candidates (z = 0 and the mean, in `start_candidates`' order) whatever they scored, go on to the
    full set: a screen on a few rows is noisy, and z = 0 and the mean are the starts that need no luck."""
    if candidates.shape[0] == 1:
        return candidates[0].float()
    alive = list(range(candidates.shape[0]))
    rounds = [max(4, max_rows // 2), max_rows] if len(alive) > screen_above else [max_rows]
    for number, round_rows in enumerate(rounds):
        rows = objective.spread_rows(round_rows)
        losses = {i: float(objective.losses_at(candidates[i].float(), rows).mean()) for i in alive}
        ranked = sorted(alive, key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
        log.info("IST start candidates, train loss on %d rows: best %s of %d", len(rows),
                 [round(losses[i], 3) for i in ranked[:keep]], len(losses))
        alive = ranked if number == len(rounds) - 1 else sorted(set(ranked[:keep]) | {0, 1})
    return candidates[alive[0]].float()


def prompt_metric(proj_b: ProjB, z: Tensor) -> Tensor:
    """D = J^T J with J = d Proj_b(z) / dz: [d_I, d_I], plus 1e-6 * trace(D) / d_I on the diagonal (so that it
    is positive definite). |delta|_D is how far a step delta moves the flattened prompt, to first order."""
    up, out = proj_b.up.weight.detach().double().cpu(), proj_b.out.weight.detach().double().cpu()
    # Proj_b(z) = W_out tanh(W_up z + b_up) + b_out, so J = W_out diag(1 - tanh^2(h)) W_up
    slope = 1 - torch.tanh(up @ z.detach().double().cpu() + proj_b.up.bias.detach().double().cpu()) ** 2
    jacobian = out @ (slope[:, None] * up)  # [n*d, d_I]
    metric = jacobian.T @ jacobian
    eye = torch.eye(metric.shape[0], dtype=metric.dtype)
    return metric + 1e-6 * float(metric.trace().clamp(min=1e-12)) / metric.shape[0] * eye


def _tune_one(objective: TrainObjective, selection: DevSelection, proj_b: ProjB, config: GaussNewtonConfig,
              start: Tensor) -> ISTResult:
    z = start.detach().float().cpu().clone()
    exact = (config.curvature == "ggn" and objective.options is not None
             and objective.max_options <= config.max_ggn_options)

    def measure(at: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row losses [N], per-row gradients [N, d_I] and the curvature [d_I, d_I] (float64) at z."""
        if exact:
            return objective.row_losses_grads_and_ggn(at)
        row_losses, row_grads = objective.row_losses_and_grads(at)
        return row_losses, row_grads, row_grads.double().T @ row_grads.double() / row_grads.shape[0]

    losses, grads, curvature = measure(z)
    loss = float(losses.mean())
    if not math.isfinite(loss):
        selection.error = f"the train loss is {loss} at the start; check the examples and the backbone dtype"
        selection.observe(0, z, None)
        return selection.result(0)
    lam, grow, scale, iteration = None, 2.0, 1.0, 0
    stop = selection.observe(0, z, loss)
    selection.history[-1]["damping"] = None
    while not stop and iteration < config.max_iterations:
        iteration += 1
        g = grads.double().mean(0)
        metric = prompt_metric(proj_b, z)
        if lam is None:
            lam = config.damping * float(curvature.trace()) / float(metric.trace())
        delta = torch.linalg.solve(curvature + lam * metric, -g)
        predicted = float(-(g @ delta) - 0.5 * (delta @ curvature @ delta))  # by the step at scale 1
        if not predicted > config.tolerance:
            log.info("IST %s: converged at iteration %d (predicted decrease %.2e)", selection.task.name, iteration,
                     predicted)
            iteration -= 1
            break
        step = scale * delta
        linear = float(-(g @ step))  # the decrease to first order
        candidate = z + step.float()
        new_losses, new_grads, new_curvature = measure(candidate)
        new_loss = float(new_losses.mean())
        if math.isfinite(new_loss) and new_loss < loss:
            decrease = loss - new_loss
            if scale == 1.0:
                rho = decrease / predicted
                lam *= max(1 / 3, 1 - (2 * rho - 1) ** 3)
            grow = 2.0
            # far from a fit the empirical Fisher overstates the curvature: while the loss falls at least half
            # as much as its first-order prediction, steps grow; when it falls much less, they shrink back
            if decrease >= 0.5 * linear:
                scale = min(2 * scale, config.max_scale)
            elif decrease < 0.25 * linear:
                scale = max(scale / 2, 1.0)
            z, loss, grads, curvature = candidate, new_loss, new_grads, new_curvature
            stop = selection.observe(iteration, z, loss)
            selection.history[-1].update(damping=lam, scale=scale)
        else:  # refused: z stays, the step shrinks (first its scale, then by more damping)
            if scale > 1:
                scale = max(scale / 4, 1.0)
            else:
                lam *= grow
                grow *= 2
            stop = iteration - selection.best_step >= config.patience
        log.debug("IST %s iteration %d: train loss %.4f (the step tried: %.4f, predicted decrease %.3g, |dz| %.3g), "
                  "lambda %.3g", selection.task.name, iteration, loss, new_loss, predicted, float(step.norm()), lam)
    return selection.result(iteration)
