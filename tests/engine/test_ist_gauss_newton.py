"""Levenberg-Marquardt IST and what it shares with L-BFGS (ipt_engine.ist_full_batch), on a tiny random backbone:
per-row gradients from one pass, the option loss, the prompt metric, the start choice, the dev-loss selection and
the stop hook."""

from __future__ import annotations

import itertools

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.ist_full_batch import TrainObjective, dev_score_and_loss
from ipt_engine.ist_gauss_newton import GaussNewtonConfig, choose_start, gauss_newton_subspace_tune, prompt_metric
from ipt_engine.ist_optimizers import ISTSettings, start_candidates, tune
from ipt_engine.subspace import ProjB, SubspaceConfig
from ipt_engine.tasks import TaskKind
from ipt_engine.training import STOPPED_BY_REQUEST, HistoryEntry
from tests.conftest import make_task


@pytest.fixture(scope="module")
def proj_b(tiny_causal: Backbone) -> ProjB:
    torch.manual_seed(0)
    return ProjB(SubspaceConfig(2, tiny_causal.hidden_size, 4, 16)).requires_grad_(False)


@pytest.mark.parametrize("kind", [TaskKind.CLASSIFICATION, TaskKind.GENERATION])
def test_per_row_gradients_from_one_pass_equal_each_row_alone(tiny_causal: Backbone, proj_b: ProjB,
                                                              kind: TaskKind) -> None:
    task = make_task("t", kind, n=8)
    objective = TrainObjective(tiny_causal, task, proj_b, max_rows_per_forward=4)  # two micro-batches
    assert objective.loss_name == ("option cross-entropy" if kind is TaskKind.CLASSIFICATION else "token NLL")
    z = torch.randn(4, generator=torch.Generator().manual_seed(1))
    losses, grads = objective.row_losses_and_grads(z)
    assert losses.shape == (6,) and grads.shape == (6, 4)
    for i in range(6):
        alone = TrainObjective(tiny_causal, make_task("t", kind, n=8), proj_b)
        alone.pairs = alone.pairs[i:i + 1]
        if alone.options is not None:
            alone.options, alone.gold = alone.options[i:i + 1], alone.gold[i:i + 1]
        zi = z.clone().requires_grad_(True)
        loss = alone._row_losses(zi[None], 0)[0]
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(losses[i]), abs=1e-5)
        assert torch.allclose(zi.grad, grads[i], atol=1e-5)
    assert torch.allclose(objective.row_losses(z), losses, atol=1e-5)  # the no-gradient path agrees


def test_option_loss_is_the_cross_entropy_of_the_ranked_options(tiny_causal: Backbone, proj_b: ProjB) -> None:
    task = make_task("t", TaskKind.CLASSIFICATION, n=8)
    objective = TrainObjective(tiny_causal, task, proj_b)
    z = torch.zeros(4)
    prompts = proj_b(z[None]).expand(6, -1, -1)
    sources = [p.source for p in objective.pairs]
    scored = tiny_causal.score_options(prompts, sources, [[" positive", " negative"]] * 6)
    expected = [-float(s.scores().log_softmax(0)[0 if e.output == "positive" else 1])
                for s, e in zip(scored, task.train, strict=True)]
    assert objective.row_losses(z).tolist() == pytest.approx(expected, abs=1e-5)
    # the dev loss is the same quantity on dev, read off the evaluation's own scores
    score, dev_loss = dev_score_and_loss(tiny_causal, task, proj_b(z[None]))
    dev_sources = [task.text_pair(e).source for e in task.dev]
    dev_scored = tiny_causal.score_options(proj_b(z[None]).expand(2, -1, -1), dev_sources,
                                           [[" positive", " negative"]] * 2)
    gold = [0 if e.output == "positive" else 1 for e in task.dev]
    assert dev_loss == pytest.approx(sum(-float(s.scores().log_softmax(0)[g]) for s, g in zip(dev_scored, gold,
                                                                                              strict=True)) / 2)
    assert score == sum(int(s.best() == g) for s, g in zip(dev_scored, gold, strict=True)) / 2


def test_prompt_metric_is_the_jacobian_gram_matrix(proj_b: ProjB) -> None:
    z = torch.randn(4, generator=torch.Generator().manual_seed(2))
    jacobian = torch.autograd.functional.jacobian(lambda v: proj_b(v[None]).flatten(), z)  # [n*d, d_I]
    metric = prompt_metric(proj_b, z)
    assert metric.shape == (4, 4)
    assert torch.allclose(metric.float(), jacobian.T @ jacobian, rtol=1e-3, atol=1e-5)
    assert bool(torch.linalg.eigvalsh(metric).min() > 0)


