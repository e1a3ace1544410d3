"""Shared fixtures: tiny random backbones (causal and seq2seq) and the real SmolLM2, each loaded once."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.msf import MSFResult
from ipt_engine.prompt_tuning import PromptTuningResult
from ipt_engine.tasks import Task
from ipt_engine.testing import make_task, save_tiny

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["CategoryStudy", "make_task", "train_loss"]  # make_task: re-exported for the tests that take it from here


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: save_tiny(kind, root / kind) for kind in ("llama", "bart", "t5")}


@pytest.fixture(scope="session")
def tiny_causal(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return Backbone.load(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture(scope="session")
def tiny_seq2seq(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return Backbone.load(str(tiny_model_dirs["bart"]), device="cpu")


@pytest.fixture(scope="session", params=["llama", "bart", "t5"])
def tiny_backbone(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Backbone:
    """Each tiny architecture in turn: causal (Llama) and seq2seq (BART, T5)."""
    return Backbone.load(str(tiny_model_dirs[request.param]), device="cpu")


@pytest.fixture(scope="session")
def peft():  # type: ignore[no-untyped-def]
    """HuggingFace PEFT, which the project never depends on: installed into .bench-deps by benchmarks/setup.sh
    (from the package index, its dependencies being the project's own) the first time a test needs it."""
    deps = ROOT / ".bench-deps"
    if not (deps / "peft").is_dir():
        subprocess.run(["bash", "benchmarks/setup.sh"], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    if str(deps) not in sys.path:
        sys.path.append(str(deps))
    importlib.invalidate_caches()  # the directory may have been looked up (absent) before the install
    import peft as module

    return module


@pytest.fixture(scope="session")
def real_backbone() -> Backbone:
    """The real SmolLM2-135M-Instruct (fp32), loaded once per test session."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return Backbone.load("smollm2", dtype="float32")


def train_loss(bb: Backbone, task: Task, prompt: torch.Tensor) -> float:
    """Mean per-row loss of every train row of `task` with one prompt [1, n, d] (no gradient)."""
    pairs = [task.text_pair(e) for e in task.train]
    with torch.no_grad():
        ll, count = bb.target_log_likelihood(prompt.expand(len(pairs), -1, -1), [p.source for p in pairs],
                                             [p.target for p in pairs])
    return float((-(ll / count)).mean())


@dataclass
class CategoryStudy:
    """PT on a new category task and four related ones (one batched run), and MSF on the related tasks'
    prompts: what the real-model tests of the engine and of the service build on (trained once)."""

    target: Task
    related: list[Task]
    pt: PromptTuningResult
    msf: MSFResult
    artifact: Path


@pytest.fixture(scope="session")
def category_study(real_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> CategoryStudy:
    from ipt_engine.msf import find_subspace
    from ipt_engine.named_tensors import save_named
    from ipt_engine.prompt_tuning import prompt_tune
    from ipt_engine.subspace import SubspaceConfig
    from ipt_engine.subspace_artifact import VECTORS_FILE, save_artifact
    from ipt_engine.testing import RELATED, TARGET, category_task
    from ipt_engine.training import TrainConfig

    bb = real_backbone
    target = category_task(TARGET[0], TARGET[1], seed=len(RELATED), train_per_label=16, dev_per_label=8,
                           test_per_label=12)
    related = [category_task(name, cats, seed=i, dev_per_label=4) for i, (name, cats) in enumerate(RELATED.items())]
    pt = prompt_tune(bb, [target, *related],
                     TrainConfig(learning_rate=0.1, max_steps=30, batch_size=6, eval_every=10, patience=2), n_prompt=10)
    # MSF on the related tasks only: the target is unseen by the subspace.
    msf = find_subspace(bb, related, TrainConfig(learning_rate=3e-3, max_steps=50, batch_size=6, eval_every=25,
                                                 patience=2),
                        SubspaceConfig(n_prompt=10, d_model=bb.hidden_size, d_intrinsic=4, d_hidden=64),
                        task_prompts=pt.prompts[1:], alpha=200.0)
    artifact = tmp_path_factory.mktemp("category_subspace")
    save_artifact(artifact, msf.subspace, bb.backbone_id, bb.input_embeddings,
                  provenance={"tasks": [t.name for t in related]})
    # as `ipt msf` and `ipt experiment export` do: the related tasks' vectors ship beside Proj_b, and the worker's
    # Gauss-Newton IST chooses its start among z = 0, their mean and each of them
    save_named(artifact / VECTORS_FILE, {t.name: msf.task_vectors[i] for i, t in enumerate(related)})
    return CategoryStudy(target, related, pt, msf, artifact)
