"""PT, MSF and IST mechanics on tiny random backbones: learning, best-dev selection, early stopping,
NaN handling, and batched multi-task training equal to one-task-at-a-time training."""

from __future__ import annotations

import pytest
import torch

from ipt_engine.backbone import Backbone
from ipt_engine.errors import InvalidTaskError, NonFiniteLossError
from ipt_engine.evaluation import evaluate
from ipt_engine.ist import ZInit, initial_vectors, intrinsic_subspace_tune, nearest_known_vectors
from ipt_engine.msf import find_subspace, reconstruction_error
from ipt_engine.prompt_tuning import ipt_initialised_prompt_tune, prompt_tune, sample_vocab_prompts
from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.tasks import Task, TaskKind
from ipt_engine.training import HistoryEntry, TrainConfig
from tests.conftest import make_task, train_loss

FAST = TrainConfig(learning_rate=0.05, max_steps=8, batch_size=4, eval_every=4, patience=3)



def test_prompt_tuning_lowers_the_training_loss(tiny_backbone: Backbone) -> None:
    task = make_task("gen", TaskKind.GENERATION, n=8)
    init = sample_vocab_prompts(tiny_backbone.input_embeddings, 1, 4, seed=0)
    config = TrainConfig(learning_rate=0.1, max_steps=25, batch_size=4, eval_every=25, patience=5,
                         eval_at_start=False, max_new_tokens=4)
    result = prompt_tune(tiny_backbone, [task], config, initial_prompts=init)
    assert result.prompts.shape == (1, 4, tiny_backbone.hidden_size)
    assert train_loss(tiny_backbone, task, result.prompts) < train_loss(tiny_backbone, task, init) - 0.1


def test_initial_prompts_are_sampled_vocabulary_embeddings(tiny_causal: Backbone) -> None:
    prompts = sample_vocab_prompts(tiny_causal.input_embeddings, 2, 3, seed=1)
    emb = tiny_causal.input_embeddings.detach()
    for row in prompts.reshape(-1, emb.shape[1]):
        assert bool((emb == row).all(dim=1).any())
    assert torch.equal(prompts, sample_vocab_prompts(tiny_causal.input_embeddings, 2, 3, seed=1))


def test_best_dev_prompts_are_the_ones_returned(tiny_causal: Backbone) -> None:
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE)]
    result = prompt_tune(tiny_causal, tasks, TrainConfig(learning_rate=0.5, max_steps=12, batch_size=4,
                                                         eval_every=3, patience=10), n_prompt=3)
    rescored = evaluate(tiny_causal, tasks, result.prompts, "dev")
    assert rescored == pytest.approx([r.dev_score for r in result.train.tasks])


