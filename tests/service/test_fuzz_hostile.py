"""Hostile input in every string and number field of every route, beside schemathesis (test_fuzz.py), whose
generators never produce these: lone UTF-16 surrogates ("\\ud800" escaped in JSON), NaN and Infinity
literals, huge numbers, megabytes of text, odd HTTP methods and broken percent-encodings.

Each case starts from a valid request of its route and replaces one field. Checked, over real HTTP against
the real app on its own Redis:
- no answer is a 5xx, every answer is JSON a strict parser reads, and no answer is large (a 422 echoes a
  truncated, escaped input);
- no task is left stuck: every task created while fuzzing ends in a final state once a worker has run;
- later good requests still work (list, read, predict, similar), and a poisoned request sent together with
  good ones of the same task never fails the good ones;
- the cases reach every field: the leaves of the request schemas in the OpenAPI document are all mutated.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.settings import Settings, hash_api_key
from tests.service.conftest import run_worker_burst, running_app
from tests.service.redis_process import RedisProcess
from tests.service.test_api import task_body

KEY = "key-hostile"
HUGE_NAME_CHARS = 1_900_000
"""The issue's 1.9 MB name: the body limit of this module's app is raised to let it through."""
MAX_ANSWER_BYTES = 20_000
"""No answer to a hostile request may be larger (the 422 of a 1.9 MB name was 1.9 MB)."""

SURROGATES = ["\ud800", "x\udfff", "ok\ud83d"]  # lone high, lone low, a high one without its pair at the end
NUMBERS = [float("nan"), float("inf"), float("-inf"), 10**40, -(10**40), 1e308 * 10]  # the last is inf too
HOSTILE: list[Any] = [*SURROGATES, *NUMBERS, "n" * 50_000, None, [], {}, True]
ODD_METHODS = ["FOOBAR", "PROPFIND", "X-" + "M" * 40, "TRACE", "M-SEARCH"]


def encode(body: Any) -> bytes:
    """What a lax JSON encoder sends: lone surrogates as \\u escapes, NaN / Infinity as literals."""
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode("ascii")


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths of every string and number inside a JSON value (object values, and the first item of each list:
    the others have the same schema)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list) and value:
        yield from leaves(value[0], (*path, 0))
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        yield path


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    copy = json.loads(json.dumps(value))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = new
    return copy


def mc_body(name: str) -> dict[str, Any]:
    train = [{"input": f"pick a colour {i}", "output": "red", "options": ["red", "blue", "green"]} for i in range(6)]
    return {"name": name, "kind": "multiple_choice", "train": train, "dev": train[:2],
            "training": {"optimizer": "adamw", "max_iterations": 2, "patience": 2, "learning_rate": 0.5,
                         "max_steps": 2, "batch_size": 2, "eval_every": 1, "seed": 1}}


def cls_body(name: str) -> dict[str, Any]:
    body = task_body(name=name, kind="classification", labels=["negative", "positive"])
    body["dev"] = body["train"][:2]
    body["training"] = {"optimizer": "gauss_newton", "max_iterations": 2, "patience": 2, "learning_rate": 1.0,
                        "max_steps": 2, "batch_size": 2, "eval_every": 1, "seed": 0}
    return body


@dataclass
class Target:
    base: str
    settings: Settings
    cls: str  # a trained classification task
    mc: str  # a trained multiple-choice task
    schema: dict[str, Any]


@pytest.fixture(scope="module")
def target(env_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    server = RedisProcess(tmp_path_factory.mktemp("hostile_redis"))
    server.start()
    settings = env_settings.model_copy(update={
        "redis_url": server.url, "queue_name": "ipt-hostile", "api_keys": {hash_api_key(KEY): "hostile"},
        "max_body_bytes": 4_000_000, "rate_limit_create_per_window": 0, "rate_limit_predict_per_window": 0,
        "max_active_tasks_per_tenant": 0})
    try:
        with running_app(settings) as base, httpx.Client(base_url=base, headers=_auth(), timeout=60) as client:
            ids = {}
            for kind, body in (("cls", cls_body("hostile_cls")), ("mc", mc_body("hostile_mc"))):
                r = client.post("/tasks", content=encode(body), headers={"Content-Type": "application/json"})
                assert r.status_code == 202, r.text
                ids[kind] = r.json()["id"]
            run_worker_burst(settings)
            for tid in ids.values():
                assert client.get(f"/tasks/{tid}").json()["status"] == "succeeded"
            yield Target(base, settings, ids["cls"], ids["mc"], client.get("/openapi.json").json())
    finally:
        server.stop()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def check(r: httpx.Response, what: str) -> None:
    """Not a 5xx, strict JSON (no NaN, valid UTF-8) when it has a body, and small when it is an error."""
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert len(r.content) <= MAX_ANSWER_BYTES, (what, r.status_code, len(r.content), r.text[:300])
    if r.content and r.headers.get("content-type", "").startswith("application/json"):
        json.loads(r.content.decode("utf-8"), parse_constant=lambda c: pytest.fail(f"{what}: {c} in the answer"))


def import_body(name: str) -> dict[str, Any]:
    """A POST /tasks/import body with every field present (its adapter does not fit: a 422 at best)."""
    example = {"input": "pick one", "output": "a", "options": ["a", "b"]}
    return {"name": name, "kind": "multiple_choice", "labels": ["a", "b"], "train": [example] * 4, "dev": [example],
            "tune": True, "adapter": {"config": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2},
                                      "weights": "AAAA"}}


def body_cases(t: Target) -> list[tuple[str, str, Any]]:
    """(path, description, body) for every field of every JSON body, each replaced by each hostile value."""
    bases = [("/tasks", cls_body("fuzz_cls")), ("/tasks", mc_body("fuzz_mc")),
             (f"/tasks/{t.cls}/predict", {"inputs": ["the movie was great", "the movie was bad"]}),
             (f"/tasks/{t.mc}/predict", {"inputs": ["pick a colour"], "options": [["red", "blue"]]}),
             ("/tasks/import", import_body("fuzz_import"))]
    cases = []
    for path, base in bases:
        for leaf in leaves(base):
            for value in HOSTILE:
                cases.append((path, f"{'.'.join(map(str, leaf))} = {str(value)[:20]!r}", replaced(base, leaf, value)))
        cases.append((path, "whole body NaN", float("nan")))
        cases.append((path, "key with a surrogate", {**base, "\ud800": 1}))
    issue = {"name": "s", "kind": "classification", "labels": ["a", "b", "c\ud800"],
             "train": [{"input": "x1", "output": "a"}, {"input": "y1", "output": "b"},
                       {"input": "x2", "output": "a"}, {"input": "y2", "output": "b"}]}
    cases.append(("/tasks", "the issue's unused surrogate label", issue))
    cases.append(("/tasks", "the issue's NaN learning rate", {**issue, "labels": None,
                                                              "training": {"learning_rate": float("nan")}}))
    cases.append(("/tasks", "a 1.9 MB name", {**issue, "labels": None, "name": "n" * HUGE_NAME_CHARS}))
    return cases


def test_hostile_values_in_every_body_field_are_4xx(target: Target) -> None:
    with httpx.Client(base_url=target.base, headers=_auth(), timeout=60) as client:
        statuses: dict[int, int] = {}
        for path, what, body in body_cases(target):
            r = client.post(path, content=encode(body), headers={"Content-Type": "application/json"})
            check(r, f"POST {path} {what}")
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if what.startswith("a 1.9 MB name"):
                assert r.status_code == 422 and "characters in all" in r.text, r.text[:300]
            if "surrogate" in what and r.status_code == 422:
                assert "\\ud800" in r.text or "surrogate" in r.text or "unicode" in r.text.lower(), r.text[:300]
        assert statuses.get(422, 0) > 100, statuses  # the hostile values were refused, not all ignored
        # some replacements are harmless (a number where a string is free-form is still refused by type;
        # a long input is a 413): anything but 422 must still be a deliberate 4xx or a success
        assert set(statuses) <= {200, 202, 409, 413, 422}, statuses


def test_hostile_values_in_paths_queries_and_headers_are_4xx(target: Target) -> None:
    raw_ids = ["%ED%A0%80", "%F0", "%00", "NaN", "Infinity", "9" * 400, "%25" * 100, target.cls + "%ED%A0%80"]
    queries = ["NaN", "Infinity", "-Infinity", "1e400", "9" * 50, "%ED%A0%80", "%F0%28", "-1", "1.5"]
    with httpx.Client(base_url=target.base, headers=_auth(), timeout=60) as client:
        for raw in raw_ids:
            for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/similar"),
                                   ("POST", "/predict")):
                r = client.request(method, httpx.URL(f"{target.base}/tasks/{raw}{suffix}"),
                                   content=encode({"inputs": ["x"]}), headers={"Content-Type": "application/json"})
                check(r, f"{method} /tasks/{raw}{suffix}")
                assert r.status_code in (404, 405, 422), (method, raw, suffix, r.status_code)
        for value in queries:
            for path, name in (("/tasks", "offset"), ("/tasks", "limit"), (f"/tasks/{target.cls}/similar", "k")):
                r = client.get(httpx.URL(f"{target.base}{path}?{name}={value}"))
                check(r, f"GET {path}?{name}={value}")
                assert r.status_code in (200, 422), (path, name, value, r.status_code)
        for key in [b"\xff\xfe", b"k" * 5000, b"\x7f", "é".encode(), b"%ED%A0%80"]:
            r = client.post("/tasks", content=encode(cls_body("hostile_key")),
                            headers={"Content-Type": "application/json", "Idempotency-Key": key})
            check(r, f"Idempotency-Key {key[:10]!r}")
            assert r.status_code in (202, 422), (key[:10], r.status_code, r.text[:300])
        for method in ODD_METHODS:
            for path in ("/tasks", f"/tasks/{target.cls}", "/metrics", "/nowhere"):
                r = client.request(method, path)
                check(r, f"{method} {path}")


def test_a_poisoned_row_never_fails_the_good_rows_of_its_batch(target: Target) -> None:
    """Good and poisoned predicts of one task, sent at once so that they share micro-batches: the poisoned
    ones are 422s, every good one is answered."""
    good = {"inputs": ["the movie was great", "the movie was bad"]}
    poisoned = [{"inputs": ["x\ud800"]}, {"inputs": ["fine", "y\udfff"]}, {"inputs": [float("nan")]}]
    results: list[tuple[str, int, str]] = []

    def send(kind: str, body: Any) -> None:
        with httpx.Client(base_url=target.base, headers=_auth(), timeout=60) as c:
            r = c.post(f"/tasks/{target.cls}/predict", content=encode(body),
                       headers={"Content-Type": "application/json"})
            results.append((kind, r.status_code, r.text))

    threads = [threading.Thread(target=send, args=("good", good)) for _ in range(6)]
    threads += [threading.Thread(target=send, args=("poisoned", p)) for p in poisoned * 2]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert len(results) == len(threads)
    for kind, status, text in results:
        if kind == "good":
            assert status == 200 and len(json.loads(text)["predictions"]) == 2, (status, text[:300])
        else:
            assert status == 422, (status, text[:300])


def test_no_task_is_stuck_and_good_requests_still_work(target: Target) -> None:
    """After everything above: a worker run leaves no task queued or running, and every route still serves
    a good request."""
    run_worker_burst(target.settings)
    with httpx.Client(base_url=target.base, headers=_auth(), timeout=60) as client:
        listed = client.get("/tasks", params={"limit": 100})
        assert listed.status_code == 200, listed.text
        tasks = listed.json()["tasks"]
        assert len(tasks) >= 2
        stuck = [(t["id"], t["name"], t["status"]) for t in tasks if t["status"] in ("queued", "running")]
        assert not stuck, stuck
        for t in tasks:
            assert client.get(f"/tasks/{t['id']}").status_code == 200
        r = client.post(f"/tasks/{target.cls}/predict", json={"inputs": ["the movie was great"]})
        assert r.status_code == 200, r.text
        r = client.post(f"/tasks/{target.mc}/predict", json={"inputs": ["a colour"], "options": [["red", "blue"]]})
        assert r.status_code == 200, r.text
        assert client.get(f"/tasks/{target.cls}/similar").status_code == 200
        created = client.post("/tasks", json=cls_body("after_fuzz"))
        assert created.status_code == 202, created.text
        run_worker_burst(target.settings)
        assert client.get(f"/tasks/{created.json()['id']}").json()["status"] == "succeeded"


def _schema_leaves(schema: dict[str, Any], node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple]:
    """Paths (list items as '*') of every string and number property a request schema defines."""
    if "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    for option in node.get("anyOf", []):
        yield from _schema_leaves(schema, option, path)
    kind = node.get("type")
    if kind == "object":
        for name, sub in node.get("properties", {}).items():
            yield from _schema_leaves(schema, sub, (*path, name))
    elif kind == "array":
        yield from _schema_leaves(schema, node["items"], (*path, "*"))
    elif kind in ("string", "number", "integer") or "enum" in node or "const" in node:
        yield path


def test_the_cases_reach_every_field_of_every_request_body(target: Target) -> None:
    """Control: every string or number leaf of every request body in the OpenAPI schema is mutated by some
    case (a new field would otherwise escape the hostile fuzzing)."""
    schema = target.schema
    wanted: set[tuple[str, tuple]] = set()
    for path, item in schema["paths"].items():
        for op in item.values():
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content:
                wanted |= {(path, leaf) for leaf in _schema_leaves(schema, content["schema"])}
    assert wanted, "no request body found in the schema"
    covered = set()
    for path, what, _ in body_cases(target):
        template = "/tasks/{task_id}/predict" if path.endswith("/predict") else path
        field = what.split(" = ")[0]
        covered.add((template, tuple("*" if part.isdigit() else part for part in field.split("."))))
    missing = sorted(wanted - covered)
    assert not missing, f"request fields no hostile case reaches: {missing}"


