"""The `ipt` command line: prompt tuning, subspace finding, intrinsic subspace tuning and evaluation over
task files (JSON Lines, one task per line; see ipt_engine.tasks)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ipt_engine.backbone import Backbone
from ipt_engine.cli_data import data_app
from ipt_engine.cli_experiment import experiment_app
from ipt_engine.errors import IPTError
from ipt_engine.ist import ZInit, intrinsic_subspace_tune
from ipt_engine.ist_optimizers import ISTOptimizer, ISTSettings, start_candidates, tune
from ipt_engine.msf import DEFAULT_ALPHA, find_subspace, reconstruction_error
from ipt_engine.named_tensors import load_named, save_named, stack_for
from ipt_engine.prompt_tuning import prompt_tune, shared_start_prompts
from ipt_engine.subspace import SubspaceConfig
from ipt_engine.subspace_artifact import VECTORS_FILE, load_artifact, load_task_vectors, save_artifact
from ipt_engine.tasks import Task, load_tasks
from ipt_engine.training import TrainConfig, TrainResult

app = typer.Typer(help="Intrinsic Prompt Tuning: PT, MSF, IST and evaluation on a frozen LM.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data")
app.add_typer(experiment_app, name="experiment")
console = Console(stderr=True)

TasksArg = Annotated[Path, typer.Argument(help="JSONL task file, one task per line", exists=True, dir_okay=False)]
Backbone_ = Annotated[str, typer.Option("--backbone", help="'smollm2' (packaged) or a transformers name/path")]
Device = Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu)")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")]
Steps = Annotated[int, typer.Option(help="maximum optimizer steps")]
Batch = Annotated[int, typer.Option(help="training rows per task per step")]
EvalEvery = Annotated[int, typer.Option(help="steps between dev evaluations")]
Patience = Annotated[int, typer.Option(help="evaluations without dev improvement before stopping")]
Seed = Annotated[int, typer.Option(help="random seed")]
PROMPTS_FILE = "prompts.safetensors"
_IST = ISTSettings()  # `ipt ist` defaults: the engine's, as the service's
_TRAIN = TrainConfig()  # `ipt pt` / `ipt msf` defaults: the training loop's


def _load(path: Path) -> list[Task]:
    return [t.with_dev_split() for t in load_tasks(path)]


def _backbone(name: str, device: str | None, dtype: str) -> Backbone:
    with console.status(f"loading backbone {name}"):
        return Backbone.load(name, device=device, dtype=dtype)


def _summary(title: str, result: TrainResult, extra: dict[str, list[str]] | None = None) -> None:
    table = Table(title=title)
    for col in ("task", "best dev", "best step", "steps", "early stop", *(extra or {})):
        table.add_column(col)
    for i, r in enumerate(result.tasks):
        table.add_row(r.task, f"{r.dev_score:.4f}", str(r.best_step), str(r.steps), "yes" if r.stopped_early else "no",
                      *[v[i] for v in (extra or {}).values()])
    console.print(table)
    console.print(f"mean best dev {result.mean_dev_score:.4f} | {result.steps} steps | {result.wall_seconds:.1f} s")


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _command() -> str:
    return "ipt " + shlex.join(sys.argv[1:])


@app.command()
def pt(tasks: TasksArg, out: Annotated[Path, typer.Option(help="output directory")],
       n_prompt: Annotated[int, typer.Option(help="soft prompt length n")] = 100,
       lr: Annotated[float, typer.Option(help="AdamW learning rate")] = _TRAIN.learning_rate,
       max_steps: Steps = _TRAIN.max_steps, batch_size: Batch = _TRAIN.batch_size,
       eval_every: EvalEvery = _TRAIN.eval_every, patience: Patience = _TRAIN.patience,
       backbone: Backbone_ = "smollm2", device: Device = None, dtype: Dtype = "float32", seed: Seed = _TRAIN.seed,
       shared_start: Annotated[bool, typer.Option(
           help="start every task from one draw of vocabulary tokens (for prompts that `ipt msf` is to find a "
                "subspace in: they then differ only by what PT moved)")] = False,
       ) -> None:
    """Vanilla prompt tuning of every task in the file (batched together); writes prompts.safetensors."""
    task_list = _load(tasks)
    bb = _backbone(backbone, device, dtype)
    config = TrainConfig(learning_rate=lr, max_steps=max_steps, batch_size=batch_size, eval_every=eval_every,
                         patience=patience, seed=seed, progress=True)
    initial = shared_start_prompts(bb.input_embeddings, len(task_list), n_prompt, seed) if shared_start else None
    result = prompt_tune(bb, task_list, config, n_prompt=n_prompt, initial_prompts=initial)
    save_named(out / PROMPTS_FILE, {t.name: result.prompts[i] for i, t in enumerate(task_list)})
    _write_json(out / "results.json", {"command": _command(), "backbone": bb.backbone_id,
                                       "tasks": [r.__dict__ for r in result.train.tasks],
                                       "wall_seconds": result.train.wall_seconds})
    _summary("Prompt tuning", result.train)
    console.print(f"prompts written to {out / PROMPTS_FILE}")


@app.command()
def msf(tasks: TasksArg, out: Annotated[Path, typer.Option(help="artifact directory to write")],
        prompts: Annotated[Path | None, typer.Option(
            help="prompts.safetensors from `ipt pt` (not needed with --no-proj)")] = None,
        d_intrinsic: Annotated[int, typer.Option(help="intrinsic dimension d_I")] = 250,
        d_hidden: Annotated[int, typer.Option(help="Proj_b hidden width d_I'")] = 768,
        n_prompt: Annotated[int, typer.Option(help="prompt length n (--no-proj only; else from the prompts)")] = 100,
        alpha: Annotated[float, typer.Option(help="weight of the reconstruction MSE")] = DEFAULT_ALPHA,
        no_proj: Annotated[bool, typer.Option("--no-proj", help="variant without Proj: free z per task")] = False,
        lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-3,
        max_steps: Steps = _TRAIN.max_steps, batch_size: Batch = _TRAIN.batch_size,
        tasks_per_step: Annotated[int | None, typer.Option(help="tasks sampled per step (default all)")] = None,
        eval_every: EvalEvery = _TRAIN.eval_every, patience: Patience = _TRAIN.patience,
        backbone: Backbone_ = "smollm2", device: Device = None, dtype: Dtype = "float32", seed: Seed = _TRAIN.seed
        ) -> None:
    """Multi-task subspace finding: train Proj and Proj_b; writes a subspace artifact."""
    task_list = _load(tasks)
    bb = _backbone(backbone, device, dtype)
    task_prompts = None
    if not no_proj:
        if prompts is None:
            raise typer.BadParameter("give --prompts from `ipt pt`, or use --no-proj")
        task_prompts = stack_for([t.name for t in task_list], load_named(prompts), "PT prompts")
        n_prompt = task_prompts.shape[1]
    sub_cfg = SubspaceConfig(n_prompt=n_prompt, d_model=bb.hidden_size, d_intrinsic=d_intrinsic,
                             d_hidden=d_hidden, with_proj=not no_proj)
    config = TrainConfig(learning_rate=lr, max_steps=max_steps, batch_size=batch_size, tasks_per_step=tasks_per_step,
                         eval_every=eval_every, patience=patience, seed=seed, progress=True)
    result = find_subspace(bb, task_list, config, sub_cfg, task_prompts=task_prompts, alpha=alpha)
    summary = {"mean_dev_score": result.train.mean_dev_score,
               "dev_scores": {r.task: r.dev_score for r in result.train.tasks}}
    if task_prompts is not None:
        summary["reconstruction_mse"] = reconstruction_error(result.subspace, task_prompts)
    save_artifact(out, result.subspace, bb.backbone_id, bb.input_embeddings, eval_summary=summary,
                  provenance={"command": _command(), "tasks": [t.name for t in task_list], "alpha": alpha,
                              "learning_rate": lr, "steps": result.train.steps, "seed": seed})
    save_named(out / VECTORS_FILE, {t.name: result.task_vectors[i] for i, t in enumerate(task_list)})
    _summary("Multi-task subspace finding (dev with reconstructed prompts)", result.train)
    console.print(f"subspace written to {out}")


@app.command()
def ist(tasks: TasksArg, subspace: Annotated[Path, typer.Option(help="subspace artifact directory")],
        out: Annotated[Path, typer.Option(help="output directory")],
        optimizer: Annotated[ISTOptimizer, typer.Option(help="gauss_newton (full batch; starts from the best of z = 0 "
                                                        "and the subspace's task vectors when it has them), lbfgs, "
                                                        "or adamw (--init, --lr, --max-steps, ...)")]
        = _IST.optimizer,
        max_iterations: Annotated[int, typer.Option(help="gauss_newton / lbfgs iterations")] = _IST.max_iterations,
        init: Annotated[ZInit, typer.Option(help="adamw: z initialisation")] = ZInit.ZEROS,
        lr: Annotated[float, typer.Option(help="AdamW learning rate")] = _IST.learning_rate,
        max_steps: Steps = _IST.max_steps, batch_size: Batch = _IST.batch_size, eval_every: EvalEvery = _IST.eval_every,
        patience: Annotated[int, typer.Option(help="iterations (gauss_newton, lbfgs) or dev evaluations (adamw) "
                                                   "without a dev improvement before stopping")] = _IST.patience,
        backbone: Backbone_ = "smollm2", device: Device = None, dtype: Dtype = "float32", seed: Seed = _IST.seed
        ) -> None:
    """Intrinsic subspace tuning: learn z (d_I floats) per task; writes task_vectors.safetensors."""
    task_list = _load(tasks)
    bb = _backbone(backbone, device, dtype)
    art = load_artifact(subspace, backbone_id=bb.backbone_id, embeddings=bb.input_embeddings)
    known = None
    if optimizer is ISTOptimizer.GAUSS_NEWTON or init in (ZInit.MEAN, ZInit.NEAREST):
        known = load_task_vectors(subspace)
    settings = ISTSettings(optimizer=optimizer, max_iterations=max_iterations, patience=patience, learning_rate=lr,
                           max_steps=max_steps, batch_size=batch_size, eval_every=eval_every, seed=seed)
    if optimizer is ISTOptimizer.ADAMW:
        config = settings.adamw_config(dev_loss=False, progress=True)
        results = intrinsic_subspace_tune(bb, task_list, art.subspace.proj_b, config, init=init, known_vectors=known)
    else:
        starts = (start_candidates(art.subspace.config.d_intrinsic, known, proj_b=art.subspace.proj_b)
                  if optimizer is ISTOptimizer.GAUSS_NEWTON else None)
        results = tune(bb, task_list, art.subspace.proj_b, settings, start_candidates=starts)
    save_named(out / VECTORS_FILE, {r.task: r.z for r in results})
    _write_json(out / "results.json", {"command": _command(), "subspace": str(subspace),
                                       "tasks": [{k: v for k, v in r.__dict__.items() if k != "z"} for r in results]})
    table = Table(title="Intrinsic subspace tuning")
    for col in ("task", "best dev", "best step", "steps"):
        table.add_column(col)
    for r in results:
        table.add_row(r.task, f"{r.dev_score:.4f}", str(r.best_step), str(r.steps))
    console.print(table)
    console.print(f"mean best dev {sum(r.dev_score for r in results) / len(results):.4f} | "
                  f"{results[0].wall_seconds:.1f} s | vectors written to {out / VECTORS_FILE}")


@app.command("eval")
def eval_(tasks: TasksArg,
          prompts: Annotated[Path | None, typer.Option(help="prompts.safetensors from `ipt pt`")] = None,
          subspace: Annotated[Path | None, typer.Option(help="subspace artifact (with --vectors)")] = None,
          vectors: Annotated[Path | None, typer.Option(help="task_vectors.safetensors from `ipt ist`")] = None,
          split: Annotated[str, typer.Option(help="dev or test")] = "test",
          out: Annotated[Path | None, typer.Option(help="write scores as JSON here")] = None,
          backbone: Backbone_ = "smollm2", device: Device = None, dtype: Dtype = "float32") -> None:
    """Score tasks on a split with PT prompts, with IST vectors through a subspace, or with no prompt."""
    import torch

    from ipt_engine.evaluation import evaluate

    if split not in ("dev", "test"):
        raise typer.BadParameter("split must be 'dev' or 'test'")
    if (subspace is None) != (vectors is None):
        raise typer.BadParameter("--subspace and --vectors go together")
    if prompts is not None and subspace is not None:
        raise typer.BadParameter("give either --prompts or --subspace/--vectors, not both")
    task_list = _load(tasks)
    names = [t.name for t in task_list]
    bb = _backbone(backbone, device, dtype)
    stacked = None
    mode = "no prompt"
    if prompts is not None:
        stacked, mode = stack_for(names, load_named(prompts), "prompts"), "PT prompts"
    elif subspace is not None and vectors is not None:
        art = load_artifact(subspace, backbone_id=bb.backbone_id, embeddings=bb.input_embeddings)
        with torch.no_grad():
            stacked = art.subspace.decode(stack_for(names, load_named(vectors), "vectors"))
        mode = "IST vectors"
    with console.status(f"evaluating {len(task_list)} task(s) on {split}"):
        scores = evaluate(bb, task_list, stacked.to(bb.device) if stacked is not None else None, split)
    table = Table(title=f"Evaluation on {split} ({mode})")
    for col in ("task", "metric", "examples", "score"):
        table.add_column(col)
    for t, s in zip(task_list, scores, strict=True):
        table.add_row(t.name, str(t.metric), str(len(getattr(t, split))), f"{s:.4f}")
    console.print(table)
    valid = [s for s in scores if s == s]
    console.print(f"mean {sum(valid) / max(len(valid), 1):.4f} over {len(valid)} task(s)")
    if out is not None:
        _write_json(out, {"command": _command(), "split": split, "mode": mode,
                          "scores": dict(zip(names, scores, strict=True))})


def main() -> None:
    """Entry point: runs the app and turns library errors into one clear line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ipt_engine").setLevel(logging.INFO)
    try:
        app()
    except (IPTError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
