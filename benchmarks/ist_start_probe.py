"""Where IST starts: the loss around z = 0 and Gauss-Newton from z = 0 against the worker's multi-start.

The real-model tests' setting (`ipt_engine.testing.build_category_study`): PT of a new 3-label category task and
four related ones, MSF (d_I = 4) on the related ones, the new task unseen. This script prints what decides
whether Gauss-Newton IST learns that task:
- the train loss (option cross-entropy, all 48 rows) along the negative gradient at z = 0, at step lengths |dz|
  from 0.001 to 2 (how far a local model of the loss holds there);
- the train loss on 16 rows of each start candidate (z = 0, the related tasks' mean vector, each of them), as
  `choose_start` scores them;
- Gauss-Newton with the service's defaults from z = 0 and from the chosen candidate: iterations, dev and test
  accuracy; and the test accuracy of z = 0 and of no prompt, the controls.

Run:
    .venv/bin/python -m benchmarks.ist_start_probe                  # SmolLM2; ~10 min on 2 CPU cores
    .venv/bin/python -m benchmarks.ist_start_probe --write-docs     # also write the table into docs/benchmarks.md
    .venv/bin/python -m benchmarks.ist_start_probe --quick          # smoke run with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from contextlib import ExitStack

from benchmarks.model_setup import add_common_arguments, prepare
from benchmarks.report import Report, device_description, finish
from benchmarks.timing import device_kind

STEP_LENGTHS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    import torch

    from ipt_engine.backbone import Backbone
    from ipt_engine.evaluation import evaluate
    from ipt_engine.ist_full_batch import TrainObjective
    from ipt_engine.ist_gauss_newton import choose_start
    from ipt_engine.ist_optimizers import ISTSettings, start_candidates, tune
    from ipt_engine.testing import build_category_study

    with ExitStack() as stack:
        setup = prepare(args, stack)  # --quick: a tiny random Llama (the study below replaces the subspace)
        bb = Backbone.load(setup.backbone, device=setup.device, dtype=setup.dtype)
        began = time.perf_counter()
        steps = {"pt_steps": 4, "msf_steps": 4} if args.quick else {}
        study = build_category_study(bb, setup.workdir / "category-subspace", **steps)
        study_s = time.perf_counter() - began
        target, proj_b = study.target, study.msf.subspace.proj_b.to(bb.device).eval().requires_grad_(False)
        d_i = proj_b.config.d_intrinsic
        objective = TrainObjective(bb, target, proj_b)
        zero = torch.zeros(d_i)
        losses, grads = objective.row_losses_and_grads(zero)
        g = grads.double().mean(0).float()
        direction = -g / g.norm().clamp(min=1e-12)
        along = {t: float(objective.row_losses(zero + t * direction).mean()) for t in STEP_LENGTHS}
        candidates = start_candidates(d_i, study.msf.task_vectors)
        rows = objective.spread_rows(16)
        start_losses = [float(objective.losses_at(c, rows).mean()) for c in candidates]
        chosen = choose_start(objective, candidates, 16)
        settings = ISTSettings(max_iterations=2 if args.quick else ISTSettings().max_iterations)
        runs = {"from z = 0": tune(bb, [target], proj_b, settings)[0],
                "multi-start (the worker's)": tune(bb, [target], proj_b, settings, start_candidates=candidates)[0]}
        with torch.no_grad():
            test = {name: evaluate(bb, [target], proj_b(r.z[None].to(bb.device)), "test")[0]
                    for name, r in runs.items()}
            test_zero = evaluate(bb, [target], proj_b(zero[None].to(bb.device)), "test")[0]
        test_none = evaluate(bb, [target], None, "test")[0]

    names = ["z = 0", "mean of the related tasks"] + [f"related task {t.name}" for t in study.related]
    report = Report("ist_start_probe", "Where IST starts (the real-model tests' subspace)", device_kind(bb.device),
                    [f"device: {device_description(bb.device)}", f"model: {setup.label}",
                     f"study: PT + MSF (d_I = {d_i}) on {len(study.related)} related tasks in {study_s:.0f} s; "
                     f"MSF mean dev {study.msf.train.mean_dev_score:.3f}; the new task has {len(target.train)} train, "
                     f"{len(target.dev)} dev, {len(target.test)} test examples",
                     f"train loss at z = 0: {float(losses.mean()):.4f} (rows {float(losses.min()):.3f} to "
                     f"{float(losses.max()):.3f}); gradient norm {float(g.norm()):.3f}"],
                    ["what", "value"])
    report.rows += [[f"train loss at step length {t} along the negative gradient",
                     f"{v:.4f} ({v - float(losses.mean()):+.4f})"] for t, v in along.items()]
    report.rows += [[f"start candidate: {n} (norm {float(c.norm()):.1f}), loss on 16 rows", f"{v:.4f}"]
                    for n, c, v in zip(names, candidates, start_losses, strict=True)]
    report.rows.append(["chosen start", names[int((candidates == chosen).all(1).nonzero()[0])]])
    for name, r in runs.items():
        report.rows.append([f"Gauss-Newton {name}: iterations (best), dev accuracy, test accuracy",
                            f"{r.steps} ({r.best_step}), {r.dev_score:.3f}, {test[name]:.3f}"])
    report.rows += [["test accuracy, z = 0 (control)", f"{test_zero:.3f}"],
                    ["test accuracy, no prompt (control)", f"{test_none:.3f}"]]
    report.values.update(along=along, start_losses=start_losses, test=test, test_zero=test_zero, test_none=test_none,
                         steps={n: r.steps for n, r in runs.items()}, loss_at_zero=float(losses.mean()))
    return finish(report, args, argv)


if __name__ == "__main__":
    main()
