"""The model a worker or API process holds: the backbone and Proj_b, loaded once per process (the API loads it
in service/app.py, a worker in workers/worker.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ipt_engine.backbone import Backbone
from ipt_engine.subspace import IntrinsicSubspace
from ipt_engine.subspace_artifact import ArtifactMetadata, load_artifact, load_task_vectors
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    backbone: Backbone
    subspace: IntrinsicSubspace
    artifact_id: str
    load_seconds: float
    known_vectors: torch.Tensor | None = None  # [k, d_I] the artifact's task vectors (IST start candidates), if any


_runtimes: dict[tuple[str, str, str | None, str], Runtime] = {}


def load_runtime(settings: Settings) -> Runtime:
    """The process-wide runtime for these settings; the first call loads the backbone and the subspace,
    later calls reuse them (one per (backbone, subspace, device, dtype), in practice one per process)."""
    key = (settings.backbone, str(settings.subspace), settings.device, settings.dtype)
    if key not in _runtimes:
        if settings.subspace is None:
            raise RuntimeError("no subspace artifact configured: set IPT_SUBSPACE to a directory written by `ipt msf`")
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        start = time.perf_counter()
        backbone = Backbone.load(settings.backbone, device=settings.device, dtype=settings.dtype)
        artifact = load_artifact(settings.subspace, backbone_id=backbone.backbone_id,
                                 embeddings=backbone.input_embeddings, device=backbone.device)
        artifact_id = artifact_id_of(artifact.metadata)
        known = load_task_vectors(settings.subspace)  # beside the subspace: where known tasks sit in it
        _runtimes[key] = Runtime(backbone, artifact.subspace, artifact_id, time.perf_counter() - start, known)
        log.info("runtime loaded in %.1f s: %s", _runtimes[key].load_seconds, artifact_id)
    return _runtimes[key]


def artifact_id_of(meta: ArtifactMetadata) -> str:
    """The id tasks record of the subspace they were trained in: a task predicts only with that subspace."""
    return f"{meta.backbone_id}/dI{meta.config['d_intrinsic']}/{meta.created_at}"


def reset_runtime() -> None:
    """Forget the loaded runtimes (tests)."""
    _runtimes.clear()
