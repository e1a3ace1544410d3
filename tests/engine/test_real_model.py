"""Claims about the real SmolLM2-135M backbone (marked `real_model`; they run in CI too, ~8 minutes on 2
cores, L-BFGS IST included).

A new 3-label classification task (16 training examples per label, held-out test examples) is learned
by IST (AdamW, and full-batch L-BFGS) inside a subspace that MSF found from four related tasks in this test:
IST and PT must beat the bare PLM by 0.15 test accuracy, and IST must beat z = 0. The same 0.15 margin over
z = 0 is a strict xfail: it does not hold today (issue 14), and the test says so the day it does."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.evaluation import evaluate, predict
from ipt_engine.ist import ISTResult, intrinsic_subspace_tune
from ipt_engine.ist_lbfgs import LBFGSConfig, lbfgs_subspace_tune
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


@dataclass
class NewTaskRuns:
    """IST of the study's new task with AdamW (the service's loop) and with full-batch L-BFGS, and test scores."""

    adamw: ISTResult
    lbfgs: ISTResult
    test: dict[str, float]  # AdamW, L-BFGS, z=0, PT, no prompt


@pytest.fixture(scope="module")
def new_task_runs(real_backbone: Backbone, category_study: CategoryStudy) -> NewTaskRuns:
    bb, study = real_backbone, category_study
    target, proj_b = study.target, study.msf.subspace.proj_b
    timer = time.perf_counter()
    (adamw,) = intrinsic_subspace_tune(bb, [target], proj_b, TrainConfig(learning_rate=1.0, max_steps=30,
                                                                         batch_size=12, eval_every=5, patience=4))
    adamw_s, timer = time.perf_counter() - timer, time.perf_counter()
    (lbfgs,) = lbfgs_subspace_tune(bb, [target], proj_b, LBFGSConfig(max_iterations=15, patience=5))
    lbfgs_s = time.perf_counter() - timer
    with torch.no_grad():
        prompts = {"AdamW": proj_b(adamw.z[None]), "L-BFGS": proj_b(lbfgs.z[None]), "z=0": proj_b(torch.zeros(1, 4)),
                   "PT": study.pt.prompts[:1]}
    test = {name: evaluate(bb, [target], p.to(bb.device), "test")[0] for name, p in prompts.items()}
    test["no prompt"] = evaluate(bb, [target], None, "test")[0]
    print(f"\nIST on the new task: AdamW {adamw.steps} steps in {adamw_s:.1f} s (best step {adamw.best_step}, dev "
          f"{adamw.dev_score:.3f}); L-BFGS {lbfgs.steps} iterations in {lbfgs_s:.1f} s (best iteration "
          f"{lbfgs.best_step}, dev {lbfgs.dev_score:.3f}); test accuracy {({k: round(v, 3) for k, v in test.items()})}")
    print("L-BFGS curve (iteration, train loss, dev loss, dev score, |z|):",
          [(h["step"], h["train_loss"] and round(h["train_loss"], 3), round(h["dev_loss"], 3), round(h["dev"], 3),
            round(h["norm"], 2)) for h in lbfgs.history])
    return NewTaskRuns(adamw, lbfgs, test)


def test_ist_and_pt_beat_the_bare_plm_by_a_margin(real_backbone: Backbone, category_study: CategoryStudy,
                                                   new_task_runs: NewTaskRuns) -> None:
    target, test = category_study.target, new_task_runs.test
    assert len(target.labels or ()) >= 3 and len(target.train) == 48 and len(target.test) == 36
    assert category_study.msf.train.mean_dev_score > 0.8  # the subspace holds the related tasks
    # a margin a broken IST cannot meet by chance: 0.15 on 36 test examples of a 3-label task is 6 answers
    assert test["AdamW"] >= test["no prompt"] + 0.15
    assert test["PT"] >= test["no prompt"] + 0.15
    assert test["AdamW"] > test["z=0"]
    assert_float16_storage_keeps_predictions(real_backbone, target, category_study, new_task_runs.adamw.z)


@pytest.mark.xfail(strict=True, reason="issue 14: in this 4-d subspace, found from 4 related tasks, Proj_b(0) already "
                   "scores 0.639 and neither optimiser finds a z that adds the 0.15 margin (AdamW 0.667, L-BFGS "
                   "0.639, PT 1.0); strict, so that a fix of IST or MSF shows up here")
def test_ist_beats_z0_of_its_subspace_by_a_margin(new_task_runs: NewTaskRuns) -> None:
    test = new_task_runs.test
    assert max(test["AdamW"], test["L-BFGS"]) >= test["z=0"] + 0.15


def test_lbfgs_ist_converges_within_15_iterations(new_task_runs: NewTaskRuns) -> None:
    """Issue 14's convergence target, for the candidate optimiser: the full train loss stops moving within 15
    iterations, the dev loss falls from the start, and the learned z beats the bare PLM."""
    run, test = new_task_runs.lbfgs, new_task_runs.test
    assert run.error is None and run.steps <= 15
    losses = [h["train_loss"] for h in run.history[1:]]
    assert abs(losses[-1] - losses[-2]) < 1e-3
    assert run.history[-1]["dev_loss"] < run.history[0]["dev_loss"] - 0.3
    assert test["L-BFGS"] > test["no prompt"]


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

