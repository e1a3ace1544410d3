"""Subspace modules and the artifact format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.errors import IncompatibleArtifactError
from ipt_engine.msf import fit_reconstruction, reconstruction_error
from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.subspace_artifact import (
    METADATA_FILE,
    WEIGHTS_FILE,
    check_compatible,
    fingerprint_embeddings,
    load_artifact,
    read_metadata,
    save_artifact,
)

CONFIG = SubspaceConfig(n_prompt=5, d_model=32, d_intrinsic=4, d_hidden=16)


def test_proj_and_proj_b_shapes_follow_the_paper() -> None:
    sub = IntrinsicSubspace(CONFIG)
    assert sub.proj is not None
    assert sub.proj.linear.in_features == 5 * 32 and sub.proj.linear.out_features == 4
    assert (sub.proj_b.up.in_features, sub.proj_b.up.out_features) == (4, 16)
    assert (sub.proj_b.out.in_features, sub.proj_b.out.out_features) == (16, 5 * 32)
    prompts = torch.randn(3, 5, 32)
    z = sub.encode(prompts)
    assert z.shape == (3, 4)
    assert sub.decode(z).shape == (3, 5, 32)
    # Proj is one linear map of the flattened prompt; Proj_b is Linear -> tanh -> Linear, written out here
    # from the weights (not through the modules' forward).
    w_p, b_p = sub.proj.linear.weight, sub.proj.linear.bias
    torch.testing.assert_close(z, prompts.reshape(3, 160) @ w_p.T + b_p)
    up, out = sub.proj_b.up, sub.proj_b.out
    expected = (torch.tanh(z @ up.weight.T + up.bias) @ out.weight.T + out.bias).reshape(3, 5, 32)
    torch.testing.assert_close(sub.decode(z), expected)


def _mse_by_hand(subspace: IntrinsicSubspace, prompts: torch.Tensor) -> float:
    """MSE(Proj_b(Proj(P)), P) written out from the weights, independently of reconstruction_error()."""
    assert subspace.proj is not None
    flat = prompts.reshape(prompts.shape[0], -1)
    up, out = subspace.proj_b.up, subspace.proj_b.out
    with torch.no_grad():
        z = flat @ subspace.proj.linear.weight.T + subspace.proj.linear.bias
        rebuilt = torch.tanh(z @ up.weight.T + up.bias) @ out.weight.T + out.bias
        return float(((rebuilt - flat) ** 2).mean())


def test_reconstruction_error_is_the_mean_squared_error() -> None:
    """With every weight zero and Proj_b's output bias c, Proj_b(Proj(P)) = c everywhere, so the error is
    mean((c - P)^2): 4 for P = 1 and c = 3; 1 for P = +-1 and c = 0."""
    subspace = IntrinsicSubspace(CONFIG)
    with torch.no_grad():
        for p in subspace.parameters():
            p.zero_()
        subspace.proj_b.out.bias.fill_(3.0)
    ones = torch.ones(2, CONFIG.n_prompt, CONFIG.d_model)
    assert reconstruction_error(subspace, ones) == pytest.approx(4.0)
    with torch.no_grad():
        subspace.proj_b.out.bias.zero_()
    signs = ones.clone()
    signs[1] = -1.0
    assert reconstruction_error(subspace, signs) == pytest.approx(1.0)


def test_reconstruction_warm_up_fits_the_prompts() -> None:
    """fit_reconstruction trains Proj and Proj_b on the reconstruction loss and returns the error of the
    trained subspace (after its last step, not the loss seen before it), checked against the MSE computed
    by hand from the weights."""
    torch.manual_seed(0)
    subspace = IntrinsicSubspace(CONFIG)
    prompts = torch.randn(6, CONFIG.n_prompt, CONFIG.d_model) * 0.5
    before = _mse_by_hand(subspace, prompts)
    one_step = fit_reconstruction(subspace, prompts, steps=1, learning_rate=3e-2)
    assert one_step == pytest.approx(_mse_by_hand(subspace, prompts), rel=1e-5)
    assert one_step < before - 1e-3  # so the error after the step differs from the loss before it
    after = fit_reconstruction(subspace, prompts, steps=200, learning_rate=3e-3)
    assert after == pytest.approx(_mse_by_hand(subspace, prompts), rel=1e-5)
    assert after < 0.5 * before
    with pytest.raises(ValueError, match="Proj"):
        fit_reconstruction(IntrinsicSubspace(SubspaceConfig(5, 32, 4, 16, with_proj=False)), prompts, 1)


def test_variant_without_proj_has_no_encoder() -> None:
    sub = IntrinsicSubspace(SubspaceConfig(5, 32, 4, 16, with_proj=False))
    assert sub.proj is None
    with pytest.raises(RuntimeError, match="without Proj"):
        sub.encode(torch.randn(1, 5, 32))


def test_bad_config_and_bad_z_are_rejected() -> None:
    with pytest.raises(ValueError, match="d_intrinsic"):
        SubspaceConfig(5, 32, 0)
    with pytest.raises(ValueError, match="d_I=4"):
        IntrinsicSubspace(CONFIG).decode(torch.zeros(2, 5))


def test_artifact_round_trip(tmp_path: Path, tiny_causal: Backbone) -> None:
    sub = IntrinsicSubspace(SubspaceConfig(5, tiny_causal.hidden_size, 4, 16))
    meta = save_artifact(tmp_path, sub, tiny_causal.backbone_id, tiny_causal.input_embeddings,
                         provenance={"tasks": ["a", "b"]}, eval_summary={"mean_dev_score": 0.5})
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / METADATA_FILE).is_file()
    data = json.loads((tmp_path / METADATA_FILE).read_text())
    assert data["config"]["d_intrinsic"] == 4 and data["provenance"]["tasks"] == ["a", "b"]
    assert meta.embedding_fingerprint["shape"] == list(tiny_causal.input_embeddings.shape)
    loaded = load_artifact(tmp_path, backbone_id=tiny_causal.backbone_id, embeddings=tiny_causal.input_embeddings)
    z = torch.randn(2, 4)
    torch.testing.assert_close(loaded.subspace.decode(z), sub.decode(z))
    assert loaded.metadata.eval_summary == {"mean_dev_score": 0.5}


def test_fp16_artifact_without_proj_is_smaller_and_close(tmp_path: Path, tiny_causal: Backbone) -> None:
    sub = IntrinsicSubspace(SubspaceConfig(5, tiny_causal.hidden_size, 4, 16))
    save_artifact(tmp_path / "full", sub, "m", tiny_causal.input_embeddings)
    save_artifact(tmp_path / "small", sub, "m", tiny_causal.input_embeddings, dtype=torch.float16, include_proj=False)
    full = (tmp_path / "full" / WEIGHTS_FILE).stat().st_size
    small = (tmp_path / "small" / WEIGHTS_FILE).stat().st_size
    assert small < full / 2
    loaded = load_artifact(tmp_path / "small")
    assert loaded.subspace.proj is None and read_metadata(tmp_path / "small").weights_dtype == "float16"
    z = torch.randn(2, 4)
    torch.testing.assert_close(loaded.subspace.decode(z), sub.decode(z), atol=1e-2, rtol=1e-2)


def test_artifact_for_another_backbone_is_refused(tmp_path: Path, tiny_causal: Backbone,
                                                  tiny_seq2seq: Backbone) -> None:
    sub = IntrinsicSubspace(SubspaceConfig(5, tiny_causal.hidden_size, 4, 16))
    save_artifact(tmp_path, sub, "tiny-llama", tiny_causal.input_embeddings)
    with pytest.raises(IncompatibleArtifactError) as err:
        load_artifact(tmp_path, backbone_id="tiny-bart", embeddings=tiny_seq2seq.input_embeddings)
    assert "tiny-llama" in str(err.value) and "tiny-bart" in str(err.value)
    other = torch.randn(10, tiny_causal.hidden_size)
    with pytest.raises(IncompatibleArtifactError, match="trained for backbone 'tiny-llama'"):
        check_compatible(read_metadata(tmp_path), "other", other)


def test_fingerprint_tolerates_dtype_but_not_other_weights(tiny_causal: Backbone) -> None:
    emb = tiny_causal.input_embeddings.detach()
    fp = fingerprint_embeddings(emb)
    from ipt_engine.subspace_artifact import fingerprints_match

    assert fingerprints_match(fp, fingerprint_embeddings(emb.to(torch.bfloat16)))
    assert not fingerprints_match(fp, fingerprint_embeddings(emb + 0.1))


def test_missing_artifact_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleArtifactError, match="not a subspace artifact"):
        load_artifact(tmp_path)


def test_corrupt_artifacts_are_clear_errors(tmp_path: Path, tiny_causal: Backbone) -> None:
    sub = IntrinsicSubspace(SubspaceConfig(5, tiny_causal.hidden_size, 4, 16))
    save_artifact(tmp_path, sub, "m", tiny_causal.input_embeddings)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(IncompatibleArtifactError, match="cannot be read"):
        load_artifact(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(IncompatibleArtifactError, match=r"no subspace\.safetensors"):
        load_artifact(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(IncompatibleArtifactError, match="not valid JSON"):
        load_artifact(tmp_path)
