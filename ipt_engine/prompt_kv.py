"""Soft prompts run through the model once: their keys and values at every layer (a prefix KV cache).

In a causal LM a prefix's keys and values depend only on the prefix. A task's soft prompt Proj_b(z) is the
same for every request of the task, and so are the first tokens of every source it formats (`"{task name}:"`,
`tasks.source_prefix`): their keys and values can be computed once per (task, vector) and reused, and a served
row then runs only its input and option tokens.

A row holds n prompt positions and then its source prefix's k tokens (k may differ between rows, and be 0).
Rows stack along the batch dimension, zero-padded after their own positions to the widest row; a row's
`lengths` says how many positions are real. A row scored on the cache may use all of them (its source starts
with those tokens) or only the first n (it does not, e.g. cut from the left to fit the context).

Shapes: per layer, keys and values [batch, kv_heads, width, head_dim], width = max(lengths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass(frozen=True)
class PromptKV:
    """The keys and values of a batch of soft prompts (and of their source prefixes) at every layer
    (inference only: no gradient)."""

    keys: tuple[Tensor, ...]  # per layer [batch, kv_heads, width, head_dim]
    values: tuple[Tensor, ...]  # per layer [batch, kv_heads, width, head_dim]
    n_prompt: int = -1  # soft prompt positions, the same in every row; -1: all of width (no source prefixes)
    source_prefixes: tuple[tuple[int, ...], ...] = field(default=())  # per row, the source tokens cached after
    # the prompt; (): none in any row

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(f"need keys and values for every layer, got {len(self.keys)} and {len(self.values)}")
        if self.n_prompt < 0:
            object.__setattr__(self, "n_prompt", self.width)
        if not self.source_prefixes:
            object.__setattr__(self, "source_prefixes", ((),) * self.batch)
        if len(self.source_prefixes) != self.batch:
            raise ValueError(f"{len(self.source_prefixes)} source prefixes for {self.batch} rows")
        if max(self.lengths) != self.width:
            raise ValueError(f"rows hold at most {max(self.lengths)} positions but the tensors have {self.width}")

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def width(self) -> int:
        """Positions held by the tensors: the longest row's prompt and source prefix."""
        return self.keys[0].shape[2]

    @property
    def lengths(self) -> tuple[int, ...]:
        """Real positions of each row: n_prompt + its source prefix's tokens."""
        return tuple(self.n_prompt + len(p) for p in self.source_prefixes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def select(self, index: Sequence[int] | Tensor) -> PromptKV:
        """The rows `index` (with repeats), e.g. one row per served input from one row per task; trimmed to the
        widest selected row."""
        rows = [int(i) for i in torch.as_tensor(index, dtype=torch.long).reshape(-1)]
        prefixes = tuple(self.source_prefixes[i] for i in rows)
        width = self.n_prompt + max((len(p) for p in prefixes), default=0)
        if rows == list(range(self.batch)) and width == self.width:
            return self  # every row in its place: no copy (a served batch, one row per task, in order)
        idx = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
        return PromptKV(tuple(k.index_select(0, idx)[:, :, :width] for k in self.keys),
                        tuple(v.index_select(0, idx)[:, :, :width] for v in self.values), self.n_prompt, prefixes)

    def split(self, copy: bool = True) -> list[PromptKV]:
        """One PromptKV per row, without padding: cloned, so that a row kept does not pin the batch, or (copy
        False) views of this batch's tensors, for rows used once."""
        def part(t: Tensor, i: int, n: int) -> Tensor:
            return t[i:i + 1, :, :n].clone() if copy else t[i:i + 1, :, :n]

        return [PromptKV(tuple(part(k, i, n) for k in self.keys), tuple(part(v, i, n) for v in self.values),
                         self.n_prompt, (prefix,))
                for i, (n, prefix) in enumerate(zip(self.lengths, self.source_prefixes, strict=True))]

    def prompt_only(self) -> PromptKV:
        """The soft prompts' positions alone (no source prefix), every row n_prompt wide."""
        if self.width == self.n_prompt:
            return self
        return PromptKV(tuple(k[:, :, :self.n_prompt] for k in self.keys),
                        tuple(v[:, :, :self.n_prompt] for v in self.values), self.n_prompt)

    @staticmethod
    def stack(rows: Sequence[PromptKV]) -> PromptKV:
        """Rows of many tasks in one batch, each zero-padded after its own positions to the widest."""
        if not rows:
            raise ValueError("nothing to stack")
        shapes = {(r.n_prompt, len(r.keys)) for r in rows}
        if len(shapes) != 1:
            raise ValueError(f"prompt caches of different shapes (n, layers) cannot stack: {sorted(shapes)}")
        if len({r.width for r in rows}) == 1:  # no padding to add: one concatenation per layer
            return PromptKV(tuple(torch.cat(ks) for ks in zip(*(r.keys for r in rows), strict=True)),
                            tuple(torch.cat(vs) for vs in zip(*(r.values for r in rows), strict=True)),
                            rows[0].n_prompt, tuple(p for r in rows for p in r.source_prefixes))
        out = PromptKV.empty_like(rows[0], [p for r in rows for p in r.source_prefixes])
        begin = 0
        for r in rows:  # each copied once, straight into place (not padded first and then concatenated)
            out.place(range(begin, begin + r.batch), r)
            begin += r.batch
        return out

    @staticmethod
    def empty_like(like: PromptKV, source_prefixes: Sequence[Sequence[int]]) -> PromptKV:
        """A batch of len(source_prefixes) rows, each n_prompt + its source prefix's tokens long, with `like`'s
        layers, heads, head size, n_prompt, dtype and device; uninitialised until `place` fills its rows."""
        prefixes = tuple(tuple(p) for p in source_prefixes)
        width = like.n_prompt + max((len(p) for p in prefixes), default=0)

        def empty(t: Tensor) -> Tensor:
            return t.new_empty(len(prefixes), t.shape[1], width, t.shape[3])

        return PromptKV(tuple(empty(k) for k in like.keys), tuple(empty(v) for v in like.values), like.n_prompt,
                        prefixes)

    def place(self, rows: Sequence[int], part: PromptKV) -> None:
        """Write `part`'s rows into rows `rows` of this batch, in place, zero after each row's own positions: a
        batch is filled as its rows' caches are found or computed (`PrefixKVCache.stacked`), so that none is
        held twice. Each row must hold the same source prefix here as in `part`."""
        rows = list(rows)
        if len(rows) != part.batch or part.n_prompt != self.n_prompt or len(part.keys) != len(self.keys):
            raise ValueError(f"cannot place {part.batch} rows of n = {part.n_prompt}, {len(part.keys)} layers into "
                             f"{len(rows)} rows of n = {self.n_prompt}, {len(self.keys)} layers")
        if any(self.source_prefixes[r] != p for r, p in zip(rows, part.source_prefixes, strict=True)):
            raise ValueError("placed rows must hold the source prefixes this batch was sized for")
        w = part.width  # <= self.width: its rows' lengths are some of this batch's
        span = range(rows[0], rows[0] + len(rows))  # a part has rows, so `rows` is not empty
        at: slice | Tensor = (slice(span.start, span.stop) if rows == list(span)
                              else torch.tensor(rows, dtype=torch.long, device=self.keys[0].device))
        for dst, src in zip((*self.keys, *self.values), (*part.keys, *part.values), strict=True):
            dst[at, :, :w] = src  # a part's own padding is zeros already
            if w < self.width:
                dst[at, :, w:] = 0

    def to_cache(self, grow: bool = True) -> DynamicCache:
        """A fresh transformers cache holding these keys and values, for one forward pass. The layers hold these
        very tensors (DynamicCache's own constructor would copy each: its first update concatenates it to an empty
        tensor), and no pass writes into them.

        grow: the pass appends its own keys and values, as decoding needs. Without, each layer hands its
        attention the cached positions and the pass's own but keeps none of them: a scoring pass then holds one
        layer's concatenation at a time, not all of them until it ends (for 32 served rows of SmolLM2, ~60 MB)."""
        layer = DynamicLayer if grow else _ReadOnlyLayer
        cache = DynamicCache()
        cache.layers = [_held(layer(), k, v) for k, v in zip(self.keys, self.values, strict=True)]
        return cache

    @staticmethod
    def from_cache(cache: DynamicCache, n_prompt: int = -1,
                   source_prefixes: Sequence[Sequence[int]] = ()) -> PromptKV:
        """Keys and values a forward pass left in `cache` (taken over: not copied); each row's positions past its
        own are zeroed in place (a padded position's states are not meaningful and must not turn into NaN under a
        mask)."""
        keys = tuple(layer.keys for layer in cache.layers)
        values = tuple(layer.values for layer in cache.layers)
        prefixes = tuple(tuple(p) for p in source_prefixes)
        width = keys[0].shape[2]
        if prefixes and n_prompt >= 0 and min(n_prompt + len(p) for p in prefixes) < width:
            lengths = torch.tensor([n_prompt + len(p) for p in prefixes], device=keys[0].device)
            real = (torch.arange(width, device=keys[0].device)[None] < lengths[:, None])[:, None, :, None]
            for t in (*keys, *values):
                t.masked_fill_(~real, 0)
        return PromptKV(keys, values, n_prompt, prefixes)


class _ReadOnlyLayer(DynamicLayer):
    """A cache layer for a pass that reads the cached positions and appends nothing: `update` returns the cached
    keys and values followed by the pass's own and keeps only the cached ones."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _held(layer: DynamicLayer, keys: Tensor, values: Tensor) -> DynamicLayer:
    """`layer`, holding `keys` and `values` [batch, kv_heads, width, head_dim] uncopied."""
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer
