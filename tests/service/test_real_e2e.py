"""End to end with the real SmolLM2 and the real worker: a 3-label task from 16 examples per label is
trained by IST through the API and predicts held-out inputs better than the zero vector does, both in a
subspace trained on related tasks and in the subspace the service ships (trained on BIG-bench tasks)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.evaluation import evaluate
from ipt_engine.subspace_artifact import read_metadata
from ipt_engine.tasks import Task
from ipt_engine.testing import RELATED, TARGET, category_task
from service.settings import DEFAULT_SUBSPACE, Settings
from tests.conftest import CategoryStudy
from tests.service.conftest import run_worker_burst, running_app

pytestmark = pytest.mark.real_model


@pytest.fixture()
def real_settings(service_settings: Settings, category_study: CategoryStudy,
                  monkeypatch: pytest.MonkeyPatch) -> Settings:
    return _use_subspace(service_settings, category_study.artifact, monkeypatch, "ipt-test-real")


def _use_subspace(settings: Settings, subspace: object, monkeypatch: pytest.MonkeyPatch, queue: str) -> Settings:
    settings = settings.model_copy(update={"backbone": "smollm2", "subspace": subspace, "queue_name": queue,
                                           "device": None, "max_inputs_per_predict": 64})
    # the job reads its settings from the environment, as a worker process does
    monkeypatch.setenv("IPT_BACKBONE", "smollm2")
    monkeypatch.setenv("IPT_SUBSPACE", str(subspace))
    monkeypatch.setenv("IPT_QUEUE_NAME", queue)
    monkeypatch.delenv("IPT_DEVICE", raising=False)
    return settings


@pytest.fixture()
def real_server(real_settings: Settings) -> Iterator[str]:
    with running_app(real_settings) as base:
        yield base


def _train_and_score(base: str, settings: Settings, target: Task, training: dict[str, float]) -> float:
    """Create `target` through the API from its train/dev examples, train it in a real worker, and return
    the accuracy of the service's predictions on its held-out test inputs."""
    body = {"name": target.name, "kind": "classification", "labels": list(target.labels or ()),
            "train": [{"input": e.input, "output": e.output} for e in target.train],
            "dev": [{"input": e.input, "output": e.output} for e in target.dev], "training": training}
    assert {e.output for e in target.train} == set(target.labels or ()) and len(target.train) == 48
    with httpx.Client(base_url=base, headers={"Authorization": "Bearer key-alice"}, timeout=300) as client:
        created = client.post("/tasks", json=body)
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        run_worker_burst(settings)
        task = client.get(f"/tasks/{task_id}").json()
        assert task["status"] == "succeeded", task
        answers = client.post(f"/tasks/{task_id}/predict", json={"inputs": [e.input for e in target.test]})
        assert answers.status_code == 200, answers.text
    predicted = [p["output"] for p in answers.json()["predictions"]]
    return sum(p == e.output for p, e in zip(predicted, target.test, strict=True)) / len(target.test)


def test_real_task_trains_and_beats_the_zero_vector(real_server: str, real_settings: Settings,
                                                    category_study: CategoryStudy, real_backbone: Backbone) -> None:
    target = category_study.target
    accuracy = _train_and_score(real_server, real_settings, target, {})  # the API's default training
    with torch.no_grad():
        zero_prompt = category_study.msf.subspace.decode(torch.zeros(1, 4))
    zero_accuracy = evaluate(real_backbone, [target], zero_prompt.to(real_backbone.device), "test")[0]
    print(f"service IST accuracy {accuracy:.3f} vs z = 0 {zero_accuracy:.3f} on {len(target.test)} held-out inputs")
    assert accuracy > zero_accuracy


def test_shipped_subspace_beats_the_plm_without_a_prompt(service_settings: Settings, real_backbone: Backbone,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """What `make run` serves: the default settings pick the shipped artifact, and a new 3-label task from 16
    examples per label, trained with the API's default training settings, beats the bare PLM."""
    monkeypatch.delenv("IPT_SUBSPACE", raising=False)  # the service fixtures point it at a tiny test subspace
    assert Settings().subspace == DEFAULT_SUBSPACE, "the shipped subspace artifact is missing from the checkout"
    meta = read_metadata(DEFAULT_SUBSPACE)
    assert meta.backbone_id == real_backbone.backbone_id and meta.weights_dtype == "float16"
    settings = _use_subspace(service_settings, DEFAULT_SUBSPACE, monkeypatch, "ipt-test-shipped")
    target = category_task(TARGET[0], TARGET[1], seed=len(RELATED), train_per_label=16, dev_per_label=8,
                           test_per_label=12)
    with running_app(settings) as base:
        accuracy = _train_and_score(base, settings, target, {})
    bare = evaluate(real_backbone, [target], None, "test")[0]
    print(f"shipped subspace (d_I={meta.config['d_intrinsic']}): service accuracy {accuracy:.3f} vs the PLM "
          f"without a prompt {bare:.3f} on {len(target.test)} held-out inputs")
    assert accuracy > bare
