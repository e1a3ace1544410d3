"""Every answer option of a row scored in the row's one forward pass (causal LMs): a tree-shaped attention mask.

Rank classification needs, for each (row, option), log p(option tokens | prompt, source). The options of a row
share its prompt and source, so they are packed after it in one sequence:

    [source s_1..s_S] [option 1: t_1..t_{L1-1}] [option 2: u_1..u_{L2-1}] ... [padding]

An option's tokens sit at the positions they would have right after the source, and attend to the prompt, the
source and their own earlier tokens only, never to another option's. The first token of every option is predicted
from the last source column; its later tokens from the option's own columns. One pass over n + S + sum(L - 1)
tokens then gives what k separate sequences of n + S + L tokens would, with no copy of any cache.

Shapes (B rows in a pass, W packed columns, Q scored tokens): ids, positions [B, W]; allowed [B, W, W];
picks [Q].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedRows:
    """Rows of (source, options) laid out for one forward pass, and which outputs score which option token."""

    ids: Tensor  # [B, W] token ids; padding where a row is shorter than W
    positions: Tensor  # [B, W] position of each column counted from the first source token (add n for a prompt)
    allowed: Tensor  # [B, W, W] bool: column q may attend to column k (a padding column attends to itself only)
    pick_row: Tensor  # [Q] the row of each scored token
    pick_col: Tensor  # [Q] the column whose output predicts it; -1 = the last prompt position (empty source)
    pick_token: Tensor  # [Q] the token id scored there
    pick_pair: Tensor  # [Q] the (row, option) pair the token belongs to (caller's numbering)

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def attention_mask(self, n_prompt: int, prompt_queries: bool) -> Tensor:
        """The boolean mask [B, 1, queries, n_prompt + W] for a model that sees n_prompt prompt positions first.

        Every column may attend to every prompt position. With `prompt_queries` the prompt positions are queries
        too (the prompt runs in this pass, causally); without, their keys and values come from a cache."""
        rows, width = self.ids.shape
        if not prompt_queries:
            return self.cached_attention_mask(torch.ones(rows, n_prompt, dtype=torch.bool))
        body = torch.cat([torch.ones(rows, width, n_prompt, dtype=torch.bool), self.allowed], dim=2)
        if n_prompt:
            head = torch.zeros(rows, n_prompt, n_prompt + width, dtype=torch.bool)
            head[:, :, :n_prompt] = torch.ones(n_prompt, n_prompt, dtype=torch.bool).tril()
            body = torch.cat([head, body], dim=1)
        return body[:, None]

    def cached_attention_mask(self, visible: Tensor) -> Tensor:
        """The boolean mask [B, 1, W, P + W] when P cached positions come first and row b may attend to those
        where visible[b] ([B, P] bool) is True: its own prompt and source prefix, not another row's padding."""
        rows, width = self.ids.shape
        return torch.cat([visible[:, None, :].expand(rows, width, visible.shape[1]), self.allowed], dim=2)[:, None]

    def scored_columns(self) -> tuple[Tensor, Tensor]:
        """The distinct (row, column) outputs the scored tokens need [C, 2], and each scored token's one [Q]: the
        options' first tokens share their row's last source column, so the LM head runs once per column."""
        return torch.unique(torch.stack([self.pick_row, self.pick_col], dim=1), dim=0, return_inverse=True)


def packed_width(source: Sequence[int], targets: Sequence[Sequence[int]]) -> int:
    """Columns a row takes: its source and every option's tokens but the last (which only gets scored)."""
    return len(source) + sum(len(t) - 1 for t in targets)


def pack_rows(sources: Sequence[Sequence[int]], targets: Sequence[Sequence[tuple[int, Sequence[int]]]],
              pad_id: int) -> PackedRows:
    """Lay out rows for one pass. sources: per row, its token ids. targets: per row, (pair index, option token
    ids) for each of its options; every option has at least one token."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but options for {len(targets)} rows")
    width = max(packed_width(s, [t for _, t in opts]) for s, opts in zip(sources, targets, strict=True))
    rows = len(sources)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros(rows, width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)  # padding attends to itself: no empty row
    picks: list[tuple[int, int, int, int]] = []  # (row, column, token, pair)
    for r, (src, opts) in enumerate(zip(sources, targets, strict=True)):
        s = len(src)
        if s:
            ids[r, :s] = torch.tensor(src)
            positions[r, :s] = torch.arange(s)
            allowed[r, :s, :s] = torch.ones(s, s, dtype=torch.bool).tril()
        col = s
        for pair, tokens in opts:
            if not tokens:
                raise ValueError(f"option {pair} has no tokens to score")
            picks.append((r, s - 1, tokens[0], pair))
            fed = len(tokens) - 1
            if fed:
                span = slice(col, col + fed)
                ids[r, span] = torch.tensor(tokens[:-1])
                positions[r, span] = s + torch.arange(fed)
                allowed[r, span, :s] = True
                allowed[r, span, span] = torch.ones(fed, fed, dtype=torch.bool).tril()
                picks += [(r, col + j - 1, tokens[j], pair) for j in range(1, len(tokens))]
                col += fed
    pick = torch.tensor(picks, dtype=torch.long).reshape(-1, 4)
    return PackedRows(ids, positions, allowed, pick[:, 0], pick[:, 1], pick[:, 2], pick[:, 3])
