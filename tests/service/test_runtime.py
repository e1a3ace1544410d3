"""The model holder a worker loads: the subspace's known task vectors come with it when the artifact has them."""

from __future__ import annotations

from pathlib import Path

import torch

from ipt_engine.backbone import Backbone
from ipt_engine.named_tensors import save_named
from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.subspace_artifact import VECTORS_FILE, save_artifact
from service.runtime import load_runtime, reset_runtime
from service.settings import Settings


def test_the_artifacts_task_vectors_are_loaded_as_known_vectors(tmp_path: Path, tiny_causal: Backbone,
                                                                service_settings: Settings) -> None:
    sub = IntrinsicSubspace(SubspaceConfig(2, tiny_causal.hidden_size, 4, 8))
    plain, with_vectors = tmp_path / "plain", tmp_path / "with-vectors"
    for path in (plain, with_vectors):
        save_artifact(path, sub, tiny_causal.backbone_id, tiny_causal.input_embeddings)
    save_named(with_vectors / VECTORS_FILE, {"b": torch.ones(4), "a": torch.arange(4.0)})
    try:
        assert load_runtime(service_settings.model_copy(update={"subspace": plain})).known_vectors is None
        known = load_runtime(service_settings.model_copy(update={"subspace": with_vectors})).known_vectors
        assert known is not None and torch.equal(known, torch.stack([torch.arange(4.0), torch.ones(4)]))  # by name
    finally:
        reset_runtime()
