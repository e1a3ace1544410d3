"""The playground's server side: the page and its static files are served by the API (no CDN), and /map puts
the caller's trained tasks on a plane (PCA of their vectors), tenant by tenant."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from service.settings import Settings
from service.task_map import pca_2d
from tests.service.conftest import run_worker_burst
from tests.service.test_api import create


def test_the_page_and_its_files_are_served_without_a_key(server: str) -> None:
    with httpx.Client(base_url=server) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>IPT playground</title>" in page.text
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sorted(sources) == ["/static/app.js", "/static/style.css"]  # the project's own files only
        for path in sources:
            r = anonymous.get(path)
            assert r.status_code == 200 and len(r.content) > 500, path
        assert "javascript" in anonymous.get("/static/app.js").headers["content-type"]
        assert anonymous.get("/map").status_code == 401  # the data behind the page still needs a key


def test_the_map_places_each_tenants_trained_tasks(alice: httpx.Client, bob: httpx.Client,
                                                   env_settings: Settings) -> None:
    ids = {create(alice, name=f"map_task_{i}")["id"] for i in range(3)}
    run_worker_burst(env_settings)
    data = alice.get("/map").json()
    mine = {t["id"]: t for t in data["tasks"] if t["id"] in ids}
    assert set(mine) == ids and all(t["kind"] == "classification" and t["name"].startswith("map_task")
                                    for t in mine.values())
    assert not {t["id"] for t in bob.get("/map").json()["tasks"]} & ids
    assert len(data["explained_variance"]) == 2 and 0 < sum(data["explained_variance"]) <= 1 + 1e-9


def test_pca_2d_finds_the_main_directions() -> None:
    rng = np.random.default_rng(0)
    direction = np.array([3.0, 0, 0, 0])
    vectors = {f"t{i}": (i - 5) * direction + rng.normal(0, 0.01, 4) for i in range(11)}
    vectors["other-subspace"] = np.ones(7)  # another shape: left out
    points, explained = pca_2d(vectors)
    assert {p.id for p in points} == {f"t{i}" for i in range(11)}
    xs = {p.id: p.x for p in points}
    assert abs(xs["t10"] - xs["t0"]) == pytest.approx(30, rel=1e-3) and explained[0] > 0.99
    assert pca_2d({}) == ([], []) and pca_2d({"a": np.ones(3)})[0][0].x == 0.0
