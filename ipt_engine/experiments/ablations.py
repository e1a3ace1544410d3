"""`ipt experiment ablate`: the levers the paper points at, tried on a finished run's unseen tasks.

Each lever changes one thing against the run's own IST of the unseen tasks at one d_I (the reference row):
the IST step size or optimiser (Gauss-Newton, L-BFGS; AdamW at Gauss-Newton's wall time), where z starts, or how
the subspace was found (MSF without Proj, another alpha). Results
are cached as ablations/<lever>.json in the run directory (MSF variants also keep their artifact under
ablations/msf-<lever>/), so a rerun only computes what is missing; `ipt experiment report` lists them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ipt_engine.experiments.config import ExperimentConfig
from ipt_engine.experiments.pipeline import ExperimentRun
from ipt_engine.experiments.selection import chosen_d
from ipt_engine.ist import ZInit, intrinsic_subspace_tune
from ipt_engine.ist_optimizers import ISTSettings, tune
from ipt_engine.ist_starts import MAX_START_CANDIDATES, start_candidates
from ipt_engine.metrics import e_abs, e_rel
from ipt_engine.msf import find_subspace
from ipt_engine.named_tensors import load_chunks, load_named, save_named, stack_for
from ipt_engine.subspace import ProjB, SubspaceConfig
from ipt_engine.subspace_artifact import load_artifact, save_artifact
from ipt_engine.training import stop_after

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lever:
    """One change against the run's IST of the unseen tasks."""

    name: str
    description: str
    ist: dict[str, Any] = field(default_factory=dict)  # StageSettings overrides for IST
    init: ZInit = ZInit.ZEROS
    msf: dict[str, Any] = field(default_factory=dict)  # MSF variant: with_proj, alpha
    optimizer: str = "adamw"  # "adamw": the run's IST loop; "lbfgs" or "gauss_newton": the full-batch optimisers
    # with the service's defaults (ipt_engine.ist_optimizers)
    time_of: str | None = None  # AdamW only: stop each task at the wall time this other lever took on it
    starts: str = "zero"  # Gauss-Newton only: "zero" (z = 0), "medoids" (the service's start candidates: z = 0, the
    # mean and the known vectors' medoids, ipt_engine.ist_starts) or "all" (z = 0, the mean and every known vector)


LEVERS: tuple[Lever, ...] = (
    Lever("ist-lr-0.1", "IST step size 0.1 (PT-sized) instead of 1.0", ist={"learning_rate": 0.1}),
    Lever("ist-lr-3", "IST step size 3.0 instead of 1.0", ist={"learning_rate": 3.0}),
    Lever("ist-3x-steps", "IST with three times the steps and one more evaluation of patience",
          ist={"max_steps_factor": 3, "patience_add": 1}),
    Lever("init-mean", "z starts at the mean of the train tasks' vectors Proj(P_i)", init=ZInit.MEAN),
    Lever("init-nearest", "z starts at the train task vector whose prompt best fits the task's train examples",
          init=ZInit.NEAREST),
    Lever("msf-without-proj", "MSF without Proj: free z_i per train task learnt with Proj_b (LM loss only)",
          msf={"with_proj": False}),
    Lever("msf-alpha-20", "MSF with alpha = 20 instead of 200 (less weight on reconstruction)", msf={"alpha": 20.0}),
    Lever("msf-lr-1e-5", "MSF's joint steps at lr 1e-5 instead of the run's (in bigbench-100 at d_I = 10 the joint "
          "steps at lr 1e-3 ended at a train loss of 80, LM + 200 x MSE, where the warm-up left 200 x MSE at 0.1, "
          "and lowered mean dev from 0.399 to 0.341)",
          msf={"learning_rate": 1e-5}),
    Lever("ist-lbfgs", "IST with full-batch L-BFGS (strong Wolfe, up to 12 iterations, patience 4) instead of AdamW",
          optimizer="lbfgs"),
    Lever("ist-gauss-newton", "IST with the service's optimiser, started at z = 0: damped Gauss-Newton on the full "
          "train set, option loss, up to 12 iterations, patience 4, the lowest dev loss kept",
          optimizer="gauss_newton"),
    Lever("ist-adamw-equal-time", "the run's AdamW IST, each task stopped at the wall time ist-gauss-newton took "
          "on it", time_of="ist-gauss-newton"),
    Lever("ist-gauss-newton-starts", "the service's IST: Gauss-Newton as in ist-gauss-newton, started at the best "
          "(train loss on 16 rows) of z = 0, the mean and the medoids of the train tasks' vectors",
          optimizer="gauss_newton", starts="medoids"),
    Lever("ist-gauss-newton-all-starts", "Gauss-Newton as in ist-gauss-newton-starts, choosing among every train "
          "task's vector instead of their medoids", optimizer="gauss_newton", starts="all"),
)


def _ist_settings(cfg: ExperimentConfig, overrides: dict[str, Any]) -> Any:
    over = dict(overrides)
    settings = cfg.ist
    if "max_steps_factor" in over:
        settings = replace(settings, max_steps=settings.max_steps * over.pop("max_steps_factor"))
    if "patience_add" in over:
        settings = replace(settings, patience=settings.patience + over.pop("patience_add"))
    return replace(settings, **over)


