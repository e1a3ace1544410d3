"""Claims about the real SmolLM2-135M backbone (marked `real_model`; they run in CI too, ~8 minutes on 2
cores).

A new 3-label classification task (16 training examples per label, held-out test examples) is learned
by IST (the service's default, Gauss-Newton started as the worker starts it, and AdamW, the earlier default)
inside a subspace that MSF found from four related tasks in this test: IST must beat both z = 0 of its
subspace and the bare PLM by 0.15 test accuracy, PT must beat the bare PLM by as much, and the default IST must
converge within 15 iterations.

The start matters (issue 14): this subspace's related tasks sit at norms 2 to 30, and from z = 0 Gauss-Newton
can find no step that lowers the train loss by more than 0.005 (the loss along the gradient is lowest at
|dz| = 0.003 and rises beyond; measured on one CPU where its 4 refused steps ended the run at z = 0), while
from the best of the related tasks' vectors it reached dev 1.0 in 5 iterations. The worker starts from the
artifact's task vectors, so the default run here does too."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.evaluation import evaluate, predict
from ipt_engine.ist import ISTResult, intrinsic_subspace_tune
from ipt_engine.ist_optimizers import ISTSettings, start_candidates, tune
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
    """IST of the study's new task with the service's default (Gauss-Newton) and with AdamW (the earlier default),
    and test scores."""

    default: ISTResult
    adamw: ISTResult
    test: dict[str, float]  # default IST, AdamW IST, z=0, PT, no prompt


@pytest.fixture(scope="module")
def new_task_runs(real_backbone: Backbone, category_study: CategoryStudy) -> NewTaskRuns:
    bb, study = real_backbone, category_study
    target, proj_b = study.target, study.msf.subspace.proj_b
    timer = time.perf_counter()
    starts = start_candidates(proj_b.config.d_intrinsic, study.msf.task_vectors)  # as the worker chooses them
    (default,) = tune(bb, [target], proj_b, ISTSettings(), start_candidates=starts)
    default_s, timer = time.perf_counter() - timer, time.perf_counter()
    (adamw,) = intrinsic_subspace_tune(bb, [target], proj_b, TrainConfig(learning_rate=1.0, max_steps=30,
                                                                         batch_size=12, eval_every=5, patience=4))
    adamw_s = time.perf_counter() - timer
    with torch.no_grad():
        prompts = {"default": proj_b(default.z[None]), "AdamW": proj_b(adamw.z[None]),
                   "z=0": proj_b(torch.zeros(1, 4)), "PT": study.pt.prompts[:1]}
    test = {name: evaluate(bb, [target], p.to(bb.device), "test")[0] for name, p in prompts.items()}
    test["no prompt"] = evaluate(bb, [target], None, "test")[0]
    print(f"\nIST on the new task: default (Gauss-Newton) {default.steps} iterations in {default_s:.1f} s (best "
          f"iteration {default.best_step}, dev {default.dev_score:.3f}); AdamW {adamw.steps} steps in {adamw_s:.1f} s "
          f"(best step {adamw.best_step}, dev {adamw.dev_score:.3f}); test accuracy "
          f"{({k: round(v, 3) for k, v in test.items()})}")
    print("default IST curve (iteration, train loss, dev loss, dev score, |z|, s):",
          [(h["step"], h["train_loss"] and round(h["train_loss"], 3), round(h["dev_loss"], 3), round(h["dev"], 3),
            round(h["norm"], 2), round(h["seconds"], 1)) for h in default.history])
    return NewTaskRuns(default, adamw, test)


def test_ist_and_pt_beat_the_bare_plm_by_a_margin(real_backbone: Backbone, category_study: CategoryStudy,
                                                   new_task_runs: NewTaskRuns) -> None:
    target, test = category_study.target, new_task_runs.test
    assert len(target.labels or ()) >= 3 and len(target.train) == 48 and len(target.test) == 36
    assert category_study.msf.train.mean_dev_score > 0.8  # the subspace holds the related tasks
    # a margin a broken IST cannot meet by chance: 0.15 on 36 test examples of a 3-label task is 6 answers
    assert test["default"] >= test["no prompt"] + 0.15
    assert test["AdamW"] >= test["no prompt"] + 0.15
    assert test["PT"] >= test["no prompt"] + 0.15
    assert_float16_storage_keeps_predictions(real_backbone, target, category_study, new_task_runs.adamw.z)


def test_ist_beats_z0_of_its_subspace_by_a_margin(new_task_runs: NewTaskRuns) -> None:
    """Issue 13's margin: what IST learns, not what the subspace gives for free at z = 0."""
    test = new_task_runs.test
    assert test["default"] >= test["z=0"] + 0.15


