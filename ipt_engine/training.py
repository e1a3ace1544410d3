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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ipt_engine.backbone import Backbone
from ipt_engine.device import autocast_to, check_train_precision, train_autocast_dtype
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
    patience_steps: int | None = None  # when set: steps without a dev improvement before a task stops (replaces
    # `patience`, so that the budget of patience does not depend on how often dev is evaluated)
    dev_loss: bool = False  # also compute each task's mean dev loss at every evaluation: kept in the history and
    # used to break ties of the dev score (small dev sets tie often), at the cost of one forward of the dev rows
    eval_at_start: bool = True  # score the initial parameters too, so training never returns worse ones
    weight_decay: float = 1e-5
    max_grad_norm: float | None = 1.0  # per task in per-task mode, global in shared mode
    max_rows_per_forward: int = 64  # larger batches are split into accumulated micro-batches
    max_new_tokens: int = 32  # greedy decoding length when evaluating generation tasks
    seed: int = 0
    progress: bool = False  # show a tqdm progress bar
    train_precision: str = "float32"  # the training steps' autocast ("auto": bfloat16 where the hardware computes
    # it natively; ipt_engine.device.train_autocast_dtype); dev is always scored in the model's dtype

    def __post_init__(self) -> None:
        check_train_precision(self.train_precision)
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        for name in ("max_steps", "batch_size", "eval_every", "patience", "max_rows_per_forward"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience_steps is not None and self.patience_steps < 1:
            raise ValueError(f"patience_steps must be >= 1 or None, got {self.patience_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
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
    error: str | None = None  # why training of this task stopped abnormally (e.g. a NaN loss)
    history: list[HistoryEntry] = field(default_factory=list)
    """One entry per evaluation of this task: step, train_loss (its mean row loss at that step; None at step 0),
    dev_loss (None unless TrainConfig.dev_loss), dev (score), norm (|its row of the trained table|, or None),
    seconds (since training began)."""


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


STOPPED_BY_REQUEST = "stopped by request"
HistoryEntry = dict[str, float | None]
"""One dev evaluation of one task: step, train_loss, dev_loss, dev (score), norm (|z| or |prompt|), seconds
(since training began); optimisers may add their own fields (e.g. Gauss-Newton's damping)."""
EvalHook = Callable[[int, dict[int, HistoryEntry]], Iterable[int]]
"""Called after each dev evaluation with (step, {task index: its new history entry}); returns task indices to
stop (e.g. tasks cancelled by their owner). Per-task mode only."""


def stop_after(seconds: float) -> EvalHook:
    """An evaluation hook that stops every task at its first evaluation `seconds` or more after the hook was made
    (the task keeps its best dev z so far)."""
    began = time.perf_counter()

    def hook(step: int, entries: dict[int, HistoryEntry]) -> list[int]:
        return list(entries) if time.perf_counter() - began >= seconds else []

    return hook


def train_prompts(backbone: Backbone, tasks: Sequence[Task], params: PromptParameters,
                  config: TrainConfig, description: str = "train", on_evaluate: EvalHook | None = None
                  ) -> TrainResult:
    """Train `params` on `tasks` (multi-task batches), keep the best-dev parameters and return per-task results.

    A NaN or infinite loss stops training. In per-task mode only the tasks whose rows produced it stop
    (their result carries the error; the others go on); when every task has failed, and always in shared
    mode, NonFiniteLossError is raised. Parameters always end at the best dev values seen."""
    check_trainable(tasks)
    if params.per_task and config.tasks_per_step is not None:
        raise ValueError("tasks_per_step applies to shared parameters (MSF) only: per-task methods train every "
                         "active task at every step, so that batching tasks never changes their updates")
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    num = len(tasks)
    sampler = _RowSampler([[t.text_pair(e) for e in t.train] for t in tasks], [t.name for t in tasks], config.seed)
    rng = random.Random(config.seed + 1)
    optimizer = torch.optim.AdamW([p for p in params.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    state = _SelectionState(num)
    history: list[dict[str, float]] = []
    task_loss: dict[int, float] = {}

    def run_eval(step: int, loss: float) -> None:
        idx = state.active if params.per_task else list(range(num))
        with torch.no_grad():
            prompts = params.prompts(torch.tensor(idx, device=backbone.device))
            dev_losses = mean_dev_losses(backbone, [tasks[i] for i in idx], prompts) if config.dev_loss else None
        scores = evaluate(backbone, [tasks[i] for i in idx], prompts, "dev", max_new_tokens=config.max_new_tokens)
        history.append({"step": step, "loss": loss, "dev": sum(scores) / len(scores)})
        train_loss = "no train loss yet" if step == 0 else f"loss {loss:.4f}"  # step 0 evaluates before training
        log.info("%s step %d: %s, mean dev %.4f over %d task(s)", description, step, train_loss,
                 history[-1]["dev"], len(idx))
        table = params.task_table if params.per_task else None
        for j, i in enumerate(idx):
            state.history[i].append({
                "step": step, "train_loss": task_loss.get(i) if step else None,
                "dev_loss": dev_losses[j] if dev_losses is not None else None, "dev": scores[j],
                "norm": float(table.detach()[i].norm()) if table is not None else None,
                "seconds": time.perf_counter() - start})
        state.update(params, idx, scores, step, config, dev_losses)
        if on_evaluate is not None:
            for i in on_evaluate(step, {i: state.history[i][-1] for i in idx}):
                state.fail(i, STOPPED_BY_REQUEST)

    if config.eval_at_start:
        run_eval(0, float("nan"))
    bar = tqdm(total=config.max_steps, desc=description, disable=not config.progress, leave=False)
    step = 0
    last_loss = float("nan")
    try:
        for step in range(1, config.max_steps + 1):
            if not state.active:
                step -= 1
                break
            batch_tasks = _tasks_for_step(state.active, config, rng)
            last_loss, failed, per_task_loss = _train_step(backbone, params, optimizer, sampler, batch_tasks, config,
                                                           step, tasks)
            task_loss.update(per_task_loss)
            for i in batch_tasks:
                state.trained_steps[i] += 1
            for i, message in failed.items():
                state.fail(i, message)
                log.warning("%s: task %r stopped: %s", description, tasks[i].name, message)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", active=len(state.active))
            if state.active and (step % config.eval_every == 0 or step == config.max_steps):
                run_eval(step, last_loss)
    finally:
        bar.close()
        state.restore(params)
    if all(e is not None and e != STOPPED_BY_REQUEST for e in state.errors):
        raise NonFiniteLossError(str(state.errors[0]))
    results = [
        TaskTrainResult(t.name, state.best_score[i], state.best_step[i], state.trained_steps[i],
                        stopped_early=state.stopped[i], error=state.errors[i], history=state.history[i])
        for i, t in enumerate(tasks)
    ]
    wall = time.perf_counter() - start
    log.info("%s: %d steps, %.1f s, mean best dev %.4f", description, step, wall,
             sum(r.dev_score for r in results) / num)
    return TrainResult(results, wall, step, history)


class _SelectionState:
    """Best-dev bookkeeping: per task (own best row, patience and stop) or shared (best mean over tasks)."""

    def __init__(self, num: int) -> None:
        self.best_score = [-math.inf] * num
        self.best_loss = [math.inf] * num  # dev loss at the best score (ties of the score go to a lower loss)
        self.stopped = [False] * num  # ran out of patience
        self.history: list[list[HistoryEntry]] = [[] for _ in range(num)]
        self.best_mean = -math.inf
        self.best_step = [0] * num
        self.trained_steps = [0] * num
        self.bad_evals = [0] * num
        self.errors: list[str | None] = [None] * num
        self.active = list(range(num))
        self.best_rows: list[Tensor | None] = [None] * num
        self.best_shared: dict[str, Tensor] | None = None

    def update(self, params: PromptParameters, idx: list[int], scores: list[float], step: int,
               config: TrainConfig, dev_losses: list[float] | None = None) -> None:
        """Record an evaluation. A task improves when its dev score rises, or (with dev losses) when the score
        ties and the dev loss falls; it stops after `patience` evaluations or `patience_steps` steps without."""
        if params.per_task:
            table = params.task_table
            assert table is not None, "per-task parameters must expose task_table"
            for j, (i, score) in enumerate(zip(idx, scores, strict=True)):
                loss = dev_losses[j] if dev_losses is not None else math.inf
                if score > self.best_score[i] or (score == self.best_score[i] and loss < self.best_loss[i]):
                    self.best_score[i], self.best_loss[i], self.best_step[i], self.bad_evals[i] = score, loss, step, 0
                    self.best_rows[i] = table.detach()[i].clone()
                else:
                    self.bad_evals[i] += 1
                if config.patience_steps is not None:
                    self.stopped[i] = step - self.best_step[i] >= config.patience_steps
                else:
                    self.stopped[i] = self.bad_evals[i] >= config.patience
            self.active = [i for i in self.active if not self.stopped[i]]
            return
        mean = sum(scores) / len(scores)
        if mean > self.best_mean:
            self.best_mean = mean
            self.best_score[:] = scores
            self.best_step[:] = [step] * len(scores)
            self.best_shared = {k: v.detach().clone() for k, v in params.state_dict().items()}
            self.bad_evals[:] = [0] * len(scores)
        else:
            self.bad_evals[:] = [b + 1 for b in self.bad_evals]
            out_of_patience = (step - self.best_step[0] >= config.patience_steps if config.patience_steps is not None
                               else self.bad_evals[0] >= config.patience)
            if out_of_patience:
                self.stopped[:] = [True] * len(self.stopped)
                self.active = []

    def fail(self, task: int, message: str) -> None:
        self.errors[task] = message
        self.active = [i for i in self.active if i != task]

    @torch.no_grad()
    def restore(self, params: PromptParameters) -> None:
        """Put the best dev parameters back (rows never evaluated keep their current values)."""
        if params.per_task:
            table = params.task_table
            for i, row in enumerate(self.best_rows):
                if row is not None and table is not None:
                    table[i].copy_(row)
        elif self.best_shared is not None:
            params.load_state_dict(self.best_shared)


def _tasks_for_step(active: list[int], config: TrainConfig, rng: random.Random) -> list[int]:
    k = config.tasks_per_step
    if k is None or k >= len(active):
        return list(active)
    return sorted(rng.sample(active, k))


def _train_step(backbone: Backbone, params: PromptParameters, optimizer: torch.optim.Optimizer,
                sampler: _RowSampler, batch_tasks: list[int], config: TrainConfig, step: int,
                tasks: Sequence[Task]) -> tuple[float, dict[int, str], dict[int, float]]:
    """One optimizer step. Returns (the loss, {task index: error} for tasks whose loss was not finite,
    {task index: its mean row loss})."""
    rows: list[tuple[int, TextPair]] = [(t, p) for t in batch_tasks for p in sampler.take(t, config.batch_size)]
    # Per-task mode: each row weighs 1/batch_size, so each task's gradient equals its single-task gradient.
    # Shared mode: the mean over all rows.
    weight = 1.0 / config.batch_size if params.per_task else 1.0 / len(rows)
    optimizer.zero_grad(set_to_none=True)
    autocast = train_autocast_dtype(config.train_precision, backbone.device, backbone.dtype)
    total = 0.0
    failed: dict[int, str] = {}
    row_sums: dict[int, float] = {}
    for start in range(0, len(rows), config.max_rows_per_forward):
        chunk = rows[start:start + config.max_rows_per_forward]
        index = torch.tensor([t for t, _ in chunk], device=backbone.device)
        prompts = params.prompts(index)
        with autocast_to(backbone.device, autocast):
            ll, count = backbone.target_log_likelihood(prompts, [p.source for _, p in chunk],
                                                       [p.target for _, p in chunk])
        row_loss = -(ll.float() / count.clamp(min=1))
        bad = ~torch.isfinite(row_loss.detach())
        if bool(bad.any()):
            bad_tasks = sorted({chunk[r][0] for r in bad.nonzero().flatten().tolist()})
            message = _non_finite_message(float(row_loss.detach()[bad][0]), step,
                                          [tasks[t].name for t in bad_tasks])
            if not params.per_task:
                raise NonFiniteLossError(message)
            failed.update(dict.fromkeys(bad_tasks, message))
            row_loss = row_loss.masked_fill(bad, 0.0)  # the other tasks' rows still train
        for (t, _), value in zip(chunk, row_loss.detach().tolist(), strict=True):
            row_sums[t] = row_sums.get(t, 0.0) + value
        loss = row_loss.sum() * weight
        loss.backward()
        total += float(loss.detach())
    aux = params.auxiliary_loss(torch.tensor(batch_tasks, device=backbone.device))
    if aux is not None:
        if not torch.isfinite(aux.detach()):
            raise NonFiniteLossError(_non_finite_message(float(aux.detach()), step,
                                                         [tasks[t].name for t in batch_tasks]))
        aux.backward()
        total += float(aux.detach())
    table = params.task_table
    if failed and table is not None and table.grad is not None:
        table.grad[list(failed)] = 0.0  # a failed task's row must not move (nor poison its optimizer state)
    _clip(params, config.max_grad_norm)
    optimizer.step()
    per_task_loss = {t: row_sums[t] / config.batch_size for t in batch_tasks if t in row_sums and t not in failed}
    return (total / len(batch_tasks) if params.per_task else total), failed, per_task_loss


def mean_dev_losses(backbone: Backbone, tasks: Sequence[Task], prompts: Tensor) -> list[float]:
    """Each task's mean per-token loss of its dev targets with its prompt (prompts [len(tasks), n, d])."""
    pairs = [(i, t.text_pair(e)) for i, t in enumerate(tasks) for e in t.dev]
    index = torch.tensor([i for i, _ in pairs], device=prompts.device)
    sums = torch.zeros(len(tasks))
    counts = torch.zeros(len(tasks))
    for start in range(0, len(pairs), 64):
        chunk, rows = pairs[start:start + 64], index[start:start + 64]
        ll, count = backbone.target_log_likelihood(prompts.index_select(0, rows), [p.source for _, p in chunk],
                                                   [p.target for _, p in chunk])
        sums.index_add_(0, rows.cpu(), -ll.detach().float().cpu())
        counts.index_add_(0, rows.cpu(), count.detach().float().cpu())
    return (sums / counts.clamp(min=1)).tolist()


def _non_finite_message(value: float, step: int, task_names: list[str]) -> str:
    return (f"loss became {value} at step {step} (tasks {task_names}); training of these tasks stopped and "
            f"their best parameters so far were kept. Lower the learning rate, or check the examples and the "
            f"backbone dtype")


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
