"""Smoke tests of the benchmark scripts: each script's main() in --quick mode (a tiny random model built on the
spot, a random subspace, a private redis-server, small counts). They check the table is printed and its figures
are sane and consistent, never how fast anything is (timings belong in the benchmarks' own output)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest


def finite_positive(values: Iterable[float]) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(autouse=True)
def _no_ipt_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks pass every setting explicitly; make sure IPT_* variables left by other tests cannot leak in."""
    import os

    for name in list(os.environ):
        if name.startswith("IPT_"):
            monkeypatch.delenv(name)