def _variant_subspace(run: ExperimentRun, lever: Lever, d: int) -> tuple[ProjB, torch.Tensor]:
    """(Proj_b, train-task vectors [T, d_I]) of an MSF variant at d_I = d; computed once, then read back."""
    cfg = run.config
    out = run.dir / "ablations" / f"msf-{lever.name}" / f"dI{d}"
    if not (out / "subspace.json").is_file():
        with_proj = lever.msf.get("with_proj", cfg.with_proj)
        alpha = lever.msf.get("alpha", cfg.alpha)
        prompts = None
        if with_proj:
            prompts = stack_for(run.train_names, load_chunks(run.dir / "pt" / "main"), "PT prompts")
        tasks = run.tasks(run.train_names, cfg.data_seed)
        sub_cfg = SubspaceConfig(cfg.n_prompt, run.backbone.hidden_size, d, cfg.d_hidden, with_proj)
        msf = replace(cfg.msf, learning_rate=lever.msf.get("learning_rate", cfg.msf.learning_rate))
        result = find_subspace(run.backbone, tasks, msf.train_config(cfg.data_seed, cfg.max_new_tokens), sub_cfg,
                               task_prompts=prompts, alpha=alpha,
                               recon_warmup_steps=cfg.msf_recon_warmup_steps if with_proj else 0)
        save_artifact(out, result.subspace, run.backbone.backbone_id, run.backbone.input_embeddings,
                      eval_summary={"mean_dev_score": result.train.mean_dev_score},
                      provenance={"lever": lever.name, "alpha": alpha, "with_proj": with_proj,
                                  "learning_rate": msf.learning_rate})
        save_named(out / "task_vectors.safetensors", {n: result.task_vectors[i] for i, n in enumerate(run.train_names)})
    vectors = load_named(out / "task_vectors.safetensors")
    return load_artifact(out).subspace.proj_b, stack_for(run.train_names, vectors, "task vectors")


def run_lever(run: ExperimentRun, summary: dict[str, Any], lever: Lever, d: int) -> dict[str, Any]:
    """IST of the run's unseen tasks with one lever pulled; cached in ablations/<lever>.json."""
    path = run.dir / "ablations" / f"{lever.name}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("d_intrinsic") == d:
            return cached
    cfg = run.config
    start = time.perf_counter()
    if lever.msf:
        proj_b, known = _variant_subspace(run, lever, d)
    else:
        artifact = run.dir / "msf" / f"dI{d}"
        proj_b = load_artifact(artifact).subspace.proj_b
        vectors = load_named(artifact / "task_vectors.safetensors")
        known = stack_for(run.train_names, vectors, "task vectors")
    tasks = run.tasks(run.test_names, cfg.data_seed)
    settings = _ist_settings(cfg, lever.ist)
    if lever.optimizer != "adamw":
        full_batch = ISTSettings(optimizer=lever.optimizer, max_new_tokens=cfg.max_new_tokens)
        starts = None
        if lever.starts != "zero":
            cap = MAX_START_CANDIDATES if lever.starts == "medoids" else known.shape[0] + 2
            starts = start_candidates(d, known, proj_b=proj_b, max_candidates=cap)
        results = tune(run.backbone, tasks, proj_b, full_batch, start_candidates=starts)
    elif lever.time_of is not None:
        budget = run_lever(run, summary, next(v for v in LEVERS if v.name == lever.time_of), d)["per_task"]
        train = settings.train_config(cfg.data_seed, cfg.max_new_tokens)
        results = [intrinsic_subspace_tune(run.backbone, [t], proj_b, train, init=lever.init, known_vectors=known,
                                           on_evaluate=stop_after(budget[t.name]["seconds"]))[0] for t in tasks]
    else:
        results = intrinsic_subspace_tune(run.backbone, tasks, proj_b,
                                          settings.train_config(cfg.data_seed, cfg.max_new_tokens),
                                          init=lever.init, known_vectors=known)
    with torch.no_grad():
        test = run.test_scores(tasks, proj_b(torch.stack([r.z for r in results])))
    per_task = {r.task: {"dev": r.dev_score, "test": s, "steps": r.steps, "best_step": r.best_step,
                         "seconds": round(r.wall_seconds, 2), "error": r.error, "history": r.history}
                for r, s in zip(results, test, strict=True)}
    out = {"lever": lever.name, "description": lever.description, "d_intrinsic": d, "per_task": per_task,
           "ist": settings.__dict__, "init": str(lever.init), "msf": lever.msf,
           "optimizer": lever.optimizer, "starts": lever.starts,
           "seconds": round(time.perf_counter() - start, 1), **lever_scores(summary, per_task)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def lever_scores(summary: dict[str, Any], per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """E_rel^PT and E_abs over the unseen tasks that count (learnable, PT test score above 0)."""
    pt, ok = summary["pt"]["main"], summary["learnable"]
    keep = [n for n in summary["test_tasks"] if ok.get(n) and pt[n]["test"] > 0 and n in per_task]
    method = {n: per_task[n]["test"] for n in keep}
    return {"tasks_counted": len(keep), "e_rel": e_rel(method, {n: pt[n]["test"] for n in keep}) if keep else None,
            "e_abs": e_abs(method) if keep else None}


def run_levers(run_dir: Path, pool_dir: Path | None = None, d: int | None = None,
               only: list[str] | None = None) -> list[dict[str, Any]]:
    """Pull every lever (or those named in `only`) on a finished run; returns one result per lever."""
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = ExperimentConfig(**summary["config"])
    pool = pool_dir or Path(json.loads((run_dir / "tasks.json").read_text())["pool"])
    run = ExperimentRun(cfg, run_dir, pool)
    d = int(d or chosen_d(summary))
    known = {lever.name for lever in LEVERS}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise ValueError(f"unknown lever(s) {unknown}; known: {sorted(known)}")
    results = []
    for lever in LEVERS:
        if only and lever.name not in only:
            continue
        log.info("lever %s at d_I=%d: %s", lever.name, d, lever.description)
        results.append(run_lever(run, summary, lever, d))
    return results