def test_default_ist_converges_within_15_iterations(new_task_runs: NewTaskRuns, category_study: CategoryStudy) -> None:
    """Issue 14's convergence target: the default optimiser reaches its final dev score within 15 iterations (the
    kept z is within one dev example of the best dev score any iteration reached), its train loss has stopped
    moving by then, and its dev loss fell (an optimiser that took no step would keep the start's)."""
    run = new_task_runs.default
    one_example = 1 / len(category_study.target.dev)
    assert run.error is None and run.steps <= 15 and run.best_step <= 15
    assert run.dev_score >= max(h["dev"] for h in run.history) - one_example - 1e-9
    kept = next(h for h in run.history if h["step"] == run.best_step)
    assert kept["dev_loss"] < run.history[0]["dev_loss"] - 0.15  # measured: 0.584 -> 0.073 (option cross-entropy)
    assert abs(run.history[-1]["train_loss"] - run.history[-2]["train_loss"]) < 1e-2


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



def test_prompt_cache_gives_the_same_scores_and_answers(real_backbone: Backbone) -> None:
    """SmolLM2 with each task's prompt cached (keys and values of its 20 positions) scores options and greedy-
    decodes exactly as with the prompt itself (to 1e-4), for a batch mixing three tasks' rows."""
    per_task = torch.randn(3, 20, real_backbone.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    rows_task = [0, 1, 2, 1]
    sources = ["Review: the battery died after a day\nSentiment:", "Is 17 prime?\nAnswer:", "Translate 'cat':",
               "Topic of 'the striker scored twice':"]
    options = [[" positive", " negative", " neutral"], [" yes", " no"], [" chat", " chien", " un chat noir"],
               [" sports", " politics", " science and technology"]]
    kv = real_backbone.prompt_kv(per_task).select(rows_task)
    expected = real_backbone.score_options(per_task[rows_task], sources, options)
    got = real_backbone.score_options(None, sources, options, prompt_kv=kv)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e.log_likelihoods, g.log_likelihoods, atol=1e-4), (e.log_likelihoods, g.log_likelihoods)
    answers = real_backbone.generate(per_task[rows_task], sources, max_new_tokens=8)
    assert real_backbone.generate(None, sources, max_new_tokens=8, prompt_kv=kv) == answers



def test_prompt_cache_with_task_name_prefixes_gives_the_same_scores(real_backbone: Backbone) -> None:
    """SmolLM2 with each task's prompt and source prefix ("{name}:", names of 3 to 6 tokens) cached: the served
    sources skip those tokens and score as with the prompts (to 1e-4), in a batch mixing three tasks."""
    from ipt_engine.tasks import TaskKind, source_prefix, to_text_pair

    names = ["sentiment", "banking77 intent", "movie review topic"]
    per_task = torch.randn(3, 20, real_backbone.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.02
    rows_task = [2, 0, 1, 0]
    inputs = ["the battery died after a day", "how do I top up my card?", "a heist film with a twist", "loved it"]
    sources = [to_text_pair(names[t], TaskKind.CLASSIFICATION, x).source
               for t, x in zip(rows_task, inputs, strict=True)]
    options = [[" drama", " comedy"], [" positive", " negative"], [" top_up", " card_lost", " refund"],
               [" positive", " negative"]]
    kv = real_backbone.prompt_kv(per_task, [source_prefix(n) for n in names])
    assert sorted(kv.lengths) == sorted(20 + len(real_backbone.tokenizer(source_prefix(n)).input_ids) for n in names)
    assert len(set(kv.lengths)) == 3
    expected = real_backbone.score_options(per_task[rows_task], sources, options)
    got = real_backbone.score_options(None, sources, options, prompt_kv=kv.select(rows_task))
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e.log_likelihoods, g.log_likelihoods, atol=1e-4), (e.log_likelihoods, g.log_likelihoods)
