"""Soft prompts run through the model once: their keys and values at every layer (a prefix KV cache).

In a causal LM a prefix's keys and values depend only on the prefix. A task's soft prompt Proj_b(z) is the
same for every request of the task, so its keys and values can be computed once per (task, vector) and
reused: a served row then runs only its input and option tokens. Every task's prompt has the same length n,
so the caches of rows of different tasks stack along the batch dimension without padding.

Shapes: per layer, keys and values [batch, kv_heads, n, head_dim].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache


@dataclass(frozen=True)
class PromptKV:
    """The keys and values of a batch of soft prompts at every layer (inference only: no gradient)."""

    keys: tuple[Tensor, ...]  # per layer [batch, kv_heads, n, head_dim]
    values: tuple[Tensor, ...]  # per layer [batch, kv_heads, n, head_dim]

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(f"need keys and values for every layer, got {len(self.keys)} and {len(self.values)}")

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def n_prompt(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def select(self, index: Sequence[int] | Tensor) -> PromptKV:
        """The rows `index` (with repeats), e.g. one row per served input from one row per task."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.keys[0].device)
        return PromptKV(tuple(k.index_select(0, idx) for k in self.keys),
                        tuple(v.index_select(0, idx) for v in self.values))

    def split(self) -> list[PromptKV]:
        """One PromptKV per row (views of this one's tensors, cloned so a row does not pin the batch)."""
        return [PromptKV(tuple(k[i:i + 1].clone() for k in self.keys), tuple(v[i:i + 1].clone() for v in self.values))
                for i in range(self.batch)]

    @staticmethod
    def stack(rows: Sequence[PromptKV]) -> PromptKV:
        """Rows of many tasks in one batch (every prompt has the same n, so no padding is needed)."""
        if not rows:
            raise ValueError("nothing to stack")
        shapes = {(r.n_prompt, len(r.keys)) for r in rows}
        if len(shapes) != 1:
            raise ValueError(f"prompt caches of different shapes (n, layers) cannot stack: {sorted(shapes)}")
        layers = len(rows[0].keys)
        return PromptKV(tuple(torch.cat([r.keys[i] for r in rows]) for i in range(layers)),
                        tuple(torch.cat([r.values[i] for r in rows]) for i in range(layers)))

    def to_cache(self) -> DynamicCache:
        """A fresh transformers cache holding these keys and values (the model appends to it in place, so
        each forward gets its own)."""
        return DynamicCache(list(zip(self.keys, self.values, strict=True)))

    @staticmethod
    def from_cache(cache: DynamicCache) -> PromptKV:
        return PromptKV(tuple(layer.keys for layer in cache.layers), tuple(layer.values for layer in cache.layers))