def test_gauss_newton_lowers_the_train_loss_and_keeps_the_lowest_dev_loss(tiny_causal: Backbone,
                                                                          proj_b: ProjB) -> None:
    task = make_task("gen", TaskKind.GENERATION, n=8)
    config = GaussNewtonConfig(max_iterations=5, patience=10, max_new_tokens=4)
    (r,) = gauss_newton_subspace_tune(tiny_causal, [task], proj_b, config)
    losses = [h["train_loss"] for h in r.history]
    assert r.history[0]["step"] == 0 and r.history[0]["norm"] == 0.0 and len(r.history) >= 2
    assert all(b < a for a, b in itertools.pairwise(losses))  # only steps that lower it are taken
    assert losses[-1] < losses[0] - 0.05
    best = min(r.history, key=lambda h: h["dev_loss"])
    assert r.best_step == best["step"] and r.dev_score == best["dev"]
    assert float(r.z.norm()) == pytest.approx(best["norm"], abs=1e-5) and r.error is None
    assert [h["seconds"] for h in r.history] == sorted(h["seconds"] for h in r.history)


def test_each_task_gets_what_it_gets_alone(tiny_causal: Backbone, proj_b: ProjB) -> None:
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE)]
    config = GaussNewtonConfig(max_iterations=2, patience=10)
    together = gauss_newton_subspace_tune(tiny_causal, tasks, proj_b, config)
    for i, task in enumerate(tasks):
        (alone,) = gauss_newton_subspace_tune(tiny_causal, [task], proj_b, config)
        assert torch.allclose(together[i].z, alone.z, atol=1e-6) and together[i].dev_score == alone.dev_score


def test_the_start_is_the_candidate_with_the_lowest_train_loss(tiny_causal: Backbone, proj_b: ProjB) -> None:
    task = make_task("gen", TaskKind.GENERATION, n=10)  # 8 train rows
    objective = TrainObjective(tiny_causal, task, proj_b)
    candidates = torch.randn(5, 4, generator=torch.Generator().manual_seed(3)) * 3
    rows = objective.spread_rows(4)
    assert rows == [0, 2, 4, 6]  # spread over the 8 rows, not the first 4
    losses = [float(objective.row_losses(c)[rows].mean()) for c in candidates]
    best = min(range(5), key=losses.__getitem__)
    assert torch.equal(choose_start(objective, candidates, 4), candidates[best])
    assert torch.equal(choose_start(objective, candidates.flip(0), 4), candidates[best])
    # with more candidates than `screen_above`, a first round on half the rows keeps the best `keep` of them and
    # always the first two (z = 0 and the mean): the winner is the best of those survivors on all the rows
    first = objective.spread_rows(4)  # max(4, 4 // 2) rows
    ranked = sorted(range(5), key=lambda i: float(objective.row_losses(candidates[i])[first].mean()))
    survivors = set(ranked[:1]) | {0, 1}
    winner = min(survivors, key=losses.__getitem__)
    assert torch.equal(choose_start(objective, candidates, 4, keep=1, screen_above=2), candidates[winner])
    (r,) = gauss_newton_subspace_tune(tiny_causal, [task], proj_b, GaussNewtonConfig(max_iterations=1, start_rows=4,
                                                                                     max_new_tokens=4),
                                      start_candidates=candidates)
    assert r.history[0]["norm"] == pytest.approx(float(choose_start(objective, candidates, 4).norm()), abs=1e-5)


def test_the_hook_sees_every_evaluation_and_can_stop_a_task(tiny_causal: Backbone, proj_b: ProjB) -> None:
    seen: list[tuple[int, HistoryEntry]] = []

    def hook(step: int, entries: dict[int, HistoryEntry]) -> list[int]:
        seen.append((step, entries[0]))
        return [0] if step >= 1 else []

    task = make_task("gen", TaskKind.GENERATION, n=8)
    (r,) = gauss_newton_subspace_tune(tiny_causal, [task], proj_b,
                                      GaussNewtonConfig(max_iterations=6, patience=10, max_new_tokens=4),
                                      on_evaluate=hook)
    assert r.error == STOPPED_BY_REQUEST and [s for s, _ in seen] == [0, 1] and r.steps == 1
    assert [e for _, e in seen] == r.history


