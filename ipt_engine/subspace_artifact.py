"""The on-disk format of a trained subspace: `subspace.safetensors` (weights) + `subspace.json` (metadata).

The metadata names the backbone and fingerprints its embedding matrix, so that a subspace is never used
with a backbone it was not trained for: loading into an incompatible backbone raises
IncompatibleArtifactError naming both sides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ipt_engine.errors import IncompatibleArtifactError
from ipt_engine.named_tensors import load_named, stack_for
from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "subspace.safetensors"
METADATA_FILE = "subspace.json"
VECTORS_FILE = "task_vectors.safetensors"
"""Optional, beside an artifact: the vectors z MSF learned for its train tasks ({task name: [d_I]}); IST may start
from them (`ipt_engine.ist_optimizers.start_candidates`)."""
_PROBE_ROWS, _PROBE_COLS = 16, 8
_PROBE_ATOL = 2e-2  # tolerates the same weights stored in another dtype (bf16/fp16), nothing more


def fingerprint_embeddings(matrix: Tensor) -> dict[str, Any]:
    """Identify an embedding matrix [vocab, d]: its shape, the sha256 of its fp32 bytes, and a small probe
    of values (so the same weights loaded in another dtype still match, while other weights do not)."""
    m = matrix.detach().float().cpu().contiguous()
    step = max(1, m.shape[0] // _PROBE_ROWS)
    probe = m[::step][:_PROBE_ROWS, :_PROBE_COLS]
    return {
        "shape": list(m.shape),
        "sha256": hashlib.sha256(m.numpy().tobytes()).hexdigest(),
        "probe": [round(float(v), 6) for v in probe.flatten()],
    }


def fingerprints_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if list(a["shape"]) != list(b["shape"]):
        return False
    if a["sha256"] == b["sha256"]:
        return True
    pa, pb = torch.tensor(a["probe"]), torch.tensor(b["probe"])
    return pa.shape == pb.shape and bool(torch.allclose(pa, pb, atol=_PROBE_ATOL, rtol=0))


@dataclass
class ArtifactMetadata:
    """What a subspace is, what it was trained on and how well it did."""

    backbone_id: str
    embedding_fingerprint: dict[str, Any]
    config: dict[str, Any]  # SubspaceConfig fields: n_prompt, d_model, d_intrinsic, d_hidden, with_proj
    provenance: dict[str, Any] = field(default_factory=dict)  # tasks, hyperparameters, command, seed
    eval_summary: dict[str, Any] = field(default_factory=dict)  # dev scores, reconstruction, E_rel...
    weights_dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def subspace_config(self) -> SubspaceConfig:
        return SubspaceConfig(**self.config)


@dataclass
class SubspaceArtifact:
    subspace: IntrinsicSubspace
    metadata: ArtifactMetadata


def save_artifact(path: str | Path, subspace: IntrinsicSubspace, backbone_id: str, embeddings: Tensor, *,
                  provenance: dict[str, Any] | None = None, eval_summary: dict[str, Any] | None = None,
                  dtype: torch.dtype = torch.float32, include_proj: bool = True) -> ArtifactMetadata:
    """Write a subspace to directory `path`. fp16 halves the size; `include_proj=False` ships Proj_b only
    (all the service needs)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).cpu().contiguous() for k, v in subspace.state_dict().items()
             if include_proj or not k.startswith("proj.")}
    save_file(state, str(out / WEIGHTS_FILE))
    meta = ArtifactMetadata(
        backbone_id=backbone_id,
        embedding_fingerprint=fingerprint_embeddings(embeddings),
        config=subspace.config.to_dict(),
        provenance=provenance or {},
        eval_summary=eval_summary or {},
        weights_dtype=str(dtype).removeprefix("torch."),
    )
    (out / METADATA_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n", encoding="utf-8")
    return meta


def read_metadata(path: str | Path) -> ArtifactMetadata:
    meta_path = Path(path) / METADATA_FILE
    if not meta_path.is_file():
        raise IncompatibleArtifactError(f"{path} is not a subspace artifact: {METADATA_FILE} is missing")
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleArtifactError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise IncompatibleArtifactError(f"{path} has artifact format {version}, this library reads {FORMAT_VERSION}")
    try:
        meta = ArtifactMetadata(**data)
        meta.subspace_config  # noqa: B018 - validates the shape fields
    except (TypeError, ValueError) as exc:
        raise IncompatibleArtifactError(f"{meta_path} has invalid metadata: {exc}") from None
    return meta


def check_compatible(meta: ArtifactMetadata, backbone_id: str, embeddings: Tensor) -> None:
    """Raise IncompatibleArtifactError when the artifact was trained for another backbone."""
    fingerprint = fingerprint_embeddings(embeddings)
    d_model = int(embeddings.shape[1])
    if meta.config["d_model"] != d_model or not fingerprints_match(meta.embedding_fingerprint, fingerprint):
        raise IncompatibleArtifactError(
            f"the subspace was trained for backbone {meta.backbone_id!r} (embeddings "
            f"{meta.embedding_fingerprint['shape']}, sha256 {meta.embedding_fingerprint['sha256'][:12]}, "
            f"d={meta.config['d_model']}) but the loaded backbone is {backbone_id!r} (embeddings "
            f"{fingerprint['shape']}, sha256 {fingerprint['sha256'][:12]}, d={d_model}); load the backbone it "
            f"was trained with or train a subspace for this one"
        )


def load_artifact(path: str | Path, *, backbone_id: str | None = None, embeddings: Tensor | None = None,
                  device: torch.device | str = "cpu") -> SubspaceArtifact:
    """Read a subspace; with `embeddings` given, first check that it fits that backbone. Weights come back
    in fp32 whatever their storage dtype."""
    meta = read_metadata(path)
    if embeddings is not None:
        check_compatible(meta, backbone_id or "<unnamed>", embeddings)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise IncompatibleArtifactError(f"{path} has metadata but no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise IncompatibleArtifactError(f"{weights} cannot be read: {exc}") from None
    config = meta.subspace_config
    has_proj = any(k.startswith("proj.") for k in state)
    subspace = IntrinsicSubspace(SubspaceConfig(**{**config.to_dict(), "with_proj": config.with_proj and has_proj}))
    try:
        subspace.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise IncompatibleArtifactError(f"{weights} does not match its metadata {config}: {exc}") from None
    return SubspaceArtifact(subspace.to(device).eval(), meta)


def load_task_vectors(path: str | Path) -> Tensor | None:
    """The known task vectors beside an artifact (`VECTORS_FILE`), stacked in task-name order: [k, d_I], or None
    when the artifact has none."""
    file = Path(path) / VECTORS_FILE
    if not file.is_file():
        return None
    named = load_named(file)
    return stack_for(sorted(named), named, "task vectors")
