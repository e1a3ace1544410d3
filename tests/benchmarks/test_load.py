"""The benchmarks' load client (benchmarks/load_client.py, run by benchmarks.load.run_load) against a real HTTP
server: a small FastAPI app served by uvicorn on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, HTTPException

from benchmarks.load import predict_request, run_load
from benchmarks.redis_server import free_port


def echo_app() -> FastAPI:
    app = FastAPI()
    seen: list[list[str]] = []
    app.state.seen = seen

    @app.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/tasks/{task_id}/predict")
    def predict(task_id: str, body: dict[str, list[str]]) -> dict[str, list[str]]:
        if task_id == "missing":
            raise HTTPException(404, f"no task {task_id!r}")
        seen.append(body["inputs"])
        return {"predictions": [x.upper() for x in body["inputs"]] * 50}  # a body over one read of the socket

    return app


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FastAPI]]:
    app = echo_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.config.port}", app
    server.should_exit = True
    thread.join(timeout=10)


def test_closed_loop_sends_every_request_once_and_times_each(served: tuple[str, FastAPI]) -> None:
    base, app = served
    app.state.seen.clear()
    requests = [predict_request(f"t{k}", [f"input {k}", "x" * 2000]) for k in range(40)]
    result = run_load(base, requests, concurrency=6)
    assert sorted(s[0] for s in app.state.seen) == sorted(f"input {k}" for k in range(40))
    assert result.examples == 80 and len(result.latencies) == 40
    assert all(0 < t <= result.wall for t in result.latencies)
    assert 0 <= result.client_cpu_per_request < 0.05


def test_a_non_200_answer_stops_the_run_with_its_text(served: tuple[str, FastAPI]) -> None:
    base, _ = served
    with pytest.raises(RuntimeError, match=r"404 .*no task 'missing'"):
        run_load(base, [predict_request("t0", ["a"]), predict_request("missing", ["b"])], concurrency=1)