def test_inputs_are_checked(tiny_causal: Backbone, proj_b: ProjB) -> None:
    with pytest.raises(ValueError, match="not both"):
        gauss_newton_subspace_tune(tiny_causal, [make_task()], proj_b, GaussNewtonConfig(),
                                   initial_z=torch.zeros(1, 4), start_candidates=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="start_candidates"):
        gauss_newton_subspace_tune(tiny_causal, [make_task()], proj_b, GaussNewtonConfig(),
                                   start_candidates=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="damping"):
        GaussNewtonConfig(damping=0)
    with pytest.raises(ValueError, match="max_iterations"):
        ISTSettings(max_iterations=0)
    with pytest.raises(ValueError):
        ISTSettings(optimizer="sgd")


@pytest.mark.parametrize("optimizer", ["gauss_newton", "lbfgs", "adamw"])
def test_tune_runs_the_chosen_optimizer(tiny_causal: Backbone, proj_b: ProjB, optimizer: str) -> None:
    settings = ISTSettings(optimizer=optimizer, max_iterations=2, max_steps=4, eval_every=2, batch_size=2,
                           max_new_tokens=4)
    (r,) = tune(tiny_causal, [make_task("gen", TaskKind.GENERATION, n=8)], proj_b, settings)
    last = r.history[-1]["step"]
    # the full-batch optimisers count iterations, AdamW counts steps and evaluates every eval_every
    assert last <= 2 if optimizer != "adamw" else [h["step"] for h in r.history] == [0, 2, 4]
    assert ("damping" in r.history[-1]) == (optimizer == "gauss_newton" and last > 0)
    assert settings.total_steps == (4 if optimizer == "adamw" else 2)


