"""The service end to end with a tiny model: a real Redis, the real app over HTTP, a real RQ worker."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from ipt_engine.ist_optimizers import ISTSettings
from service.ist_jobs import ist_settings
from service.redis_connection import connect
from service.schemas import TrainingSettings
from service.settings import Settings
from service.task_store import TaskStore
from tests.service.conftest import run_worker_burst

WORDS = ["great", "awful", "lovely", "bad", "fine", "poor", "nice", "sad", "good", "dull", "superb", "weak"]


def task_body(name: str = "sentiment", n: int = 12, **extra: object) -> dict:
    train = [{"input": f"the movie was {WORDS[i % len(WORDS)]}", "output": ["positive", "negative"][i % 2]}
             for i in range(n)]
    body = {"name": name, "train": train, "training": {"max_iterations": 3, "patience": 10}}
    body.update(extra)
    return body


def create(client: httpx.Client, **kw: object) -> dict:
    r = client.post("/tasks", json=task_body(**kw))
    assert r.status_code == 202, r.text
    return r.json()


def test_full_lifecycle(alice: httpx.Client, env_settings: Settings) -> None:
    r = alice.post("/tasks", json=task_body())
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["status"] == "queued" and r.headers["location"] == f"/tasks/{task['id']}"
    assert task["kind"] == "classification" and task["labels"] == ["negative", "positive"]
    assert alice.post(f"/tasks/{task['id']}/predict", json={"inputs": ["x"]}).status_code == 409

    run_worker_burst(env_settings)
    done = alice.get(f"/tasks/{task['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["d_intrinsic"] == 4 and done["dev_score"] is not None and done["progress"]["total"] == 3
    assert 0 <= done["bare_dev_score"] <= 1 and (done["note"] is None) == (done["dev_score"] > done["bare_dev_score"])

    r = alice.post(f"/tasks/{task['id']}/predict", json={"inputs": ["the movie was great", "the movie was bad"]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and all(p["output"] in ("positive", "negative") for p in preds)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    # the answer is the option with the best ranking score (mean log-likelihood per token, <= 0)
    assert all(p["output"] == max(p["scores"], key=p["scores"].get) and max(p["scores"].values()) <= 0
               for p in preds)

    listed = alice.get("/tasks").json()
    assert task["id"] in [t["id"] for t in listed["tasks"]]

    assert alice.delete(f"/tasks/{task['id']}").status_code == 204
    assert alice.get(f"/tasks/{task['id']}").status_code == 404
    assert alice.post(f"/tasks/{task['id']}/predict", json={"inputs": ["x"]}).status_code == 404


def test_a_task_that_learned_nothing_says_so(alice: httpx.Client, env_settings: Settings) -> None:
    """The view sets `note` when the learned vector's dev score is not above the bare model's, and shows the
    history of dev evaluations while the task runs."""
    store = TaskStore(connect(env_settings))
    below, better = create(alice, name="below")["id"], create(alice, name="better")["id"]
    perfect = create(alice, name="perfect")["id"]
    assert store.mark_running(perfect, 12)
    store.set_bare_dev_score(perfect, 1.0)
    assert store.mark_succeeded(perfect, np.zeros(4), 1.0, 1)
    note = alice.get(f"/tasks/{perfect}").json()["note"]  # both perfect: not "not learned", but "cannot tell"
    assert "already scores 1.000" in note and "not learned" not in note
    for tid, dev in ((below, 0.25), (better, 0.75)):
        assert store.mark_running(tid, 12)
        store.set_bare_dev_score(tid, 0.5)
        store.set_progress(tid, 1, dev, {"step": 1, "train_loss": 0.7, "dev_loss": 0.8, "dev": dev, "norm": 1.5,
                                         "seconds": 2.0})
    running = alice.get(f"/tasks/{below}").json()
    assert running["progress"]["history"] == [{"step": 1, "train_loss": 0.7, "dev_loss": 0.8, "dev_score": 0.25,
                                               "z_norm": 1.5, "seconds": 2.0}]
    for tid, dev in ((below, 0.25), (better, 0.75)):
        assert store.mark_succeeded(tid, np.zeros(4), dev, 1)
    low, high = alice.get(f"/tasks/{below}").json(), alice.get(f"/tasks/{better}").json()
    assert low["bare_dev_score"] == 0.5 and "0.250 on dev, below the bare model's 0.500" in low["note"]
    assert "not learned" in low["note"]
    assert high["bare_dev_score"] == 0.5 and high["note"] is None


def test_tenants_see_only_their_own_tasks(alice: httpx.Client, bob: httpx.Client, server: str) -> None:
    task = create(alice, name="private")
    tid = task["id"]
    assert bob.get(f"/tasks/{tid}").status_code == 404
    assert bob.post(f"/tasks/{tid}/cancel").status_code == 404
    assert bob.delete(f"/tasks/{tid}").status_code == 404
    assert bob.post(f"/tasks/{tid}/predict", json={"inputs": ["x"]}).status_code == 404
    assert bob.get(f"/tasks/{tid}/similar").status_code == 404
    assert tid not in [t["id"] for t in bob.get("/tasks").json()["tasks"]]
    assert alice.get(f"/tasks/{tid}").status_code == 200
    with httpx.Client(base_url=server) as anonymous:
        r = anonymous.get("/tasks")
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    with httpx.Client(base_url=server, headers={"Authorization": "Bearer wrong"}) as wrong:
        assert wrong.get(f"/tasks/{tid}").status_code == 401


def test_cancel_a_queued_task(alice: httpx.Client, env_settings: Settings) -> None:
    tid = create(alice, name="to_cancel")["id"]
    r = alice.post(f"/tasks/{tid}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    run_worker_burst(env_settings)
    assert alice.get(f"/tasks/{tid}").json()["status"] == "cancelled"
    assert alice.post(f"/tasks/{tid}/cancel").status_code == 409


def test_idempotency_key_returns_the_same_task(alice: httpx.Client) -> None:
    headers = {"Idempotency-Key": "abc-123"}
    first = alice.post("/tasks", json=task_body(name="idem"), headers=headers).json()
    second = alice.post("/tasks", json=task_body(name="idem"), headers=headers).json()
    assert first["id"] == second["id"]


def test_similar_tasks_by_cosine(alice: httpx.Client, env_settings: Settings) -> None:
    """Vectors written directly (training from near-identical examples gives near-identical vectors, whose order
    is noise): the nearest by cosine comes first, with its cosine."""
    store = TaskStore(connect(env_settings), vector_dtype="float32")
    vectors = {"sim_a": [1.0, 0.0, 0.0, 0.0], "sim_b": [0.9, 0.1, 0.0, 0.0], "sim_c": [-1.0, 0.0, 0.0, 0.0]}
    ids = {}
    for name, z in vectors.items():
        ids[name] = create(alice, name=name)["id"]
        assert store.mark_running(ids[name], 1) and store.mark_succeeded(ids[name], np.array(z, np.float32), 0.5, 1)
    r = alice.get(f"/tasks/{ids['sim_a']}/similar", params={"k": 3})
    assert r.status_code == 200, r.text
    similar = r.json()["similar"]
    assert similar[0]["id"] == ids["sim_b"] and ids["sim_a"] not in [s["id"] for s in similar]
    assert abs(similar[0]["cosine"] - 0.9 / (0.82 ** 0.5)) < 1e-4
    assert all(-1.0001 <= s["cosine"] <= 1.0001 for s in similar)


@pytest.mark.parametrize(("body", "status", "message"), [
    (task_body(n=200), 413, "exceed the limit of 100 per task"),
    (task_body(train=[{"input": "x" * 600, "output": "a"}, {"input": "y", "output": "b"}] * 3), 413,
     "exceeds the limit of 500 characters"),
    (task_body(n=2), 422, "at least 4"),
    (task_body(unknown_field=1), 422, "unknown_field"),
    (task_body(training={"max_steps": 10_000}), 422, "max_steps"),
    ({"name": "x", "train": "not a list"}, 422, "train"),
    (task_body(kind="classification", labels=["a", "b"]), 422, "not one of the labels"),
    (task_body(training={"seed": 2**64}), 422, "seed"),
    (task_body(train=[{"input": f"x{i}", "output": f"label{i % 30}"} for i in range(60)], kind="classification"),
     413, "30 labels exceed the limit of 20"),
])
def test_bad_task_bodies_are_clear_4xx(alice: httpx.Client, body: dict, status: int, message: str) -> None:
    r = alice.post("/tasks", json=body)
    assert r.status_code == status, r.text
    assert message in r.text


def test_malformed_json_and_big_bodies(alice: httpx.Client) -> None:
    r = alice.post("/tasks", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = alice.post("/tasks", content=b"x" * 60_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "50000 bytes" in r.text

    def chunks():  # no Content-Length: a streamed body is cut off at the limit too
        for _ in range(10):
            yield b"x" * 10_000

    r = alice.post("/tasks", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "50000 bytes" in r.text


def test_predict_limits(alice: httpx.Client, env_settings: Settings) -> None:
    tid = create(alice, name="limits")["id"]
    run_worker_burst(env_settings)
    assert alice.post(f"/tasks/{tid}/predict", json={"inputs": ["a"] * 9}).status_code == 413
    assert alice.post(f"/tasks/{tid}/predict", json={"inputs": []}).status_code == 422
    assert alice.post(f"/tasks/{tid}/predict", json={"inputs": ["x" * 501]}).status_code == 413
    assert alice.post("/tasks/nope/predict", json={"inputs": ["a"]}).status_code == 422  # not a task id
    assert alice.post(f"/tasks/{'0' * 32}/predict", json={"inputs": ["a"]}).status_code == 404
    assert alice.get(f"/tasks/{tid}:z").status_code == 422
    r = alice.post(f"/tasks/{tid}/predict", json={"inputs": ["a"], "options": [["x", "y"]]})
    assert r.status_code == 422 and "multiple-choice" in r.text


def test_health_and_metrics(server: str) -> None:
    with httpx.Client(base_url=server) as c:
        assert c.get("/livez").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model"] is True and ready.json()["redis"] is True
        text = c.get("/metrics").text
        for name in ("ipt_http_requests_total", "ipt_prompt_cache_lookups_total", "ipt_ist_queue_length_jobs",
                     "ipt_tasks_by_status_tasks", "ipt_model_load_duration_seconds"):
            assert name in text


def test_multiple_choice_predictions_need_options(alice: httpx.Client, env_settings: Settings) -> None:
    train = [{"input": f"pick the colour {i}", "output": "red", "options": ["red", "blue", "green"]} for i in range(6)]
    r = alice.post("/tasks", json={"name": "mc", "kind": "multiple_choice", "train": train,
                                   "training": {"max_iterations": 2}})
    assert r.status_code == 202, r.text
    tid = r.json()["id"]
    run_worker_burst(env_settings)
    assert alice.post(f"/tasks/{tid}/predict", json={"inputs": ["which?"]}).status_code == 422
    r = alice.post(f"/tasks/{tid}/predict", json={"inputs": ["which?"], "options": [["up", "down"]]})
    assert r.status_code == 200 and r.json()["predictions"][0]["output"] in ("up", "down")
    assert set(r.json()["predictions"][0]["probabilities"]) == {"up", "down"}


def test_cancelled_queued_task_leaves_no_job_behind(alice: httpx.Client, env_settings: Settings) -> None:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from service.redis_connection import connect

    tid = create(alice, name="gone")["id"]
    connection = connect(env_settings)
    assert Job.fetch(tid, connection=connection).args[0] == tid  # the examples are in the job...
    alice.post(f"/tasks/{tid}/cancel")
    with pytest.raises(NoSuchJobError):
        Job.fetch(tid, connection=connection)  # ...and gone with it


def test_every_training_field_reaches_the_engine() -> None:
    """The API's training object and the engine's IST settings agree: no field the API takes is dropped by the
    worker, and the API's defaults are the engine's."""
    assert set(TrainingSettings.model_fields) <= set(ISTSettings.__dataclass_fields__)
    body = TrainingSettings(optimizer="adamw", max_steps=7, patience=2, learning_rate=0.5, seed=3).model_dump()
    assert ist_settings(body) == ISTSettings(optimizer="adamw", max_steps=7, patience=2, learning_rate=0.5, seed=3)
    assert ist_settings(TrainingSettings().model_dump()) == ISTSettings()
