"""End to end with the real SmolLM2 and the real worker: a 3-label task from 16 examples per label is
trained by IST through the API and predicts held-out inputs better than the zero vector does."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.evaluation import evaluate
from service.settings import Settings
from tests.conftest import CategoryStudy
from tests.service.conftest import run_worker_burst, running_app

pytestmark = pytest.mark.real_model


@pytest.fixture()
def real_settings(service_settings: Settings, category_study: CategoryStudy,
                  monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings = service_settings.model_copy(update={"backbone": "smollm2", "subspace": category_study.artifact,
                                                   "queue_name": "ipt-test-real", "device": None,
                                                   "max_inputs_per_predict": 64})
    # the job reads its settings from the environment, as a worker process does
    monkeypatch.setenv("IPT_BACKBONE", "smollm2")
    monkeypatch.setenv("IPT_SUBSPACE", str(category_study.artifact))
    monkeypatch.setenv("IPT_QUEUE_NAME", "ipt-test-real")
    monkeypatch.delenv("IPT_DEVICE", raising=False)
    return settings


@pytest.fixture()
def real_server(real_settings: Settings) -> Iterator[str]:
    with running_app(real_settings) as base:
        yield base


def test_real_task_trains_and_beats_the_zero_vector(real_server: str, real_settings: Settings,
                                                    category_study: CategoryStudy, real_backbone: Backbone) -> None:
    target = category_study.target
    body = {"name": target.name, "kind": "classification", "labels": list(target.labels or ()),
            "train": [{"input": e.input, "output": e.output} for e in target.train],
            "dev": [{"input": e.input, "output": e.output} for e in target.dev],
            "training": {"learning_rate": 1.0, "max_steps": 30, "batch_size": 12, "eval_every": 5, "patience": 4}}
    assert {e.output for e in target.train} == set(target.labels or ()) and len(target.train) == 48
    with httpx.Client(base_url=real_server, headers={"Authorization": "Bearer key-alice"}, timeout=300) as client:
        created = client.post("/tasks", json=body)
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        run_worker_burst(real_settings)
        task = client.get(f"/tasks/{task_id}").json()
        assert task["status"] == "succeeded", task
        inputs = [e.input for e in target.test]
        answers = client.post(f"/tasks/{task_id}/predict", json={"inputs": inputs})
        assert answers.status_code == 200, answers.text
    predicted = [p["output"] for p in answers.json()["predictions"]]
    accuracy = sum(p == e.output for p, e in zip(predicted, target.test, strict=True)) / len(target.test)
    with torch.no_grad():
        zero_prompt = category_study.msf.subspace.decode(torch.zeros(1, 4))
    zero_accuracy = evaluate(real_backbone, [target], zero_prompt.to(real_backbone.device), "test")[0]
    print(f"service IST accuracy {accuracy:.3f} vs z = 0 {zero_accuracy:.3f} on {len(target.test)} held-out inputs")
    assert accuracy > zero_accuracy
