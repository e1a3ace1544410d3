"""The intrinsic task subspace: Proj (prompt -> intrinsic vector) and Proj_b (intrinsic vector -> prompt).

As in the paper and its official code (DESIGN.md):
- Proj:   one linear layer, n*d -> d_I.
- Proj_b: d_I -> d_I' -> tanh -> n*d (two linear layers).
Proj_b(z) for z in R^{d_I} spans the intrinsic subspace of soft prompts; IST tunes z only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SubspaceConfig:
    """Shape of an intrinsic subspace."""

    n_prompt: int  # n: soft-prompt length in tokens (official code: 100)
    d_model: int  # d: the backbone's hidden size (SmolLM2-135M: 576)
    d_intrinsic: int = 250  # d_I: the intrinsic dimension, the number of floats a task is stored as
    d_hidden: int = 768  # d_I': Proj_b's hidden width (official code: 768)
    with_proj: bool = True  # False: the MSF variant without Proj (free per-task z trained with Proj_b)

    def __post_init__(self) -> None:
        for name in ("n_prompt", "d_model", "d_intrinsic", "d_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def prompt_numel(self) -> int:
        return self.n_prompt * self.d_model

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)


class Proj(nn.Module):
    """Encoder: a soft prompt [batch, n, d] -> an intrinsic vector [batch, d_I]."""

    def __init__(self, config: SubspaceConfig) -> None:
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.prompt_numel, config.d_intrinsic)

    def forward(self, prompts: Tensor) -> Tensor:
        return self.linear(prompts.flatten(1))


class ProjB(nn.Module):
    """Decoder: an intrinsic vector [batch, d_I] -> a soft prompt [batch, n, d] (Linear, tanh, Linear)."""

    def __init__(self, config: SubspaceConfig) -> None:
        super().__init__()
        self.config = config
        self.up = nn.Linear(config.d_intrinsic, config.d_hidden)
        self.out = nn.Linear(config.d_hidden, config.prompt_numel)

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.config.d_intrinsic:
            raise ValueError(f"z must end in d_I={self.config.d_intrinsic}, got shape {tuple(z.shape)}")
        flat = self.out(torch.tanh(self.up(z)))
        return flat.view(*z.shape[:-1], self.config.n_prompt, self.config.d_model)


class IntrinsicSubspace(nn.Module):
    """The MSF auto-encoder: `proj` (absent in the no-Proj variant) and `proj_b`."""

    def __init__(self, config: SubspaceConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = Proj(config) if config.with_proj else None
        self.proj_b = ProjB(config)

    def encode(self, prompts: Tensor) -> Tensor:
        """[batch, n, d] -> [batch, d_I]."""
        if self.proj is None:
            raise RuntimeError("this subspace was trained without Proj; find z for a prompt with IST instead")
        return self.proj(prompts)

    def decode(self, z: Tensor) -> Tensor:
        """[batch, d_I] -> [batch, n, d]."""
        return self.proj_b(z)

    def reconstruct(self, prompts: Tensor) -> Tensor:
        """Proj_b(Proj(P)): [batch, n, d] -> [batch, n, d]."""
        return self.decode(self.encode(prompts))
