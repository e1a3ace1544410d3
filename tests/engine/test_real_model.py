"""Claims about the real SmolLM2-135M backbone (marked `real_model`; they run in CI too, ~6 minutes on 2 cores).

A new 3-label classification task (16 training examples per label, held-out test examples) is learned
by IST inside a subspace that MSF found from four related tasks in this test; it must beat both z = 0
and the bare PLM. PT on the same task must beat the bare PLM.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.evaluation import evaluate, predict
from ipt_engine.ist import intrinsic_subspace_tune
from ipt_engine.model_loading import load_smollm2
from ipt_engine.tasks import Task
from ipt_engine.training import TrainConfig
from tests.conftest import CategoryStudy

pytestmark = pytest.mark.real_model


def test_fp32_cache_round_trip(tmp_path: Path) -> None:
    """The first load dequantises the GGUF and writes the cache; the second reads the same weights back."""
    first_model, _, first = load_smollm2(tmp_path)
    second_model, tokenizer, second = load_smollm2(tmp_path)
    assert (first.source, second.source) == ("gguf", "fp32-cache")
    assert (tmp_path / Path(second.path).name / "model.safetensors").is_file()
    a, b = first_model.state_dict(), second_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first_model.config.hidden_size == 576 and len(tokenizer) == 49152


def test_real_backbone_shape(real_backbone: Backbone) -> None:
    assert real_backbone.backbone_id == "SmolLM2-135M-Instruct"
    assert real_backbone.hidden_size == 576 and not real_backbone.is_encoder_decoder
    assert all(not p.requires_grad for p in real_backbone.model.parameters())


def test_ist_in_a_learned_subspace_beats_z0_and_no_prompt_and_pt_beats_no_prompt(
        real_backbone: Backbone, category_study: CategoryStudy) -> None:
    bb, study = real_backbone, category_study
    target = study.target
    assert len(target.labels or ()) >= 3 and len(target.train) == 48 and len(target.test) == 36
    assert study.msf.train.mean_dev_score > 0.8  # the subspace holds the related tasks
    (ist,) = intrinsic_subspace_tune(bb, [target], study.msf.subspace.proj_b,
                                     TrainConfig(learning_rate=1.0, max_steps=30, batch_size=12, eval_every=5,
                                                 patience=4))
    with torch.no_grad():
        prompts = {
            "IST": study.msf.subspace.decode(ist.z[None]),
            "z=0": study.msf.subspace.decode(torch.zeros(1, 4)),
            "PT": study.pt.prompts[:1],
        }
    test = {name: evaluate(bb, [target], p.to(bb.device), "test")[0] for name, p in prompts.items()}
    test["no prompt"] = evaluate(bb, [target], None, "test")[0]
    print("test accuracy on the new task:", {k: round(v, 3) for k, v in test.items()})
    # a margin a broken IST cannot meet by chance: 0.15 on 36 test examples of a 3-label task is 6 answers
    assert test["IST"] >= test["z=0"] + 0.15
    assert test["IST"] >= test["no prompt"] + 0.15
    assert test["PT"] >= test["no prompt"] + 0.15
    assert_float16_storage_keeps_predictions(bb, target, study, ist.z)


def assert_float16_storage_keeps_predictions(bb: Backbone, target: Task, study: CategoryStudy, z: torch.Tensor) -> None:
    """The service stores z as float16 by default (service.task_store): the trained z, rounded so, must
    give the same answer on every test input, with option probabilities within 1e-2."""
    assert z.abs().max() > 1.0  # a trained z, not a near-zero one that rounding could not hurt
    with torch.no_grad():
        prompts = study.msf.subspace.decode(torch.stack([z, z.half().float()])).to(bb.device)
    full, half = predict(bb, [target, target], [target.test, target.test], prompts)
    assert [p.output for p in half] == [p.output for p in full]
    gap = max(abs(a - b) for p, q in zip(full, half, strict=True)
              for a, b in zip(p.probabilities or (), q.probabilities or (), strict=True))
    print(f"float16 z: same {len(full)} answers, largest option-probability change {gap:.1e}")
    assert gap < 1e-2
