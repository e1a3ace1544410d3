"""Tasks that travel, through the service: GET /tasks/{id}/export as a PEFT adapter or as embeddings (the
adapter loads in PEFT and scores options as /predict does), POST /tasks/import of a PEFT prompt-tuning adapter
(an export comes back as the same z and the same predictions; adapters that do not fit are 422s naming what
differs), tenant isolation, and `ipt task export|import` against the running app.

PEFT is not a dependency of the project: like tests/engine/test_portability.py, these tests install it into
.bench-deps with benchmarks/setup.sh the first time."""

from __future__ import annotations

import base64
import io
import json
import math
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from ipt_engine.testing import option_log_likelihoods_by_format
from service.cli import app as ipt_app  # the engine's `ipt` with the service's commands
from service.redis_connection import connect
from service.settings import Settings
from service.task_store import TaskStore
from tests.service.conftest import run_worker_burst
from tests.service.test_api import task_body

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
LABELS = ["negative", "positive"]
INPUTS = ["the movie was great", "a long and dull film"]
Z = np.array([0.6, -0.4, 0.9, 0.2], dtype=np.float32)  # exactly float16, as the store keeps it


def trained_task(client: httpx.Client, settings: Settings, name: str = "sentiment", z: np.ndarray = Z) -> str:
    """A task of the client's tenant, trained: created through the API, its vector written as a worker does."""
    r = client.post("/tasks", json=task_body(name))
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    assert TaskStore(connect(settings)).mark_succeeded(task_id, z, 0.5, 1)
    return task_id


