"""The one training loop behind PT, MSF and IST.

Each method supplies a `PromptParameters` module that maps task indices to soft prompts. The loop samples
rows of many tasks into one batch (each row with its own task's prompt), evaluates on dev every
`eval_every` steps, keeps the best-dev parameters and stops early when dev stops improving.

Two selection modes:
- per task (PT, IST): every task owns one row of the trainable tensor. The loss is the sum over tasks of
  each task's mean row loss and gradients are clipped per task, so with Adam (element-wise) training N
  tasks in one batch gives each task the same updates as training it alone. Each task keeps its own best
  checkpoint and stops on its own.
- shared (MSF): the parameters are shared by all tasks; selection uses the mean dev score over tasks.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ipt_engine.backbone import Backbone
from ipt_engine.errors import InvalidTaskError, NonFiniteLossError
from ipt_engine.evaluation import evaluate
from ipt_engine.tasks import Task, TextPair

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings shared by PT, MSF and IST."""

    learning_rate: float = 0.3
    max_steps: int = 1000
    batch_size: int = 8  # rows per task per step (per-task mode) or per sampled task (shared mode)
    tasks_per_step: int | None = None  # shared mode: tasks sampled per step (None: all)
    eval_every: int = 50  # steps between dev evaluations
    patience: int = 5  # evaluations without a dev improvement before a task stops
    eval_at_start: bool = True  # score the initial parameters too, so training never returns worse ones
    weight_decay: float = 1e-5
    max_grad_norm: float | None = 1.0  # per task in per-task mode, global in shared mode
    max_rows_per_forward: int = 64  # larger batches are split into accumulated micro-batches
    max_new_tokens: int = 32  # greedy decoding length when evaluating generation tasks
    seed: int = 0
    progress: bool = False  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        for name in ("max_steps", "batch_size", "eval_every", "patience", "max_rows_per_forward"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tasks_per_step is not None and self.tasks_per_step < 1:
            raise ValueError(f"tasks_per_step must be >= 1, got {self.tasks_per_step}")


class PromptParameters(nn.Module):
    """What a method trains: a map from task indices [B] to soft prompts [B, n, d].

    Per-task methods keep their per-task values in `task_table` ([num_tasks, ...]); the loop clips,
    snapshots and restores its rows one task at a time."""

    per_task: bool = True

    @property
    def task_table(self) -> nn.Parameter | None:
        return None

    def prompts(self, task_index: Tensor) -> Tensor:
        raise NotImplementedError

    def auxiliary_loss(self, task_index: Tensor) -> Tensor | None:
        """An extra loss term for the tasks in the batch (MSF's reconstruction loss), or None."""
        return None


@dataclass
class TaskTrainResult:
    """How training went for one task."""

    task: str
    dev_score: float  # best dev score (the one whose parameters were kept)
    best_step: int  # step of the kept parameters (0: the initial ones)
    steps: int  # steps this task trained
    stopped_early: bool


@dataclass
class TrainResult:
    tasks: list[TaskTrainResult]
    wall_seconds: float
    steps: int  # optimizer steps taken in all
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation

    @property
    def mean_dev_score(self) -> float:
        return sum(t.dev_score for t in self.tasks) / len(self.tasks)


class _RowSampler:
    """Cycles through each task's training pairs in a reshuffled order, epoch after epoch.

    Each task has its own random stream seeded by (seed, task name), so a task sees the same rows whether
    it trains alone or together with others."""

    def __init__(self, pairs: list[list[TextPair]], names: list[str], seed: int) -> None:
        self.pairs = pairs
        self.rngs = [random.Random(f"{seed}:{name}") for name in names]
        self.order: list[list[int]] = [[] for _ in pairs]

    def take(self, task: int, k: int) -> list[TextPair]:
        out = []
        for _ in range(k):
            if not self.order[task]:
                self.order[task] = list(range(len(self.pairs[task])))
                self.rngs[task].shuffle(self.order[task])
            out.append(self.pairs[task][self.order[task].pop()])
        return out


def check_trainable(tasks: Sequence[Task]) -> None:
    if not tasks:
        raise InvalidTaskError("no tasks to train")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InvalidTaskError(f"task names must be unique within one run: {sorted(names)}")
    for t in tasks:
        if not t.dev:
            raise InvalidTaskError(f"task {t.name!r} has no dev examples; split some off (Task.with_dev_split)")


def train_prompts(backbone: Backbone, tasks: Sequence[Task], params: PromptParameters,
                  config: TrainConfig, description: str = "train") -> TrainResult:
    """Train `params` on `tasks` (multi-task batches), keep the best-dev parameters and return per-task results.

    Raises NonFiniteLossError as soon as the loss is NaN or infinite (the parameters then hold the best
    values seen before that step)."""
    check_trainable(tasks)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    num = len(tasks)
    sampler = _RowSampler([[t.text_pair(e) for e in t.train] for t in tasks], [t.name for t in tasks], config.seed)
    rng = random.Random(config.seed + 1)
    optimizer = torch.optim.AdamW([p for p in params.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    best_score = [-math.inf] * num
    best_step = [0] * num
    trained_steps = [0] * num
    bad_evals = [0] * num
    active = list(range(num))
    best_shared: dict[str, Tensor] | None = None
    best_rows: list[Tensor | None] = [None] * num
    history: list[dict[str, float]] = []

    def run_eval(step: int, loss: float) -> None:
        nonlocal active, best_shared
        idx = active if params.per_task else list(range(num))
        with torch.no_grad():
            prompts = params.prompts(torch.tensor(idx, device=backbone.device))
        scores = evaluate(backbone, [tasks[i] for i in idx], prompts, "dev", max_new_tokens=config.max_new_tokens)
        history.append({"step": step, "loss": loss, "dev": sum(scores) / len(scores)})
        log.info("%s step %d: loss %.4f, mean dev %.4f over %d task(s)", description, step, loss,
                 history[-1]["dev"], len(idx))
        if params.per_task:
            table = params.task_table
            assert table is not None
            for i, s in zip(idx, scores, strict=True):
                if s > best_score[i]:
                    best_score[i], best_step[i], bad_evals[i] = s, step, 0
                    best_rows[i] = table.detach()[i].clone()
                else:
                    bad_evals[i] += 1
            active = [i for i in active if bad_evals[i] < config.patience]
        else:
            mean = sum(scores) / len(scores)
            if mean > best_score[0]:
                best_score[:] = scores
                best_step[:] = [step] * num
                best_shared = {k: v.detach().clone() for k, v in params.state_dict().items()}
                bad_evals[:] = [0] * num
            else:
                bad_evals[:] = [b + 1 for b in bad_evals]
                if bad_evals[0] >= config.patience:
                    active = []

    if config.eval_at_start:
        run_eval(0, float("nan"))
    bar = tqdm(total=config.max_steps, desc=description, disable=not config.progress, leave=False)
    step = 0
    last_loss = float("nan")
    try:
        for step in range(1, config.max_steps + 1):
            if not active:
                step -= 1
                break
            batch_tasks = _tasks_for_step(active, params.per_task, config, rng)
            last_loss = _train_step(backbone, params, optimizer, sampler, batch_tasks, config, step, tasks)
            for i in batch_tasks:
                trained_steps[i] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", active=len(active))
            if step % config.eval_every == 0 or step == config.max_steps:
                run_eval(step, last_loss)
    finally:
        bar.close()
        _restore_best(params, best_rows, best_shared)
    if not config.eval_at_start and not history:
        run_eval(step, last_loss)
    results = [
        TaskTrainResult(t.name, best_score[i], best_step[i], trained_steps[i],
                        stopped_early=bad_evals[i] >= config.patience)
        for i, t in enumerate(tasks)
    ]
    wall = time.perf_counter() - start
    log.info("%s: %d steps, %.1f s, mean best dev %.4f", description, step, wall,
             sum(r.dev_score for r in results) / num)
    return TrainResult(results, wall, step, history)


def _tasks_for_step(active: list[int], per_task: bool, config: TrainConfig, rng: random.Random) -> list[int]:
    k = config.tasks_per_step
    if k is None or k >= len(active):
        return list(active)
    return sorted(rng.sample(active, k))


def _train_step(backbone: Backbone, params: PromptParameters, optimizer: torch.optim.Optimizer,
                sampler: _RowSampler, batch_tasks: list[int], config: TrainConfig, step: int,
                tasks: Sequence[Task]) -> float:
    rows: list[tuple[int, TextPair]] = [(t, p) for t in batch_tasks for p in sampler.take(t, config.batch_size)]
    # Per-task mode: each row weighs 1/batch_size, so each task's gradient equals its single-task gradient.
    # Shared mode: the mean over all rows.
    weight = 1.0 / config.batch_size if params.per_task else 1.0 / len(rows)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, len(rows), config.max_rows_per_forward):
        chunk = rows[start:start + config.max_rows_per_forward]
        index = torch.tensor([t for t, _ in chunk], device=backbone.device)
        prompts = params.prompts(index)
        ll, count = backbone.target_log_likelihood(prompts, [p.source for _, p in chunk],
                                                   [p.target for _, p in chunk])
        loss = (-(ll / count.clamp(min=1))).sum() * weight
        _check_finite(loss, step, [tasks[t].name for t, _ in chunk])
        loss.backward()
        total += float(loss.detach())
    aux = params.auxiliary_loss(torch.tensor(batch_tasks, device=backbone.device))
    if aux is not None:
        _check_finite(aux, step, [tasks[t].name for t in batch_tasks])
        aux.backward()
        total += float(aux.detach())
    _clip(params, config.max_grad_norm)
    optimizer.step()
    return total / len(batch_tasks) if params.per_task else total


def _check_finite(loss: Tensor, step: int, task_names: list[str]) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {float(loss.detach())} at step {step} (tasks {sorted(set(task_names))}); training "
            f"stopped and the best parameters so far were kept. Lower the learning rate, or check the examples "
            f"and the backbone dtype"
        )


def _clip(params: PromptParameters, max_norm: float | None) -> None:
    if max_norm is None:
        return
    table = params.task_table
    if params.per_task and table is not None and table.grad is not None:
        grad = table.grad
        norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
        scale = (max_norm / norms).clamp(max=1.0)
        grad.mul_(scale.view(-1, *([1] * (grad.dim() - 1))))
    else:
        torch.nn.utils.clip_grad_norm_([p for p in params.parameters() if p.grad is not None], max_norm)


@torch.no_grad()
def _restore_best(params: PromptParameters, best_rows: list[Tensor | None],
                  best_shared: dict[str, Tensor] | None) -> None:
    if params.per_task:
        table = params.task_table
        if table is None:
            return
        for i, row in enumerate(best_rows):
            if row is not None:
                table[i].copy_(row)
    elif best_shared is not None:
        params.load_state_dict(best_shared)
