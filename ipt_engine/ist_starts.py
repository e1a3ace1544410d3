"""Where full-batch IST starts: z = 0, the mean of the known task vectors, and a few representatives of them.

A subspace found by MSF knows its train tasks' vectors (about 100 in the study's artifact). Scoring every one
of them on a new task's train rows costs a forward pass per (candidate, row): at 102 candidates, screened on 8
rows and the 10 best on 16, that is ~1,000 row forwards, more than the Gauss-Newton iterations that follow (one
IST iteration of a 48-row task is ~144 row-forward equivalents). So above `MAX_START_CANDIDATES` the known
vectors are reduced to their k-medoids in *prompt* space (distances between Proj_b(z_i), which is what the
model sees): a few real task vectors, one per group of similar prompts, rather than outliers (farthest-point
sampling) or averages of unrelated tasks (k-means centroids).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ipt_engine.subspace import ProjB

log = logging.getLogger(__name__)

MAX_START_CANDIDATES = 12
"""z = 0, the mean and at most 10 medoids: 12 candidates x 16 rows = 192 row forwards, about 1.3 IST iterations."""


def start_candidates(d_intrinsic: int, known_vectors: Tensor | None = None, *, proj_b: ProjB | None = None,
                     max_candidates: int = MAX_START_CANDIDATES) -> Tensor:
    """The starts Gauss-Newton IST chooses from: z = 0, then (with known task vectors [k, d_I], e.g. the vectors
    MSF learned for its train tasks) their mean and each of them, or, when that makes more than
    `max_candidates`, their `max_candidates - 2` medoids (in prompt space with `proj_b`, else in z space).
    Returns [1 (+ 1 + min(k, max_candidates - 2)), d_I]: z = 0 first, the mean second (`choose_start` relies
    on that order)."""
    if max_candidates < 3:
        raise ValueError(f"max_candidates must be >= 3 (z = 0, the mean and one task vector), got {max_candidates}")
    zero = torch.zeros(1, d_intrinsic)
    if known_vectors is None or known_vectors.numel() == 0:
        return zero
    if known_vectors.dim() != 2 or known_vectors.shape[1] != d_intrinsic:
        raise ValueError(f"known vectors must be [k, d_I={d_intrinsic}], got {tuple(known_vectors.shape)}")
    known = known_vectors.detach().float().cpu()
    mean = known.mean(0, keepdim=True)
    if known.shape[0] > max_candidates - 2:
        points = known
        if proj_b is not None:
            with torch.no_grad():
                points = proj_b(known.to(next(proj_b.parameters()).device)).flatten(1).float().cpu()
        index = medoids(points, max_candidates - 2)
        log.info("IST starts: %d medoids of %d known task vectors (rows %s), with z = 0 and the mean", len(index),
                 known.shape[0], index)
        known = known[index]
    return torch.cat([zero, mean, known])


def medoids(points: Tensor, k: int, max_rounds: int = 50) -> list[int]:
    """Indices (sorted) of `k` medoids of `points` [m, D] under the Euclidean distance: a greedy build (each
    medoid added where it lowers the total distance of every point to its nearest medoid most), then
    alternating refinement (assign each point to its nearest medoid; move each medoid to its group's member
    with the least total distance to the group) until nothing changes. Deterministic: no random start."""
    m = points.shape[0]
    if k >= m:
        return list(range(m))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dist = torch.cdist(points.double(), points.double())  # [m, m]
    chosen = [int(dist.sum(1).argmin())]
    nearest = dist[chosen[0]].clone()  # each point's distance to its nearest chosen medoid
    while len(chosen) < k:
        gain = (nearest[None, :] - dist).clamp(min=0).sum(1)  # [m]: how much adding each point would save
        gain[chosen] = -1.0
        best = int(gain.argmax())
        chosen.append(best)
        nearest = torch.minimum(nearest, dist[best])
    for _ in range(max_rounds):
        group = dist[chosen].argmin(0)  # [m]: index into `chosen` of each point's nearest medoid
        moved = list(chosen)
        for g in range(k):
            members = (group == g).nonzero().flatten()
            if members.numel() == 0:  # a medoid that duplicates another's point: its group is the other's
                continue
            within = dist[members][:, members].sum(1)
            moved[g] = int(members[within.argmin()])
        if moved == chosen:
            break
        chosen = moved
    return sorted(chosen)