def test_each_task_keeps_the_prompt_of_its_own_best_dev_evaluation(tiny_causal: Backbone,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-task selection: each task gets back the prompt that was evaluated when *its* dev score peaked
    (a later tie does not replace it), with that score and step, even when the tasks peak at different
    evaluations and neither peak is the last one. The dev scores are scripted; the prompts each evaluation
    saw are recorded, so the expected rows come from what was evaluated, not from the selection code."""
    script = {"a": [0.2, 0.9, 0.9, 0.4, 0.3], "b": [0.1, 0.3, 0.4, 0.8, 0.5]}  # evaluations at steps 0,2,4,6,8
    seen: list[torch.Tensor] = []

    def scripted_evaluate(backbone: Backbone, tasks: list[Task], prompts: torch.Tensor, split: str,
                          **kwargs: object) -> list[float]:
        assert split == "dev" and [t.name for t in tasks] == ["a", "b"]
        seen.append(prompts.detach().clone())
        return [script[t.name][len(seen) - 1] for t in tasks]

    monkeypatch.setattr("ipt_engine.training.evaluate", scripted_evaluate)
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE)]
    result = prompt_tune(tiny_causal, tasks, TrainConfig(learning_rate=0.5, max_steps=8, batch_size=2,
                                                         eval_every=2, patience=10), n_prompt=2)
    assert len(seen) == 5
    a, b = result.train.tasks
    assert (a.dev_score, a.best_step, b.dev_score, b.best_step) == (0.9, 2, 0.8, 6)
    assert result.train.mean_dev_score == pytest.approx(0.85)
    assert [h["dev"] for h in result.train.history] == pytest.approx([0.15, 0.6, 0.65, 0.6, 0.4])
    assert torch.equal(result.prompts[0], seen[1][0]) and torch.equal(result.prompts[1], seen[3][1])
    # The prompts moved after the kept evaluations, so returning the last ones would fail the checks above.
    assert not torch.equal(seen[1][0], seen[4][0]) and not torch.equal(seen[3][1], seen[4][1])


def test_early_stopping_stops_a_task_that_does_not_improve(tiny_causal: Backbone) -> None:
    config = TrainConfig(learning_rate=1e-9, max_steps=50, batch_size=2, eval_every=1, patience=2)
    result = prompt_tune(tiny_causal, [make_task()], config, n_prompt=2)
    assert result.train.tasks[0].stopped_early
    assert result.train.steps == 2 and result.train.tasks[0].best_step == 0


def test_nan_loss_stops_training_with_a_clear_error(tiny_causal: Backbone) -> None:
    init = torch.full((1, 2, tiny_causal.hidden_size), float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 1 \(tasks \['sentiment'\]\)"):
        prompt_tune(tiny_causal, [make_task()], FAST, initial_prompts=init)


def test_training_needs_dev_examples_and_unique_names(tiny_causal: Backbone) -> None:
    task = make_task()
    no_dev = Task("nodev", task.kind, task.train, [], [], task.labels)
    with pytest.raises(InvalidTaskError, match="no dev examples"):
        prompt_tune(tiny_causal, [no_dev], FAST)
    with pytest.raises(InvalidTaskError, match="unique"):
        prompt_tune(tiny_causal, [task, task], FAST)


def _subspace(bb: Backbone, n: int = 3, d_i: int = 4) -> IntrinsicSubspace:
    torch.manual_seed(0)
    return IntrinsicSubspace(SubspaceConfig(n, bb.hidden_size, d_i, 16))


def test_ist_trains_only_z(tiny_backbone: Backbone) -> None:
    sub = _subspace(tiny_backbone)
    before = {k: v.clone() for k, v in sub.proj_b.state_dict().items()}
    results = intrinsic_subspace_tune(tiny_backbone, [make_task()], sub.proj_b,
                                      TrainConfig(learning_rate=0.5, max_steps=6, batch_size=4, eval_every=2,
                                                  patience=5, eval_at_start=False))
    (r,) = results
    assert r.z.shape == (4,) and r.steps == 6 and r.wall_seconds > 0
    assert float(r.z.abs().sum()) > 0  # z moved from zeros
    for k, v in sub.proj_b.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in sub.proj_b.parameters())  # restored afterwards


def test_batched_ist_equals_one_task_at_a_time(tiny_causal: Backbone) -> None:
    """Several tasks in one IST batch reach the same z as each task trained alone."""
    sub = _subspace(tiny_causal)
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE), make_task("c", TaskKind.GENERATION)]
    # One evaluation, after the last step: the z compared are the trained ones (with an evaluation at step 0
    # a task whose dev score never rises gets its initial z back, equal alone or batched whatever happened).
    config = TrainConfig(learning_rate=0.3, max_steps=6, batch_size=3, eval_every=6, patience=5, max_new_tokens=3,
                         eval_at_start=False)
    init = initial_vectors(3, 4, ZInit.NORMAL, init_std=0.5, seed=1)
    together = intrinsic_subspace_tune(tiny_causal, tasks, sub.proj_b, config, initial_z=init)
    for i, task in enumerate(tasks):
        assert together[i].best_step == 6 and float((together[i].z - init[i]).abs().max()) > 0.1
        (alone,) = intrinsic_subspace_tune(tiny_causal, [task], sub.proj_b, config, initial_z=init[i:i + 1])
        torch.testing.assert_close(together[i].z, alone.z, atol=1e-4, rtol=0)
        assert together[i].dev_score == pytest.approx(alone.dev_score)


def test_z_initialisation_options() -> None:
    assert torch.equal(initial_vectors(2, 3, "zeros"), torch.zeros(2, 3))
    normal = initial_vectors(2, 3, "normal", init_std=0.01, seed=0)
    assert torch.equal(normal, initial_vectors(2, 3, "normal", init_std=0.01, seed=0))  # seeded
    assert not torch.equal(normal, initial_vectors(2, 3, "normal", init_std=0.01, seed=1))
    torch.testing.assert_close(initial_vectors(2, 3, "normal", init_std=0.03, seed=0), 3 * normal)  # std scales
    many = initial_vectors(200, 50, "normal", init_std=0.01, seed=0)
    assert float(many.mean()) == pytest.approx(0.0, abs=1e-3) and float(many.std()) == pytest.approx(0.01, rel=0.05)
    # With task names, a task starts from the same z alone or in a batch.
    batch = initial_vectors(2, 3, "normal", seed=0, task_names=["a", "b"])
    assert torch.equal(batch[1], initial_vectors(1, 3, "normal", seed=0, task_names=["b"])[0])
    assert not torch.equal(batch[0], batch[1])
    known = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    assert torch.equal(initial_vectors(2, 3, "mean", known_vectors=known), torch.tensor([[2.0, 3.0, 4.0]] * 2))
    with pytest.raises(ValueError, match="needs known task vectors"):
        initial_vectors(1, 3, "mean")


def test_nearest_init_picks_the_known_vector_that_fits_the_task(tiny_causal: Backbone) -> None:
    sub = _subspace(tiny_causal)
    task = make_task("a")
    config = TrainConfig(learning_rate=0.5, max_steps=8, batch_size=4, eval_every=8, patience=5, eval_at_start=False)
    (fitted,) = intrinsic_subspace_tune(tiny_causal, [task], sub.proj_b, config)
    far = torch.randn(2, 4, generator=torch.Generator().manual_seed(3)) * 5
    known = torch.stack([far[0], fitted.z, far[1]])
    chosen = nearest_known_vectors(tiny_causal, [task, task], sub.proj_b, known)
    assert torch.equal(chosen, torch.stack([fitted.z, fitted.z]))
    with pytest.raises(ValueError, match="needs the PLM"):
        initial_vectors(1, 4, "nearest", known_vectors=known)
    with pytest.raises(ValueError, match="needs known task vectors"):
        intrinsic_subspace_tune(tiny_causal, [task], sub.proj_b, config, init="nearest")


def test_msf_learns_to_reconstruct_prompts_with_the_plm_frozen(tiny_causal: Backbone) -> None:
    """MSF trains Proj and Proj_b (the reconstruction error halves), returns Proj(P_i) as the task vectors,
    and leaves the PLM as it found it: the same weights, still frozen, no gradients left on it."""
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE), make_task("c")]
    prompts = sample_vocab_prompts(tiny_causal.input_embeddings, 3, 3, seed=0)
    sub_cfg = SubspaceConfig(3, tiny_causal.hidden_size, 4, 16)
    torch.manual_seed(0)
    untrained = reconstruction_error(IntrinsicSubspace(sub_cfg), prompts)
    plm_before = {k: v.detach().clone() for k, v in tiny_causal.model.state_dict().items()}
    config = TrainConfig(learning_rate=1e-2, max_steps=30, batch_size=2, tasks_per_step=2, eval_every=30,
                         patience=5, eval_at_start=False)
    result = find_subspace(tiny_causal, tasks, config, sub_cfg, task_prompts=prompts, alpha=1000.0)
    assert result.subspace.proj is not None
    with torch.no_grad():
        torch.testing.assert_close(result.task_vectors, result.subspace.proj(prompts))
    assert reconstruction_error(result.subspace, prompts) < untrained / 2
    plm_after = tiny_causal.model.state_dict()
    assert plm_after.keys() == plm_before.keys()
    assert all(torch.equal(plm_after[k], v) for k, v in plm_before.items())
    assert all(not p.requires_grad and p.grad is None for p in tiny_causal.model.parameters())


def test_msf_without_proj_trains_z_and_proj_b_jointly(tiny_seq2seq: Backbone) -> None:
    tasks = [make_task("a"), make_task("b", TaskKind.GENERATION)]
    sub_cfg = SubspaceConfig(3, tiny_seq2seq.hidden_size, 4, 16, with_proj=False)
    config = TrainConfig(learning_rate=1e-2, max_steps=4, batch_size=2, eval_every=4, patience=5, max_new_tokens=3,
                         eval_at_start=False)
    torch.manual_seed(config.seed)
    untrained = IntrinsicSubspace(sub_cfg)  # what find_subspace starts from (it seeds the same way)
    result = find_subspace(tiny_seq2seq, tasks, config, sub_cfg, z_init_std=0.0)
    assert result.subspace.proj is None and result.task_vectors.shape == (2, 4)
    assert bool((result.task_vectors != 0).any(dim=1).all())  # each task's z left the zero it started at
    for k, v in untrained.proj_b.state_dict().items():  # and Proj_b trained too
        assert not torch.equal(result.subspace.proj_b.state_dict()[k], v), k
    with pytest.raises(ValueError, match="needs the tasks' PT prompts"):
        find_subspace(tiny_seq2seq, tasks, config, SubspaceConfig(3, tiny_seq2seq.hidden_size, 4, 16))


def test_ipt_initialised_pt_starts_from_proj_b_of_z(tiny_causal: Backbone) -> None:
    sub = _subspace(tiny_causal)
    z = torch.randn(1, 4)
    config = TrainConfig(learning_rate=1e-9, max_steps=1, batch_size=2, eval_every=1, patience=1,
                         weight_decay=0.0)
    result = ipt_initialised_prompt_tune(tiny_causal, [make_task()], sub.proj_b, z, config)
    with torch.no_grad():
        torch.testing.assert_close(result.prompts, sub.proj_b(z), atol=1e-5, rtol=0)


def test_one_tasks_nan_loss_stops_only_that_task(tiny_causal: Backbone) -> None:
    good, bad = make_task("good"), make_task("bad")
    init = sample_vocab_prompts(tiny_causal.input_embeddings, 2, 2, seed=0)
    init[1] = float("nan")
    result = prompt_tune(tiny_causal, [good, bad], TrainConfig(learning_rate=0.05, max_steps=4, batch_size=2,
                                                               eval_every=2, patience=5), initial_prompts=init)
    ok, failed = result.train.tasks
    assert ok.error is None and ok.steps == 4 and torch.isfinite(result.prompts[0]).all()
    assert failed.error is not None and "['bad']" in failed.error and failed.steps == 1


def test_batched_pt_equals_one_task_at_a_time(tiny_causal: Backbone) -> None:
    """Each task's prompt after batched PT equals its prompt after PT alone. One evaluation, after the last
    step, so the prompts compared are trained ones (an evaluation at step 0 could hand back the initial
    prompts, equal alone or batched whatever training did)."""
    tasks = [make_task("a"), make_task("b", TaskKind.MULTIPLE_CHOICE)]
    config = TrainConfig(learning_rate=0.1, max_steps=4, batch_size=2, eval_every=4, patience=5, eval_at_start=False)
    together = prompt_tune(tiny_causal, tasks, config, n_prompt=3)
    initial = sample_vocab_prompts(tiny_causal.input_embeddings, 2, 3, seed=config.seed, task_names=["a", "b"])
    for i, task in enumerate(tasks):
        assert together.train.tasks[i].best_step == 4
        assert float((together.prompts[i] - initial[i]).abs().max()) > 0.1
        alone = prompt_tune(tiny_causal, [task], config, n_prompt=3)
        torch.testing.assert_close(together.prompts[i], alone.prompts[0], atol=1e-4, rtol=0)


def test_shared_selection_keeps_the_best_mean() -> None:
    from ipt_engine.msf import JointVectors
    from ipt_engine.training import _SelectionState

    params = JointVectors(IntrinsicSubspace(SubspaceConfig(2, 4, 2, 4, with_proj=False)), 2, 0.1, 0)
    state = _SelectionState(2)
    config = TrainConfig(patience=3)
    state.update(params, [0, 1], [0.3, 0.9], 1, config)
    kept = params.z_table.detach().clone()
    with torch.no_grad():
        params.z_table.add_(1.0)
    state.update(params, [0, 1], [0.2, 0.5], 2, config)  # the mean fell (0.35 < 0.6): nothing new is kept
    assert state.best_mean == pytest.approx(0.6) and state.best_step == [1, 1] and state.bad_evals == [1, 1]
    state.restore(params)
    assert torch.equal(params.z_table.detach(), kept)


def test_bad_training_settings_are_rejected(tiny_causal: Backbone) -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainConfig(max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=-0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="tasks_per_step applies to shared"):
        prompt_tune(tiny_causal, [make_task()], TrainConfig(tasks_per_step=1))


def test_evaluation_hook_can_stop_a_task(tiny_causal: Backbone) -> None:
    sub = _subspace(tiny_causal)
    seen: list[tuple[int, dict[int, HistoryEntry]]] = []

    def hook(step: int, entries: dict[int, HistoryEntry]) -> list[int]:
        seen.append((step, entries))
        return [1] if step >= 2 else []

    config = TrainConfig(learning_rate=0.3, max_steps=6, batch_size=2, eval_every=2, patience=5)
    a, b = intrinsic_subspace_tune(tiny_causal, [make_task("a"), make_task("b")], sub.proj_b, config,
                                   on_evaluate=hook)
    assert a.error is None and a.steps == 6
    assert b.error == "stopped by request" and b.steps == 2
    assert [s for s, _ in seen] == [0, 2, 4, 6] and set(seen[-1][1]) == {0}
    # each call carries the new history entry of every evaluated task
    assert seen[1][1][1] == b.history[1] and seen[-1][1][0] == a.history[-1] and a.history[-1]["step"] == 6


def test_training_steps_autocast_when_asked(tiny_causal: Backbone) -> None:
    """train_precision="bfloat16" runs the steps' forward-backward under autocast: the prompts still train
    (float32 parameters, lower train loss) but along slightly different gradients than in float32."""
    task = make_task("gen", TaskKind.GENERATION, n=8)
    init = sample_vocab_prompts(tiny_causal.input_embeddings, 1, 4, seed=0)
    results = {}
    for precision in ("float32", "bfloat16"):
        config = TrainConfig(learning_rate=0.1, max_steps=25, batch_size=4, eval_every=25, patience=5,
                             eval_at_start=False, max_new_tokens=4, train_precision=precision)
        results[precision] = prompt_tune(tiny_causal, [task], config, initial_prompts=init.clone())
    fast = results["bfloat16"]
    assert fast.prompts.dtype == torch.float32
    assert train_loss(tiny_causal, task, fast.prompts) < train_loss(tiny_causal, task, init) - 0.1
    assert not torch.equal(fast.prompts, results["float32"].prompts)
    with pytest.raises(ValueError, match="train precision"):
        TrainConfig(train_precision="int8")
