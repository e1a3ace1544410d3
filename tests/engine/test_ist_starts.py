"""IST start candidates: z = 0, the mean, and the known task vectors or their medoids in prompt space."""

from __future__ import annotations

import pytest
import torch

from ipt_engine.ist_starts import MAX_START_CANDIDATES, medoids, start_candidates
from ipt_engine.subspace import ProjB, SubspaceConfig


def clusters(centres: list[list[float]], per: int, spread: float = 0.05, seed: int = 0) -> torch.Tensor:
    """`per` points around each centre, centre after centre: [len(centres) * per, D]."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centres)
    return (c.repeat_interleave(per, 0) + spread * torch.randn(len(centres) * per, c.shape[1], generator=g))


def test_medoids_take_one_member_of_each_cluster() -> None:
    points = clusters([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], per=7)
    chosen = medoids(points, 3)
    assert sorted(i // 7 for i in chosen) == [0, 1, 2]
    # a medoid is a real point near its cluster's middle, not an outlier of it
    for i in chosen:
        members = points[(i // 7) * 7:(i // 7 + 1) * 7]
        assert (points[i] - members.mean(0)).norm() < 0.1


def test_medoids_are_deterministic_and_sorted() -> None:
    points = torch.randn(40, 5, generator=torch.Generator().manual_seed(3))
    first = medoids(points, 6)
    assert first == medoids(points.clone(), 6) == sorted(first)
    assert len(set(first)) == 6


def test_medoids_of_few_points_are_all_of_them_and_duplicates_do_not_break() -> None:
    points = torch.randn(4, 3)
    assert medoids(points, 4) == [0, 1, 2, 3]
    assert medoids(points, 9) == [0, 1, 2, 3]
    same = torch.ones(6, 2)
    assert len(set(medoids(same, 3))) == 3
    with pytest.raises(ValueError, match="k must be"):
        medoids(points, 0)


def test_start_candidates_keep_every_known_vector_up_to_the_cap() -> None:
    known = torch.randn(MAX_START_CANDIDATES - 2, 3)
    starts = start_candidates(3, known)
    assert torch.equal(starts[0], torch.zeros(3))
    assert torch.allclose(starts[1], known.mean(0))
    assert torch.equal(starts[2:], known)


def test_start_candidates_above_the_cap_are_medoids_with_zero_and_the_mean_first() -> None:
    known = clusters([[0.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.0, 5.0, 5.0], [5.0, 0.0, 5.0]], per=10)
    starts = start_candidates(3, known, max_candidates=6)
    assert starts.shape == (6, 3)
    assert torch.equal(starts[0], torch.zeros(3))
    assert torch.allclose(starts[1], known.mean(0))  # the mean of all the known vectors, not of the medoids
    rows = [int((known == s).all(1).nonzero()) for s in starts[2:]]  # each start is one of the known vectors
    assert sorted(r // 10 for r in rows) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="max_candidates"):
        start_candidates(3, known, max_candidates=2)


def test_start_candidates_group_vectors_by_the_prompts_they_make() -> None:
    """With Proj_b given, distance is measured between prompts: a coordinate Proj_b ignores does not separate."""
    proj_b = ProjB(SubspaceConfig(n_prompt=2, d_model=3, d_intrinsic=2, d_hidden=4))
    with torch.no_grad():
        proj_b.up.weight[:, 1] = 0.0  # the second coordinate of z never reaches the prompt
    # in z space two far groups along the ignored coordinate; in prompt space two groups along the first
    known = torch.tensor([[x, y] for x in (-2.0, 2.0) for y in (-50.0, 50.0) for _ in range(5)])
    known += 0.01 * torch.randn(known.shape, generator=torch.Generator().manual_seed(1))
    in_prompts = start_candidates(2, known, proj_b=proj_b, max_candidates=4)[2:]
    in_z = start_candidates(2, known, max_candidates=4)[2:]
    assert sorted(float(v) > 0 for v in in_prompts[:, 0]) == [False, True]  # one start per prompt group
    assert sorted(float(v) > 0 for v in in_z[:, 1]) == [False, True]  # z space splits on the ignored one
