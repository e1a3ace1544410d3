"""Vanilla prompt tuning (PT) and IPT-initialised PT.

PT trains a soft prompt P [n, d] per task with the backbone frozen. Prompts start from the embeddings of
sampled vocabulary tokens (Lester et al. 2021), or, for IPT-initialised PT, from Proj_b(z) of a task's
intrinsic vector (the paper's Table 4: much lower variance across seeds than PT).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ipt_engine.backbone import Backbone
from ipt_engine.subspace import ProjB
from ipt_engine.tasks import Task
from ipt_engine.training import EvalHook, PromptParameters, TrainConfig, TrainResult, train_prompts

VOCAB_SAMPLE_TOP = 5000
"""Initial prompts sample tokens among the first ids of the vocabulary (BPE ids are roughly ordered by
frequency, so these are common tokens), as Lester et al. sample from the 5,000 most common tokens."""


def sample_vocab_prompts(embeddings: Tensor, num_tasks: int, n_prompt: int, seed: int = 0,
                         task_names: Sequence[str] | None = None) -> Tensor:
    """Initial soft prompts from sampled token embeddings: [num_tasks, n_prompt, d] (fp32).

    With `task_names`, each task draws from its own stream seeded by (seed, name), so a task starts from
    the same prompt whether it trains alone or in a batch with others."""
    top = min(VOCAB_SAMPLE_TOP, embeddings.shape[0])
    gens = task_generators(seed, task_names) if task_names is not None else [torch.Generator().manual_seed(seed)]
    if task_names is not None and len(task_names) != num_tasks:
        raise ValueError(f"{num_tasks} tasks but {len(task_names)} names")
    if len(gens) == 1:
        ids = torch.randint(0, top, (num_tasks, n_prompt), generator=gens[0])
    else:
        ids = torch.stack([torch.randint(0, top, (n_prompt,), generator=g) for g in gens])
    return embeddings.detach().float().cpu()[ids].to(embeddings.device)


def shared_start_prompts(embeddings: Tensor, num_tasks: int, n_prompt: int, seed: int = 0) -> Tensor:
    """One draw of sampled token embeddings, the same start for every task: [num_tasks, n_prompt, d] (fp32).

    With every task starting from its own draw (`sample_vocab_prompts` with task names), what PT moves is
    measured from a different point per task and each prompt keeps its own random tokens, so the prompts share
    little that an auto-encoder (MSF) could find; from one shared start, the tasks' prompts differ only by what
    training moved (`benchmarks/pt_geometry.py` measures both)."""
    return sample_vocab_prompts(embeddings, 1, n_prompt, seed).expand(num_tasks, -1, -1).clone()


def task_generators(seed: int, task_names: Sequence[str]) -> list[torch.Generator]:
    """One torch generator per task, seeded from (seed, task name)."""
    return [torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode())) for name in task_names]


class SoftPrompts(PromptParameters):
    """PT parameters: one trainable prompt per task, `prompt_table` [num_tasks, n, d]."""

    per_task = True

    def __init__(self, initial: Tensor) -> None:
        super().__init__()
        if initial.dim() != 3:
            raise ValueError(f"initial prompts must be [num_tasks, n, d], got {tuple(initial.shape)}")
        self.prompt_table = nn.Parameter(initial.detach().float().clone())

    @property
    def task_table(self) -> nn.Parameter:
        return self.prompt_table

    def prompts(self, task_index: Tensor) -> Tensor:
        return self.prompt_table.index_select(0, task_index)


@dataclass
class PromptTuningResult:
    prompts: Tensor  # [num_tasks, n, d] best-dev prompts (fp32, CPU)
    train: TrainResult


def prompt_tune(backbone: Backbone, tasks: Sequence[Task], config: TrainConfig, *, n_prompt: int = 100,
                initial_prompts: Tensor | None = None, on_evaluate: EvalHook | None = None) -> PromptTuningResult:
    """Vanilla PT of every task at once (each row its own task's prompt); best-dev prompts per task.

    initial_prompts: [num_tasks, n, d] to start from (e.g. Proj_b(z)); default sampled vocabulary embeddings."""
    if initial_prompts is None:
        initial_prompts = sample_vocab_prompts(backbone.input_embeddings, len(tasks), n_prompt, config.seed,
                                               task_names=[t.name for t in tasks])
    elif initial_prompts.shape[0] != len(tasks):
        raise ValueError(f"{len(tasks)} tasks but {initial_prompts.shape[0]} initial prompts")
    params = SoftPrompts(initial_prompts).to(backbone.device)
    result = train_prompts(backbone, tasks, params, config, description="PT", on_evaluate=on_evaluate)
    return PromptTuningResult(params.prompt_table.detach().cpu(), result)


def ipt_initialised_prompt_tune(backbone: Backbone, tasks: Sequence[Task], proj_b: ProjB, z: Tensor,
                                config: TrainConfig) -> PromptTuningResult:
    """PT starting from Proj_b(z) for each task. z: [num_tasks, d_I]."""
    with torch.no_grad():
        initial = proj_b(z.float().to(next(proj_b.parameters()).device)).detach()
    return prompt_tune(backbone, tasks, config, initial_prompts=initial)
