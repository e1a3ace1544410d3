"""ipt_http_requests_total, scraped from /metrics over real HTTP after hostile requests: every 5xx is counted
with its route, and label values stay in fixed sets whatever methods and paths clients send."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.request_metrics import KNOWN_METHODS, OTHER_METHOD, UNMATCHED_ROUTE
from service.settings import Settings
from tests.service.conftest import running_app

KEY = "key-alice"


def _requests_total(base: str) -> Counter[tuple[str, str, str]]:
    """(method, route, status) -> count, as /metrics exports it."""
    text = httpx.get(f"{base}/metrics").text
    out: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ipt_http_requests_total":
                out[(sample.labels["method"], sample.labels["route"], sample.labels["status"])] += sample.value
    return out


def _app_with_failing_routes(settings: Settings) -> FastAPI:
    """The real app plus two routes that fail as a bug would: one raises, one answers what its response model
    refuses."""
    app = create_app(settings)

    @app.get("/test-only/raises", include_in_schema=False)
    def raises() -> None:
        raise RuntimeError("a bug")

    @app.get("/test-only/unrenderable", include_in_schema=False, response_model=int)
    def unrenderable() -> object:
        return {"not": "an int"}  # fails after the endpoint returned, while the response is built

    return app


def test_5xx_are_counted_and_label_values_stay_bounded(env_settings: Settings) -> None:
    settings = env_settings.model_copy(update={"queue_name": "ipt-metrics"})
    app = _app_with_failing_routes(settings)
    routes = set(app.openapi()["paths"]) | {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                                            "/test-only/raises", "/test-only/unrenderable",
                                            "/", "/static"}  # the playground page and its files
    with running_app(settings, app) as base, httpx.Client(base_url=base, timeout=60,
                                                          headers={"Authorization": f"Bearer {KEY}"}) as c:
        before = _requests_total(base)
        for _ in range(3):
            r = c.get("/test-only/raises")
            assert r.status_code == 500 and r.json() == {"detail": "internal error; it was logged"}, r.text
        for _ in range(2):
            assert c.get("/test-only/unrenderable").status_code == 500
        # hostile requests: odd methods and random paths, each a would-be new series
        odd_methods = [f"X{uuid.uuid4().hex[:8].upper()}" for _ in range(10)] + ["FOOBAR", "PROPFIND"]
        for method in odd_methods:
            assert c.request(method, "/tasks").status_code == 405
        for _ in range(10):
            assert c.get(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}").status_code == 404
        bad = c.post("/tasks", content=json.dumps({"name": "x\ud800", "train": []}).encode(),
                     headers={"Content-Type": "application/json"})
        assert bad.status_code == 422
        assert c.post("/tasks", content=b"x" * (settings.max_body_bytes + 1)).status_code == 413
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200
        after = _requests_total(base)

    delta = after - before
    assert delta[("GET", "/test-only/raises", "500")] == 3, delta
    assert delta[("GET", "/test-only/unrenderable", "500")] == 2, delta
    assert delta[(OTHER_METHOD, "/tasks", "405")] == len(odd_methods), delta
    assert delta[("GET", UNMATCHED_ROUTE, "404")] == 10, delta
    assert delta[("POST", "/tasks", "422")] == 1 and delta[("POST", "/tasks", "413")] == 1, delta
    assert delta[("GET", "/docs", "200")] == 1 and delta[("GET", "/openapi.json", "200")] == 1, delta
    methods = {m for m, _, _ in after}
    labelled_routes = {r for _, r, _ in after}
    assert methods <= KNOWN_METHODS | {OTHER_METHOD}, methods
    assert labelled_routes <= routes | {UNMATCHED_ROUTE}, labelled_routes - routes
    assert not any(m in methods for m in odd_methods)
