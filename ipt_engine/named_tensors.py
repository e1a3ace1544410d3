"""Saving and loading per-task tensors (PT prompts [n, d] or intrinsic vectors [d_I]) keyed by task name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ipt_engine.errors import InvalidTaskError


def save_named(path: str | Path, tensors: Mapping[str, Tensor]) -> None:
    """Write {task name: tensor} to one safetensors file (fp32, CPU)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_named(path: str | Path) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return load_file(str(path))


def load_chunks(directory: str | Path) -> dict[str, Tensor]:
    """Merge every chunk*.safetensors of an experiment stage directory (see ipt_engine.experiments.pipeline)."""
    tensors: dict[str, Tensor] = {}
    for chunk in sorted(Path(directory).glob("chunk*.safetensors")):
        tensors.update(load_named(chunk))
    return tensors


def stack_for(tasks: Sequence[str], tensors: Mapping[str, Tensor], what: str) -> Tensor:
    """Stack the tensors of `tasks`, in order: [len(tasks), ...]. Names every missing task."""
    missing = [t for t in tasks if t not in tensors]
    if missing:
        raise InvalidTaskError(f"no {what} for task(s) {missing}; have {sorted(tensors)[:20]}")
    return torch.stack([tensors[t].float() for t in tasks])
