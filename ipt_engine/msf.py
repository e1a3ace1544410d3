"""Multi-task Subspace Finding (MSF): learn Proj and Proj_b from many tasks' PT prompts.

Loss per step (tasks sampled into one batch, each row with its own task's reconstructed prompt):
    L = L_LM(rows, prompts = Proj_b(Proj(P_i))) + alpha * MSE(Proj_b(Proj(P_i)), P_i)
with the PLM frozen and only Proj and Proj_b trained. MSE is a mean over elements, as in the official
code (alpha = 200 there).

The variant without Proj trains a free z_i per task jointly with Proj_b on L_LM only (there is no
prompt to reconstruct).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ipt_engine.backbone import Backbone
from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.tasks import Task
from ipt_engine.training import PromptParameters, TrainConfig, TrainResult, train_prompts

DEFAULT_ALPHA = 200.0
log = logging.getLogger(__name__)


class ReconstructedPrompts(PromptParameters):
    """MSF with Proj: prompts are Proj_b(Proj(P_i)) of the fixed PT prompts `task_prompts` [T, n, d]."""

    per_task = False

    def __init__(self, subspace: IntrinsicSubspace, task_prompts: Tensor, alpha: float) -> None:
        super().__init__()
        if subspace.proj is None:
            raise ValueError("MSF with reconstruction needs a subspace with Proj (config.with_proj=True)")
        self.subspace = subspace
        self.register_buffer("task_prompts", task_prompts.detach().float().clone())
        self.alpha = alpha

    def prompts(self, task_index: Tensor) -> Tensor:
        return self.subspace.reconstruct(self.task_prompts.index_select(0, task_index))

    def auxiliary_loss(self, task_index: Tensor) -> Tensor | None:
        if self.alpha == 0:
            return None
        original = self.task_prompts.index_select(0, task_index)
        return self.alpha * torch.mean((self.subspace.reconstruct(original) - original) ** 2)


class JointVectors(PromptParameters):
    """MSF without Proj: free per-task `z_table` [T, d_I] trained jointly with Proj_b."""

    per_task = False

    def __init__(self, subspace: IntrinsicSubspace, num_tasks: int, init_std: float, seed: int) -> None:
        super().__init__()
        self.subspace = subspace
        gen = torch.Generator().manual_seed(seed)
        self.z_table = nn.Parameter(torch.randn(num_tasks, subspace.config.d_intrinsic, generator=gen) * init_std)

    def prompts(self, task_index: Tensor) -> Tensor:
        return self.subspace.decode(self.z_table.index_select(0, task_index))


@dataclass
class MSFResult:
    subspace: IntrinsicSubspace  # best-dev Proj (if any) and Proj_b, on CPU
    task_vectors: Tensor  # [T, d_I]: Proj(P_i), or the jointly trained z_i of the no-Proj variant
    train: TrainResult


def find_subspace(backbone: Backbone, tasks: Sequence[Task], config: TrainConfig, subspace_config: SubspaceConfig,
                  *, task_prompts: Tensor | None = None, alpha: float = DEFAULT_ALPHA,
                  z_init_std: float = 0.01, recon_warmup_steps: int = 0, recon_warmup_lr: float = 1e-3
                  ) -> MSFResult:
    """Run MSF. With Proj (default) `task_prompts` [T, n, d] are the tasks' PT prompts; without Proj
    (`subspace_config.with_proj=False`) they are not needed.

    `recon_warmup_steps` > 0 (with Proj only) first fits Proj and Proj_b to the reconstruction loss alone,
    full batch, which needs no PLM forward: thousands of such steps cost less than one LM step on a CPU, so
    the joint steps start from an autoencoder of the prompts instead of from random weights."""
    if subspace_config.d_model != backbone.hidden_size:
        raise ValueError(f"subspace d_model={subspace_config.d_model} but the backbone has d={backbone.hidden_size}")
    torch.manual_seed(config.seed)
    subspace = IntrinsicSubspace(subspace_config)
    params: PromptParameters
    if subspace_config.with_proj:
        if task_prompts is None:
            raise ValueError("MSF with Proj needs the tasks' PT prompts (task_prompts [T, n, d])")
        expected = (len(tasks), subspace_config.n_prompt, subspace_config.d_model)
        if tuple(task_prompts.shape) != expected:
            raise ValueError(f"task_prompts must have shape {expected}, got {tuple(task_prompts.shape)}")
        params = ReconstructedPrompts(subspace, task_prompts, alpha)
        if recon_warmup_steps:
            fit_reconstruction(subspace, task_prompts, recon_warmup_steps, recon_warmup_lr)
    else:
        params = JointVectors(subspace, len(tasks), z_init_std, config.seed)
    params = params.to(backbone.device)
    result = train_prompts(backbone, tasks, params, config, description="MSF")
    subspace = subspace.cpu().eval()
    with torch.no_grad():
        if isinstance(params, ReconstructedPrompts):
            vectors = subspace.encode(params.task_prompts.cpu())
        else:
            vectors = params.z_table.detach().cpu()
    return MSFResult(subspace, vectors.detach().clone(), result)


def fit_reconstruction(subspace: IntrinsicSubspace, prompts: Tensor, steps: int, learning_rate: float = 1e-3) -> float:
    """Train Proj and Proj_b on MSE(Proj_b(Proj(P)), P) alone over prompts [T, n, d] (full batch, Adam);
    returns the final error."""
    if subspace.proj is None:
        raise ValueError("reconstruction needs a subspace with Proj")
    target = prompts.detach().float().to(next(subspace.parameters()).device)
    optimizer = torch.optim.Adam(subspace.parameters(), lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.mean((subspace.reconstruct(target) - target) ** 2)
        loss.backward()
        optimizer.step()
    error = reconstruction_error(subspace, target)
    log.info("MSF reconstruction warm-up: %d steps, MSE %.4g", steps, error)
    return error


@torch.no_grad()
def reconstruction_error(subspace: IntrinsicSubspace, prompts: Tensor) -> float:
    """Mean squared error of Proj_b(Proj(P)) against P over prompts [T, n, d]."""
    return float(torch.mean((subspace.reconstruct(prompts.float()) - prompts.float()) ** 2))
