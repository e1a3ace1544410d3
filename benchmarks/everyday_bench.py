"""Everyday tasks: what a user with 16 examples per label gets, against the bare model and the controls.

The suite is `ipt_engine.data.everyday` (app-review sentiment, product category, email urgency, support intent;
3-4 labels, 16 train / 8 dev / 12 test examples per label, test inputs phrased differently from train). For each
task, test accuracy (rank classification, as the service answers) of:
- no prompt: the bare model;
- Proj_b(0): the subspace's origin, the prompt IST starts from (a control);
- IST, the service's default optimiser (Gauss-Newton, its default settings), in the given subspace, started where
  the worker starts it (the best of z = 0, the mean and the medoids of the artifact's task vectors, if it has any);
- IST, the same in a random Proj_b of the same shape, choosing among the same vectors (a control: what the learned
  subspace adds);
- IST with AdamW, the service's earlier default (lr 1.0, 8 rows per step, dev every 10 steps), given the default
  IST's wall time;
- vanilla prompt tuning (n = the subspace's prompt length, AdamW lr 0.1, 8 rows per step, dev every 5 steps),
  given the same wall time.
Every method chooses on dev only. Per task each accuracy carries a 95% Wilson interval over its test examples;
the mean over tasks carries a 95% bootstrap interval over tasks (k = number of tasks).

Run:
    .venv/bin/python -m benchmarks.everyday_bench                       # all four tasks; ~12 min per task, 2 CPUs
    .venv/bin/python -m benchmarks.everyday_bench --tasks app_review_sentiment,support_intent
    .venv/bin/python -m benchmarks.everyday_bench --quick               # smoke run with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from benchmarks.model_setup import add_common_arguments, prepare, subspace_shape
from benchmarks.report import Report, device_description, finish
from benchmarks.timing import device_kind

METHODS = ["no prompt", "Proj_b(0)", "IST (default)", "IST, random Proj_b", "IST AdamW (same time)",
           "PT (same time)"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, random_subspace=False)
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: the whole suite)")
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="default IST's iterations (default: the service's, 12; --quick 2)")
    parser.add_argument("--pt-lr", type=float, default=0.1, help="PT learning rate (AdamW)")
    parser.add_argument("--seed", type=int, default=0, help="the random Proj_b's seed is 2024 + seed")
    args = parser.parse_args(argv)
    return args


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    import torch

    from ipt_engine.backbone import Backbone
    from ipt_engine.data.everyday import everyday_tasks
    from ipt_engine.evaluation import evaluate
    from ipt_engine.experiments.intervals import mean_with_interval
    from ipt_engine.experiments.pipeline import random_proj_b
    from ipt_engine.ist_optimizers import ISTOptimizer, ISTSettings, tune
    from ipt_engine.ist_starts import start_candidates
    from ipt_engine.prompt_tuning import prompt_tune
    from ipt_engine.subspace_artifact import load_artifact, load_task_vectors
    from ipt_engine.training import TrainConfig, stop_after
    from service.runtime import Runtime

    with ExitStack() as stack:
        setup = prepare(args, stack, random_subspace=False)
        bb = Backbone.load(setup.backbone, device=setup.device, dtype=setup.dtype)
        artifact = load_artifact(setup.subspace, backbone_id=bb.backbone_id, embeddings=bb.input_embeddings,
                                 device=bb.device)
        proj_b = artifact.subspace.proj_b
        shape = artifact.subspace.config
        control = random_proj_b(shape, 2024 + args.seed).to(bb.device)
        # where IST starts, as the worker chooses (z = 0, the mean and the medoids of the artifact's task vectors,
        # when it ships them); the control chooses among the same vectors decoded by its own Proj_b
        known = load_task_vectors(setup.subspace)
        starts, control_starts = (None, None) if known is None else (
            start_candidates(shape.d_intrinsic, known, proj_b=proj_b),
            start_candidates(shape.d_intrinsic, known, proj_b=control))
        tasks = everyday_tasks(args.tasks.split(",") if args.tasks else None)
        if args.quick:  # a tiny model: fewer examples, same code paths
            tasks = [replace(t, train=t.train[:6], dev=t.dev[:4], test=t.test[:4]) for t in tasks[:1]]
        iterations = args.max_iterations or (2 if args.quick else ISTSettings().max_iterations)
        default = ISTSettings(max_iterations=iterations, max_new_tokens=4 if args.quick else 32)
        scores: dict[str, dict[str, float]] = {m: {} for m in METHODS}
        details: dict[str, dict[str, Any]] = {}
        for task in tasks:
            test_n = len(task.test)

            def test_score(prompt: torch.Tensor | None, task: Any = task) -> float:
                return evaluate(bb, [task], prompt, "test")[0]

            with torch.no_grad():
                scores["no prompt"][task.name] = test_score(None)
                scores["Proj_b(0)"][task.name] = test_score(proj_b(torch.zeros(1, shape.d_intrinsic,
                                                                               device=bb.device)))
            began = time.perf_counter()
            (ist,) = tune(bb, [task], proj_b, default, start_candidates=starts)
            ist_s = time.perf_counter() - began
            (rnd,) = tune(bb, [task], control, default, start_candidates=control_starts)
            with torch.no_grad():
                scores["IST (default)"][task.name] = test_score(proj_b(ist.z[None].to(bb.device)))
                scores["IST, random Proj_b"][task.name] = test_score(control(rnd.z[None].to(bb.device)))
            adamw = ISTSettings(optimizer=ISTOptimizer.ADAMW, max_steps=1000, patience=5, max_new_tokens=4
                                if args.quick else 32)
            (old,) = tune(bb, [task], proj_b, adamw, on_evaluate=stop_after(ist_s))
            pt = prompt_tune(bb, [task], TrainConfig(learning_rate=args.pt_lr, max_steps=10_000, batch_size=8,
                                                     eval_every=5, patience=10_000, seed=args.seed,
                                                     train_precision=default.train_precision),
                             n_prompt=shape.n_prompt, on_evaluate=stop_after(ist_s))
            with torch.no_grad():
                scores["IST AdamW (same time)"][task.name] = test_score(proj_b(old.z[None].to(bb.device)))
                scores["PT (same time)"][task.name] = test_score(pt.prompts[:1].to(bb.device))
            details[task.name] = {
                "labels": len(task.labels or ()), "train": len(task.train), "dev": len(task.dev), "test": test_n,
                "ist_seconds": ist_s, "ist_iterations": ist.steps, "ist_best_iteration": ist.best_step,
                "ist_dev": ist.dev_score, "ist_history": ist.history, "adamw_steps": old.steps,
                "adamw_seconds": old.wall_seconds, "pt_steps": pt.train.tasks[0].steps,
                "pt_seconds": pt.train.wall_seconds}

        report = Report(
            "everyday_bench", "Everyday tasks: test accuracy with 16 examples per label", device_kind(bb.device),
            context=[
                f"backbone: {setup.label} on {device_description(bb.device)}, {setup.dtype}",
                f"subspace: {setup.subspace_note}; {subspace_shape(Runtime(bb, artifact.subspace, '', 0.0))}; "
                f"random control: seed {2024 + args.seed}",
                f"IST (default): {default.optimizer.value}, up to {default.max_iterations} iterations, patience "
                f"{default.patience}, "
                + ("z from 0" if starts is None or len(starts) == 1 else f"started at the best by train loss of "
                   f"{len(starts)} "
                   "candidates (z = 0, the mean and medoids of the subspace's task vectors)")
                + "; the lowest dev loss kept; AdamW IST and PT stop at the default IST's wall time on each task "
                "(their best dev checkpoint kept)",
                f"training passes of all three: train_precision {default.train_precision} (the service's); dev and "
                f"test scored in {setup.dtype}",
                "accuracy on each task's test split [95% Wilson interval over its examples]; mean over tasks "
                "[95% bootstrap interval over tasks] (k tasks)",
            ],
            header=["task", *METHODS, "IST s (iterations, best)"])
        for task in tasks:
            d = details[task.name]
            cells = []
            for m in METHODS:
                v = scores[m][task.name]
                low, high = wilson(round(v * d["test"]), d["test"])
                cells.append(f"{v:.3f} [{low:.2f}, {high:.2f}]")
            report.add(f"{task.name} ({d['labels']} labels, {d['test']} test)", *cells,
                       f"{d['ist_seconds']:.0f} ({d['ist_iterations']}, {d['ist_best_iteration']})")
        means = {m: mean_with_interval(list(scores[m].values())) for m in METHODS}
        report.add("mean over tasks", *[means[m].percent() for m in METHODS], "")
        report.notes.append("IST (default) dev curve per task (iteration: dev loss / dev accuracy / s): " + "; ".join(
            f"{name}: " + ", ".join(f"{h['step']}: {h['dev_loss']:.2f}/{h['dev']:.2f}/{h['seconds']:.0f}"
                                    for h in d["ist_history"]) for name, d in details.items()))
        report.values.update(scores=scores, details=details,
                             means={m: e.to_dict() for m, e in means.items()})
        return finish(report, args, argv)


if __name__ == "__main__":
    main()