def unzip(response: httpx.Response) -> dict[str, bytes]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"].startswith("attachment; filename=")
    assert response.headers["content-disposition"].endswith('.zip"')
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_dir(files: dict[str, bytes], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_bytes(content)
    return out


def option_log_likelihoods(model: torch.nn.Module, tokenizer, n: int, prefix: torch.Tensor | None = None
                           ) -> list[list[tuple[float, int]]]:
    return option_log_likelihoods_by_format(model, tokenizer, "sentiment", INPUTS, LABELS, n, prefix)


def assert_matches_predictions(by_hand: list[list[tuple[float, int]]], predictions: list[dict]) -> None:
    """The service's `probabilities` (softmax of totals) and `scores` (mean per token), to 1e-4."""
    for row, prediction in zip(by_hand, predictions, strict=True):
        totals = torch.tensor([total for total, _ in row])
        expected_p = totals.softmax(0).tolist()
        assert [prediction["probabilities"][label] for label in LABELS] == pytest.approx(expected_p, abs=1e-4)
        assert [prediction["scores"][label] for label in LABELS] == pytest.approx(
            [total / count for total, count in row], abs=1e-4)


def predict(client: httpx.Client, task_id: str) -> list[dict]:
    r = client.post(f"/tasks/{task_id}/predict", json={"inputs": INPUTS})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_a_peft_export_loads_in_peft_and_scores_as_predict(peft, alice: httpx.Client, env_settings: Settings,
                                                             tiny_model_dirs: dict, tmp_path: Path) -> None:
    task_id = trained_task(alice, env_settings)
    files = unzip(alice.get(f"/tasks/{task_id}/export", params={"format": "peft"}))
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "ipt_format.json", "README.md"}
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 2
    assert config["base_model_name_or_path"] == env_settings.backbone  # the backbone the service runs
    fmt = json.loads(files["ipt_format.json"])
    assert (fmt["task_name"], fmt["kind"], fmt["labels"]) == ("sentiment", "classification", LABELS)
    assert "PeftModel.from_pretrained" in files["README.md"].decode()

    out = write_dir(files, tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    assert_matches_predictions(option_log_likelihoods(model, tokenizer, n=2), predict(alice, task_id))


def test_an_embeddings_export_reproduces_predict_with_inputs_embeds(alice: httpx.Client, env_settings: Settings,
                                                                      tiny_model_dirs: dict) -> None:
    task_id = trained_task(alice, env_settings)
    files = unzip(alice.get(f"/tasks/{task_id}/export", params={"format": "embeddings"}))
    assert set(files) == {"soft_prompt.safetensors", "ipt_format.json", "README.md"}
    readme = files["README.md"].decode()
    assert "inputs_embeds" in readme and "prompt_embeds" in readme
    soft = _tensor(files["soft_prompt.safetensors"])
    assert soft.dtype == torch.float32 and soft.shape[0] == 2
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    assert_matches_predictions(option_log_likelihoods(model, tokenizer, n=2, prefix=soft), predict(alice, task_id))
    # the same prompt as the PEFT export, and in the dtype asked for
    peft_files = unzip(alice.get(f"/tasks/{task_id}/export", params={"format": "peft"}))
    assert torch.equal(_tensor(peft_files["adapter_model.safetensors"], "prompt_embeddings"), soft)
    half = unzip(alice.get(f"/tasks/{task_id}/export", params={"format": "embeddings", "dtype": "float16"}))
    assert _tensor(half["soft_prompt.safetensors"]).dtype == torch.float16


def _tensor(raw: bytes, key: str = "soft_prompt") -> torch.Tensor:
    from safetensors.torch import load

    return load(raw)[key]


def test_export_answers_404_409_and_422_as_the_other_routes(alice: httpx.Client, bob: httpx.Client,
                                                            env_settings: Settings) -> None:
    task_id = trained_task(alice, env_settings)
    assert bob.get(f"/tasks/{task_id}/export", params={"format": "peft"}).status_code == 404
    assert alice.get(f"/tasks/{'0' * 32}/export", params={"format": "peft"}).status_code == 404
    queued = alice.post("/tasks", json=task_body("queued_one")).json()["id"]
    r = alice.get(f"/tasks/{queued}/export", params={"format": "peft"})
    assert r.status_code == 409 and "no trained vector" in r.json()["detail"]
    r = alice.get(f"/tasks/{task_id}/export", params={"format": "lora"})
    assert r.status_code == 422 and "'peft' or 'embeddings'" in r.text
    assert alice.get(f"/tasks/{task_id}/export").status_code == 422  # the format is required


def import_body(files: dict[str, bytes], **extra: object) -> dict:
    fmt = json.loads(files["ipt_format.json"]) if "ipt_format.json" in files else {}
    body = {"name": fmt.get("task_name", "imported"), "kind": fmt.get("kind"), "labels": fmt.get("labels"),
            "adapter": {"config": json.loads(files["adapter_config.json"]),
                        "weights": base64.b64encode(files["adapter_model.safetensors"]).decode()}}
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


def test_an_export_imports_back_as_the_same_z_and_predictions(alice: httpx.Client, bob: httpx.Client,
                                                              env_settings: Settings) -> None:
    task_id = trained_task(alice, env_settings)
    files = unzip(alice.get(f"/tasks/{task_id}/export", params={"format": "peft"}))
    r = bob.post("/tasks/import", json=import_body(files))  # another tenant may import what it was given
    assert r.status_code == 201, r.text
    out = r.json()
    imported = out["task"]
    assert r.headers["location"] == f"/tasks/{imported['id']}"
    assert imported["status"] == "succeeded" and imported["labels"] == LABELS and imported["dev_score"] is None
    assert out["fit"]["relative_error"] < 1e-5 and out["fit"]["dev"] is None and out["fit"]["note"] is None
    stored = TaskStore(connect(env_settings)).vector(imported["id"])
    assert stored is not None
    assert np.linalg.norm(stored[0] - Z) / np.linalg.norm(Z) < 1e-3
    for mine, theirs in zip(predict(alice, task_id), predict(bob, imported["id"]), strict=True):
        assert mine["output"] == theirs["output"]
        assert [theirs["probabilities"][k] for k in LABELS] == pytest.approx(
            [mine["probabilities"][k] for k in LABELS], abs=1e-4)
    assert alice.get(f"/tasks/{imported['id']}").status_code == 404  # the import is bob's

    # with examples: dev scores of the imported prompt, of its z and of the bare model; dev_score is its z's
    examples = task_body("sentiment")["train"]
    r = alice.post("/tasks/import", json=import_body(files, train=examples))
    assert r.status_code == 201, r.text
    dev = r.json()["fit"]["dev"]
    assert dev["examples"] == 4 and all(0 <= dev[k] <= 1 for k in ("imported_prompt", "vector", "bare_model"))
    assert dev["vector"] == pytest.approx(dev["imported_prompt"])  # the subspace holds the exported prompt
    task = r.json()["task"]
    assert task["dev_score"] == pytest.approx(dev["vector"], abs=1e-6)
    assert task["bare_dev_score"] == pytest.approx(dev["bare_model"], abs=1e-6)

    # with examples and `tune`: IST goes on from the imported z (a job of its own), then the task is succeeded
    assert alice.post("/tasks/import", json=import_body(files, tune=True)).status_code == 422  # needs examples
    r = alice.post("/tasks/import", json=import_body(files, train=examples, tune=True))
    assert r.status_code == 201 and r.json()["task"]["status"] == "queued", r.text
    tuned_id = r.json()["task"]["id"]
    run_worker_burst(env_settings)
    tuned = alice.get(f"/tasks/{tuned_id}").json()
    assert tuned["status"] == "succeeded" and tuned["steps"] >= 1
    first = alice.get(f"/tasks/{tuned_id}/events").json()["events"]
    start = next(e for e in first if e["type"] == "evaluation" and e["step"] == 0)
    assert start["norm"] == pytest.approx(float(np.linalg.norm(Z)), rel=1e-3)  # it started at the imported z


def test_a_prompt_outside_the_subspace_imports_with_its_error_reported(alice: httpx.Client,
                                                                        env_settings: Settings) -> None:
    files = unzip(alice.get(f"/tasks/{trained_task(alice, env_settings)}/export", params={"format": "peft"}))
    prompt = _tensor(files["adapter_model.safetensors"], "prompt_embeddings")
    files["adapter_model.safetensors"] = save({"prompt_embeddings": torch.randn(
        prompt.shape, generator=torch.Generator().manual_seed(0))})
    r = alice.post("/tasks/import", json=import_body(files))
    assert r.status_code == 201, r.text
    fit = r.json()["fit"]
    assert fit["relative_error"] > 0.5 and "reconstructs the prompt poorly" in fit["note"]


@pytest.mark.parametrize(("change", "message"), [
    ({"base_model_name_or_path": "openai-community/gpt2"}, "trained on 'openai-community/gpt2'; this service runs"),
    ({"num_virtual_tokens": 5}, "the adapter has 5 virtual tokens; this subspace's prompts have n=2"),
    ({"token_dim": 7}, "the adapter's token_dim is 7; this backbone's hidden size is d="),
    ({"peft_type": "LORA"}, "a LORA adapter cannot be imported"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "task_type SEQ_2_SEQ_LM"),
])
def test_adapters_that_do_not_fit_are_422_naming_what_differs(alice: httpx.Client, env_settings: Settings,
                                                              change: dict, message: str) -> None:
    files = unzip(alice.get(f"/tasks/{trained_task(alice, env_settings)}/export", params={"format": "peft"}))
    body = import_body(files)
    body["adapter"]["config"].update(change)
    r = alice.post("/tasks/import", json=body)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_bad_imports_are_4xx_never_500(alice: httpx.Client, env_settings: Settings) -> None:
    files = unzip(alice.get(f"/tasks/{trained_task(alice, env_settings)}/export", params={"format": "peft"}))
    good = import_body(files)

    def post(**adapter: object) -> httpx.Response:
        return alice.post("/tasks/import", json={**good, "adapter": {**good["adapter"], **adapter}})

    r = post(weights="not base64!")
    assert r.status_code == 422 and "base64" in r.json()["detail"]
    r = post(weights=base64.b64encode(b"PK\x03\x04 not a safetensors file").decode())
    assert r.status_code == 422 and "not a readable safetensors file" in r.json()["detail"]
    r = post(weights=base64.b64encode(save({"other": torch.zeros(2, 2)})).decode())
    assert r.status_code == 422 and "holds no 'prompt_embeddings' tensor" in r.json()["detail"]
    r = post(weights=base64.b64encode(save({"prompt_embeddings": torch.full((2, 2), math.nan)})).decode())
    assert r.status_code == 422
    assert post(weights="A" * 200_000).status_code == 413  # over the body limit
    assert alice.post("/tasks/import", json={**good, "adapter": {"config": [], "weights": "AA=="}}).status_code == 422
    assert alice.post("/tasks/import", content=b"{not json", headers={"Content-Type": "application/json"}
                      ).status_code == 422
    no_labels = {k: v for k, v in good.items() if k != "labels"}
    r = alice.post("/tasks/import", json=no_labels)
    assert r.status_code == 422 and "needs 'labels'" in r.json()["detail"]
    r = alice.post("/tasks/import", json={k: v for k, v in no_labels.items() if k != "kind"})
    assert r.status_code == 422 and "give 'kind'" in r.json()["detail"]


def test_the_cli_exports_and_imports_against_the_running_app(server: str, alice: httpx.Client,
                                                             env_settings: Settings, tmp_path: Path) -> None:
    task_id = trained_task(alice, env_settings, name="cli_task")
    runner = CliRunner()
    common = ["--url", server, "--api-key", "key-alice"]
    result = runner.invoke(ipt_app, ["task", "export", task_id, "--format", "peft", "--out", str(tmp_path / "a"),
                                     *common])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                             "ipt_format.json", "README.md"}
    result = runner.invoke(ipt_app, ["task", "export", task_id, "--format", "embeddings", "--out",
                                     str(tmp_path / "e"), *common])
    assert result.exit_code == 0 and (tmp_path / "e" / "soft_prompt.safetensors").is_file(), result.output
    with safe_open(str(tmp_path / "e" / "soft_prompt.safetensors"), "pt") as f:
        assert f.metadata()["dtype"] == "float32"

    result = runner.invoke(ipt_app, ["task", "import", str(tmp_path / "a"), *common])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output and "relative error" in result.output
    new_id = result.output.split()[1]
    assert alice.get(f"/tasks/{new_id}").json()["name"] == "cli_task"
    stored = TaskStore(connect(env_settings)).vector(new_id)
    assert stored is not None and np.allclose(stored[0], Z, atol=1e-3)

    # errors end the command with the service's message
    result = runner.invoke(ipt_app, ["task", "export", task_id, "--format", "peft", "--out", str(tmp_path / "b"),
                                     "--url", server, "--api-key", "key-bob"])
    assert result.exit_code == 2 and "404" in result.output
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 9}))
    result = runner.invoke(ipt_app, ["task", "import", str(tmp_path / "a"), *common])
    assert result.exit_code == 2 and "9 virtual tokens" in result.output
    assert load_file(str(tmp_path / "a" / "adapter_model.safetensors"))["prompt_embeddings"].shape[0] == 2


