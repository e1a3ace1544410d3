"""A 2-D map of a tenant's trained tasks: the first two principal components of their intrinsic vectors.

Tasks whose vectors point the same way learned similar prompts; the map shows that at a glance. Vectors of
another shape than the most common one (trained in another subspace) are left out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MapPoint:
    id: str
    x: float
    y: float


def pca_2d(vectors: dict[str, np.ndarray]) -> tuple[list[MapPoint], list[float]]:
    """(points, explained variance share of the two axes) of vectors {task id: z [d_I]}; one task maps to
    the origin, none to nothing."""
    if not vectors:
        return [], []
    shape = Counter(v.shape for v in vectors.values()).most_common(1)[0][0]
    ids = sorted(i for i, v in vectors.items() if v.shape == shape)
    x = np.stack([vectors[i].astype(np.float64) for i in ids])
    x -= x.mean(axis=0, keepdims=True)
    if len(ids) == 1 or not np.any(x):
        return [MapPoint(i, 0.0, 0.0) for i in ids], []
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2]
    coords = x @ axes.T
    if coords.shape[1] == 1:
        coords = np.hstack([coords, np.zeros_like(coords)])
    total = float((s ** 2).sum()) or 1.0
    return ([MapPoint(i, float(c[0]), float(c[1])) for i, c in zip(ids, coords, strict=True)],
            [float(v ** 2 / total) for v in s[:2]])
