"""Shared fixtures: tiny random backbones (causal and seq2seq) and the real SmolLM2, each loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.tasks import Example, Task, TaskKind
from tests.tiny_models import save_tiny


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
def real_backbone() -> Backbone:
    """The real SmolLM2-135M-Instruct (fp32), loaded once per test session."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return Backbone.load("smollm2", dtype="float32")


def make_task(name: str = "sentiment", kind: TaskKind = TaskKind.CLASSIFICATION, n: int = 6) -> Task:
    """A small valid task of the given kind for mechanics tests."""
    words = ["great", "terrible", "fine", "awful", "lovely", "bad", "nice", "poor", "good", "sad", "happy", "dull"]
    labels = ("positive", "negative")
    exs = []
    for i in range(n):
        label = labels[i % 2]
        if kind is TaskKind.MULTIPLE_CHOICE:
            exs.append(Example(f"the movie was {words[i % len(words)]}", label, options=labels))
        elif kind is TaskKind.GENERATION:
            exs.append(Example(f"repeat: {words[i % len(words)]}", words[i % len(words)]))
        else:
            exs.append(Example(f"the movie was {words[i % len(words)]}", label))
    return Task(name, kind, exs[: n - 2], exs[n - 2:], exs[n - 2:],
                labels if kind is TaskKind.CLASSIFICATION else None)