def test_start_candidates_are_zero_then_the_mean_and_the_known_vectors() -> None:
    assert torch.equal(start_candidates(3), torch.zeros(1, 3))
    known = torch.tensor([[1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    starts = start_candidates(3, known)
    assert torch.equal(starts, torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 1.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="d_I=4"):
        start_candidates(4, known)


@pytest.mark.parametrize("kind", [TaskKind.CLASSIFICATION, TaskKind.GENERATION])
def test_losses_at_chosen_rows_equal_the_full_pass(tiny_causal: Backbone, proj_b: ProjB, kind: TaskKind) -> None:
    """The start screen's forward-only losses (with options: the prompt's keys and values computed once and
    reused by every row) equal the per-row losses of the training pass."""
    objective = TrainObjective(tiny_causal, make_task("t", kind, n=10), proj_b, max_rows_per_forward=3)
    z = torch.randn(4, generator=torch.Generator().manual_seed(2)) * 3
    full = objective.row_losses(z)
    rows = [0, 2, 3, 7]
    assert torch.allclose(objective.losses_at(z, rows), full[rows], atol=1e-4)
    assert not torch.allclose(objective.losses_at(-z, rows), full[rows], atol=1e-4)


@pytest.mark.parametrize("kind", [TaskKind.CLASSIFICATION, TaskKind.GENERATION])
def test_bfloat16_train_passes_keep_the_gradient_direction(tiny_causal: Backbone, proj_b: ProjB,
                                                           kind: TaskKind) -> None:
    """Under autocast the train losses and per-row gradients are computed in bfloat16 (they differ from float32's)
    yet point the same way, and come back float32; Proj_b(z) itself is not autocast."""
    task = make_task("t", kind, n=8)
    exact = TrainObjective(tiny_causal, task, proj_b)
    fast = TrainObjective(tiny_causal, task, proj_b, autocast=torch.bfloat16)
    z = torch.randn(4, generator=torch.Generator().manual_seed(3))
    losses, grads = exact.row_losses_and_grads(z)
    losses16, grads16 = fast.row_losses_and_grads(z)
    assert losses16.dtype == grads16.dtype == torch.float32
    assert not torch.equal(losses16, losses)  # the autocast took effect
    assert torch.allclose(losses16, losses, rtol=0.05, atol=0.05)
    cosine = torch.nn.functional.cosine_similarity(grads16.mean(0), grads.mean(0), dim=0)
    assert float(cosine) > 0.98
    rows = [1, 4]
    assert torch.allclose(fast.losses_at(z, rows), losses16[rows], atol=0.05)  # the start screen autocasts too


def test_train_precision_names() -> None:
    from ipt_engine.device import train_autocast_dtype
    cpu = torch.device("cpu")
    assert train_autocast_dtype("float32", cpu, torch.float32) is None
    assert train_autocast_dtype("bfloat16", cpu, torch.float32) is torch.bfloat16
    assert train_autocast_dtype("bfloat16", cpu, torch.bfloat16) is None  # a bf16 model is not autocast again
    with pytest.raises(ValueError, match="train precision"):
        train_autocast_dtype("fp8", cpu, torch.float32)
    with pytest.raises(ValueError, match="train precision"):
        GaussNewtonConfig(train_precision="half")
    with pytest.raises(ValueError, match="train precision"):
        ISTSettings(train_precision="half")


def test_exact_gauss_newton_matrix_and_gradients_equal_brute_force(tiny_causal: Backbone, proj_b: ProjB) -> None:
    """The K - 1 contrast passes give every row's gradient and the option loss's Gauss-Newton matrix
    mean_i J_i^T (diag p_i - p_i p_i^T) J_i exactly, J_i = d scores_i / dz computed here one option at a time."""
    from ipt_engine.ist_full_batch import contrasts
    task = make_task("t", TaskKind.CLASSIFICATION, n=8)
    objective = TrainObjective(tiny_causal, task, proj_b, max_rows_per_forward=4)  # two micro-batches
    z = torch.randn(4, generator=torch.Generator().manual_seed(5))
    losses, grads, ggn = objective.row_losses_grads_and_ggn(z)
    ef_losses, ef_grads = objective.row_losses_and_grads(z)
    assert torch.allclose(losses, ef_losses, atol=1e-5) and torch.allclose(grads, ef_grads, atol=1e-5)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(objective.num_rows):
        zi = z.clone().requires_grad_(True)
        (scores,) = objective._option_scores(proj_b(zi[None]), [i])
        jac = torch.stack([torch.autograd.grad(scores[k], zi, retain_graph=True)[0] for k in range(len(scores))])
        p = scores.detach().double().softmax(0)
        expected += jac.double().T @ (torch.diag(p) - torch.outer(p, p)) @ jac.double()
    expected /= objective.num_rows
    assert torch.allclose(ggn, expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ggn, ef_grads.double().T @ ef_grads.double() / objective.num_rows, rtol=0.05)
    for k in (2, 3, 5):
        basis = contrasts(k)
        assert torch.allclose(basis.T @ basis, torch.eye(k - 1, dtype=torch.float64))
        assert torch.allclose(basis.sum(0), torch.zeros(k - 1, dtype=torch.float64), atol=1e-12)


def test_generation_tasks_fall_back_to_the_empirical_fisher(tiny_causal: Backbone, proj_b: ProjB) -> None:
    objective = TrainObjective(tiny_causal, make_task("t", TaskKind.GENERATION, n=8), proj_b)
    with pytest.raises(ValueError, match="answer options"):
        objective.row_losses_grads_and_ggn(torch.zeros(4))
    tasks = [make_task("t", TaskKind.GENERATION, n=8), make_task("c", TaskKind.CLASSIFICATION, n=8)]
    for result in gauss_newton_subspace_tune(tiny_causal, tasks, proj_b,
                                             GaussNewtonConfig(max_iterations=2, curvature="ggn")):
        assert result.error is None and result.steps >= 1
        assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    with pytest.raises(ValueError, match="curvature"):
        GaussNewtonConfig(curvature="hessian")


def test_micro_batches_bound_the_tokens_of_a_backward(tiny_causal: Backbone, proj_b: ProjB) -> None:
    """Rows go into one forward-backward only while their tokens fit the budget (a row longer than it goes
    alone), and the per-row losses and gradients do not depend on how the rows were split."""
    task = make_task("t", TaskKind.GENERATION, n=10)
    whole = TrainObjective(tiny_causal, task, proj_b)
    split = TrainObjective(tiny_causal, task, proj_b, max_tokens_per_pass=12)
    rows = range(whole.num_rows)
    assert whole.micro_batches(rows) == [list(rows)]
    batches = split.micro_batches(rows)
    assert [i for b in batches for i in b] == list(rows) and len(batches) > 1
    lengths = split._lengths
    assert lengths is not None
    assert all(len(b) == 1 or sum(lengths[i] for i in b) <= 12 for b in batches)
    z = torch.randn(4, generator=torch.Generator().manual_seed(7))
    (la, ga), (lb, gb) = whole.row_losses_and_grads(z), split.row_losses_and_grads(z)
    assert torch.allclose(la, lb, atol=1e-5) and torch.allclose(ga, gb, atol=1e-5)