def test_an_adapter_saved_by_peft_imports_as_the_z_closest_to_it(peft, server: str, alice: httpx.Client,
                                                                  env_settings: Settings, tiny_model_dirs: dict,
                                                                  tmp_path: Path) -> None:
    """An adapter PEFT itself wrote (get_peft_model + save_pretrained), holding a prompt inside the service's
    subspace, comes back through `ipt task import` as that z, and the task predicts."""
    from service.runtime import load_runtime

    proj_b = load_runtime(env_settings).subspace.proj_b
    z_true = torch.tensor([0.3, -0.7, 1.1, 0.5])
    with torch.no_grad():
        inside = proj_b(z_true[None])[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(inside)
    model.save_pretrained(str(tmp_path / "trained"))
    result = CliRunner().invoke(ipt_app, ["task", "import", str(tmp_path / "trained"), "--name", "sentiment",
                                          "--kind", "classification", "--label", "negative", "--label", "positive",
                                          "--url", server, "--api-key", "key-alice"])
    assert result.exit_code == 0, result.output
    new_id = result.output.split()[1]
    stored = TaskStore(connect(env_settings)).vector(new_id)
    assert stored is not None and np.allclose(stored[0], z_true.numpy(), atol=2e-3)
    assert all(p["output"] in LABELS for p in predict(alice, new_id))
