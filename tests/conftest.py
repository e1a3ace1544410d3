"""Shared fixtures: tiny random backbones (causal and seq2seq) and the real SmolLM2, each loaded once."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.tasks import Task
from ipt_engine.testing import CategoryStudy, build_category_study, make_task, save_tiny

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


@pytest.fixture(scope="session")
def category_study(real_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> CategoryStudy:
    """The real-model tests' study (ipt_engine.testing.build_category_study), trained once per session."""
    return build_category_study(real_backbone, tmp_path_factory.mktemp("category_subspace"))
