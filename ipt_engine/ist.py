"""Intrinsic Subspace Tuning (IST): learn a task as z in R^{d_I}, with Proj_b and the PLM frozen.

The soft prompt of a task is Proj_b(z). Several tasks train in one batch, each row using its own task's
z, and each task keeps its own best-dev z and stops on its own (see `ipt_engine.training`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import Tensor, nn

from ipt_engine.backbone import Backbone
from ipt_engine.prompt_tuning import task_generators
from ipt_engine.subspace import ProjB
from ipt_engine.tasks import Task
from ipt_engine.training import EvalHook, HistoryEntry, PromptParameters, TaskTrainResult, TrainConfig, train_prompts

DEFAULT_IST_LEARNING_RATE = 1.0
"""z has few coordinates, and the task vectors MSF finds lie far from the origin (|z_i| of order 10 with
SmolLM2 and d_I = 4), so steps far larger than PT's suit it: with 0.1, IST from z = 0 did not leave the
origin's neighbourhood in 40 steps; with 1.0 it reached 0.89 test accuracy on a new task (see the
real-model test)."""


class ZInit(StrEnum):
    """How z starts."""

    ZEROS = "zeros"
    NORMAL = "normal"  # small normal noise (std `init_std`)
    MEAN = "mean"  # the mean of known task vectors (e.g. the train tasks' z from MSF)
    NEAREST = "nearest"  # the known vector whose prompt best fits the task's train examples (needs the PLM)


class IntrinsicVectors(PromptParameters):
    """IST parameters: `z_table` [num_tasks, d_I] trainable; prompts = Proj_b(z) with Proj_b frozen."""

    per_task = True

    def __init__(self, proj_b: ProjB, initial: Tensor) -> None:
        super().__init__()
        self.proj_b = proj_b
        self.proj_b.requires_grad_(False)
        self.z_table = nn.Parameter(initial.detach().float().clone())

    @property
    def task_table(self) -> nn.Parameter:
        return self.z_table

    def prompts(self, task_index: Tensor) -> Tensor:
        return self.proj_b(self.z_table.index_select(0, task_index))


def initial_vectors(num_tasks: int, d_intrinsic: int, init: ZInit | str = ZInit.ZEROS, *,
                    known_vectors: Tensor | None = None, init_std: float = 0.01, seed: int = 0,
                    task_names: Sequence[str] | None = None) -> Tensor:
    """Starting z for each task: [num_tasks, d_I]. With `task_names`, 'normal' draws each task's z from
    its own stream seeded by (seed, name), so batching tasks does not change where they start."""
    init = ZInit(init)
    if init is ZInit.ZEROS:
        return torch.zeros(num_tasks, d_intrinsic)
    if init is ZInit.NORMAL:
        if task_names is None:
            return torch.randn(num_tasks, d_intrinsic, generator=torch.Generator().manual_seed(seed)) * init_std
        rows = [torch.randn(d_intrinsic, generator=g) for g in task_generators(seed, task_names)]
        return torch.stack(rows) * init_std
    if init is ZInit.NEAREST:
        raise ValueError("z init 'nearest' needs the PLM: use nearest_known_vectors() or intrinsic_subspace_tune()")
    if known_vectors is None or known_vectors.numel() == 0:
        raise ValueError("z init 'mean' needs known task vectors (e.g. the z of the subspace's train tasks)")
    if known_vectors.dim() != 2 or known_vectors.shape[-1] != d_intrinsic:
        raise ValueError(f"known vectors must be [num_known, d_I={d_intrinsic}], got {tuple(known_vectors.shape)}")
    return known_vectors.float().mean(0, keepdim=True).cpu().repeat(num_tasks, 1)


@torch.no_grad()
def nearest_known_vectors(backbone: Backbone, tasks: Sequence[Task], proj_b: ProjB, known_vectors: Tensor, *,
                          max_examples: int = 16) -> Tensor:
    """For each task, the known vector whose prompt Proj_b(z) gives the task's first `max_examples` train
    targets the highest log-likelihood per token: [num_tasks, d_I] (rows of known_vectors [num_known, d_I]).

    Costs num_known x max_examples forward rows per task, no backward."""
    if known_vectors.dim() != 2 or known_vectors.shape[0] == 0:
        raise ValueError(f"known vectors must be a non-empty [num_known, d_I] matrix, got {tuple(known_vectors.shape)}")
    device = next(proj_b.parameters()).device
    prompts = proj_b(known_vectors.float().to(device)).to(backbone.device)  # [num_known, n, d]
    chosen = []
    for task in tasks:
        pairs = [task.text_pair(e) for e in task.train[:max_examples]]
        sources, targets = [p.source for p in pairs], [p.target for p in pairs]
        per_token = []
        for k in range(prompts.shape[0]):
            ll, count = backbone.target_log_likelihood(prompts[k:k + 1].expand(len(pairs), -1, -1), sources, targets)
            per_token.append(float(ll.sum() / count.sum().clamp(min=1)))
        chosen.append(known_vectors[max(range(len(per_token)), key=per_token.__getitem__)])
    return torch.stack(chosen).float().cpu()


@dataclass
class ISTResult:
    """One task's IST outcome."""

    task: str
    z: Tensor  # [d_I] best-dev vector (fp32, CPU)
    dev_score: float
    steps: int
    best_step: int
    wall_seconds: float  # of the whole batched run this task was part of
    error: str | None = None  # set when this task's training stopped abnormally (NaN loss, stop request)
    history: list[HistoryEntry] = field(default_factory=list)  # per evaluation; see TaskTrainResult


