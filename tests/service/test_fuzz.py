"""Fuzzing with schemathesis against the app's own OpenAPI schema, over real HTTP, authenticated: no 5xx,
and every response (status code, content type, headers, body) conforms to the schema. Invalid
("negative") data must be rejected with a 4xx.

Every operation of the schema is a test item (a new route is fuzzed without any change here). Task routes
are fuzzed with random ids and with the ids of real tasks: trained classification, generation and
multiple-choice tasks and a queued one; destructive operations (cancel, delete) come last.

The number of examples per operation and mode is bounded (IPT_FUZZ_EXAMPLES, default 10) and the
generation is derandomized so that CI is repeatable; IPT_FUZZ_RANDOM=1 explores new inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings, hash_api_key
from tests.service.conftest import run_worker_burst, running_app
from tests.service.redis_process import RedisProcess
from tests.service.test_api import task_body

EXAMPLES = int(os.environ.get("IPT_FUZZ_EXAMPLES", "10"))
DERANDOMIZE = os.environ.get("IPT_FUZZ_RANDOM", "") not in ("1", "true", "yes")
KEY = "key-fuzz"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


def _operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in the schema; destructive ones last, so that the real tasks
    are still there while the other operations are fuzzed."""
    paths = create_app(Settings(subspace=None, redis_url="redis://unused")).openapi()["paths"]
    ops = [(method.upper(), path) for path, item in paths.items() for method in item]
    return sorted(ops, key=lambda op: (op[0] == "DELETE", op[1].endswith("/cancel")))


@dataclass
class FuzzTarget:
    base: str
    schema: schemathesis.schemas.BaseSchema
    task_ids: dict[str, str]


@pytest.fixture(scope="module")
def target(env_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """The app on a Redis of its own (fuzzing creates many tasks), a tenant of its own, quotas off (they
    are tested in test_limits.py), and four real tasks."""
    server = RedisProcess(tmp_path_factory.mktemp("fuzz_redis"))
    server.start()
    settings = env_settings.model_copy(update={
        "redis_url": server.url, "queue_name": "ipt-fuzz", "api_keys": {hash_api_key(KEY): "fuzzer"},
        "rate_limit_create_per_window": 0, "rate_limit_predict_per_window": 0, "max_active_tasks_per_tenant": 0})
    try:
        with running_app(settings) as base, httpx.Client(base_url=base, headers=_auth(), timeout=60) as client:
            def create(body: dict) -> str:
                r = client.post("/tasks", json=body)
                assert r.status_code == 202, r.text
                return r.json()["id"]

            train = [{"input": f"pick a colour {i}", "output": "red", "options": ["red", "blue", "green"]}
                     for i in range(6)]
            ids = {"classification": create(task_body(name="fuzz_cls")),
                   "generation": create(task_body(name="fuzz_gen", kind="generation")),
                   "multiple_choice": create({"name": "fuzz_mc", "kind": "multiple_choice", "train": train,
                                              "training": {"max_steps": 2, "eval_every": 1, "batch_size": 2}})}
            run_worker_burst(settings)
            assert all(client.get(f"/tasks/{t}").json()["status"] == "succeeded" for t in ids.values())
            ids["queued"] = create(task_body(name="fuzz_queued"))  # no worker runs from here on
            yield FuzzTarget(base, schemathesis.openapi.from_url(f"{base}/openapi.json"), ids)
    finally:
        server.stop()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _has_inputs(operation: schemathesis.schemas.APIOperation) -> bool:
    """Whether anything but the task id can be made invalid (a body or query parameters)."""
    return bool(operation.body) or any(p.location != "path" for p in operation.iter_parameters())


@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda v: str(v))
def test_fuzzed_requests_conform_to_the_schema(target: FuzzTarget, method: str, path: str) -> None:
    operation = target.schema[path][method]
    variants: list[str | None] = [None]  # random ids (404s) ...
    if "{task_id}" in path:
        variants += list(target.task_ids)  # ... and real tasks
    runs = [(GenerationMode.POSITIVE, v) for v in variants]
    if _has_inputs(operation) or ("{task_id}" in path):
        runs += [(GenerationMode.NEGATIVE, v) for v in variants if v is None or _has_inputs(operation)]

    for mode, variant in runs:
        path_parameters = {"task_id": target.task_ids[variant]} if variant else None

        @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                             suppress_health_check=list(HealthCheck), print_blob=True)
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=target.base, headers=_auth(), checks=CHECKS, timeout=60)

        try:
            fuzz()
        except Exception as exc:
            exc.add_note(f"while fuzzing {method} {path} in {mode.value} mode with task {variant or 'random ids'}")
            raise


def test_every_operation_is_fuzzed() -> None:
    """The parametrization comes from the schema itself; make sure it is not empty or partial."""
    ops = _operations()
    assert ("POST", "/tasks") in ops and ("POST", "/tasks/{task_id}/predict") in ops and len(ops) >= 10
    assert ops[-1] == ("DELETE", "/tasks/{task_id}") and ops[-2] == ("POST", "/tasks/{task_id}/cancel")