def intrinsic_subspace_tune(backbone: Backbone, tasks: Sequence[Task], proj_b: ProjB, config: TrainConfig, *,
                            init: ZInit | str = ZInit.ZEROS, known_vectors: Tensor | None = None,
                            initial_z: Tensor | None = None, on_evaluate: EvalHook | None = None
                            ) -> list[ISTResult]:
    """IST of every task in one batched run. Returns one ISTResult per task, in order."""
    d_i = proj_b.config.d_intrinsic
    if initial_z is None and ZInit(init) is ZInit.NEAREST:
        if known_vectors is None:
            raise ValueError("z init 'nearest' needs known task vectors (e.g. the z of the subspace's train tasks)")
        initial_z = nearest_known_vectors(backbone, tasks, proj_b, known_vectors)
    if initial_z is None:
        initial_z = initial_vectors(len(tasks), d_i, init, known_vectors=known_vectors, seed=config.seed,
                                    task_names=[t.name for t in tasks])
    elif tuple(initial_z.shape) != (len(tasks), d_i):
        raise ValueError(f"initial_z must be [{len(tasks)}, {d_i}], got {tuple(initial_z.shape)}")
    # Proj_b is borrowed: its device, mode and requires_grad flags are put back afterwards.
    home = next(proj_b.parameters()).device
    was_training = proj_b.training
    was_trainable = [p.requires_grad for p in proj_b.parameters()]
    params = IntrinsicVectors(proj_b.to(backbone.device).eval(), initial_z).to(backbone.device)
    try:
        result = train_prompts(backbone, tasks, params, config, description="IST", on_evaluate=on_evaluate)
    finally:
        for p, flag in zip(proj_b.parameters(), was_trainable, strict=True):
            p.requires_grad_(flag)
        proj_b.to(home).train(was_training)
    z = params.z_table.detach().cpu()
    return [_ist_result(r, z[i], result.wall_seconds) for i, r in enumerate(result.tasks)]


def _ist_result(r: TaskTrainResult, z: Tensor, wall: float) -> ISTResult:
    return ISTResult(r.task, z.clone(), r.dev_score, r.steps, r.best_step, wall, r.error, r.history)
