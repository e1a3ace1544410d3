"""What MSF is given to find a subspace in: the geometry of the PT prompts, and what PT's recipe does to it.

MSF learns Proj_b by auto-encoding the train tasks' PT prompts. A subspace can only be as shared as those prompts
are: if each task's prompt is mostly its own random starting tokens plus an optimiser's random walk, there is no
common structure to find, and IST in the learned Proj_b does no better than in a random one (what the study and
`everyday_bench` measured). Two parts, each a table:

1. `--run-dir` (default: the study docs/results/bigbench-100): its committed PT prompts of the train tasks
   (`pt/main`) against their starting prompts, rebuilt exactly as PT drew them (vocabulary tokens seeded by
   (seed, task name)): per-token norms of the vocabulary, the starts and the PT prompts; the norm of what PT
   moved; the mean cosine between two tasks' moves; the share of the moves' variance in the first principal
   components; how much of each start is still in its PT prompt; and, for every MSF subspace in the run, |z| of
   the train tasks' vectors and the share of Proj_b's tanh units saturated there (|pre-activation| > 3).
2. `--everyday` (optional, ~10 minutes on 2 CPUs): PT of the everyday suite (4 tasks, 16 examples per label) with
   the study's PT budget and selection, at several learning rates, each task from its own start (the study's
   recipe) or all tasks from one shared start: mean test accuracy [95% bootstrap interval over tasks], the same
   norms and the cosine between the tasks' moves. Nothing is chosen here on test: it is a measurement of recipes.

Run:
    .venv/bin/python -m benchmarks.pt_geometry                      # part 1 (about a minute: loads the model)
    .venv/bin/python -m benchmarks.pt_geometry --everyday           # parts 1 and 2
    .venv/bin/python -m benchmarks.pt_geometry --quick              # smoke run of part 2 on a tiny model
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.model_setup import add_common_arguments, prepare
from benchmarks.report import ROOT, Report, device_description, finish
from benchmarks.timing import device_kind

STUDY = ROOT / "docs" / "results" / "bigbench-100"
SATURATED = 3.0  # |pre-activation| beyond which tanh' < 0.01: the unit passes almost no gradient
UNMOVED = 1e-3  # a move below this share of its start's norm is rounding: that task's PT kept its start


@dataclass(frozen=True)
class Geometry:
    """Per-token norms and cross-task statistics of PT prompts [T, n, d] and their starts [T, n, d]."""

    tasks: int
    start_norm: float  # mean per-token norm of the starting prompts
    final_norm: float  # ... of the PT prompts
    move_norm: float  # ... of PT prompt - start
    move_cosine: float  # mean cosine between two different tasks' moves (flattened)
    top_share: dict[int, float]  # share of the centred moves' variance in the first k principal components
    start_kept: float  # mean over tasks of <P, S> / |S|^2: 1 when the start is still wholly in the prompt
    in_others_span: float  # mean over tasks of the share of |move|^2 inside the span of the other tasks' moves
    chance_span: float  # the same for moves in random directions: (T - 1) / (n * d)
    unmoved: int = 0  # tasks whose PT kept its start (no move; left out of the move statistics)

    @classmethod
    def of(cls, prompts: Tensor, starts: Tensor) -> Geometry:
        """Statistics of the moves are over the tasks that moved (a task whose PT kept its start has no move)."""
        p, s = prompts.float(), starts.float()
        move = moves_of(p, s)
        t = move.shape[0]
        unit = torch.nn.functional.normalize(move, dim=1)
        cos = unit @ unit.T
        off_diag = float((cos.sum() - cos.diagonal().sum()) / (t * (t - 1))) if t > 1 else float("nan")
        sv = torch.linalg.svdvals(move - move.mean(0)) if t > 1 else torch.zeros(1)
        share = (sv**2).cumsum(0) / (sv**2).sum()
        flat_s = s.flatten(1)
        kept = ((p.flatten(1) * flat_s).sum(1) / (flat_s * flat_s).sum(1)).mean()
        loo = [span_share(move[i:i + 1], torch.cat([move[:i], move[i + 1:]])) for i in range(t)] if t > 1 else []
        return cls(p.shape[0], _token_norm(s), _token_norm(p), _token_norm(p - s), off_diag,
                   {k: float(share[min(k, len(share)) - 1]) for k in (1, 5, 10) if k <= t}, float(kept),
                   sum(loo) / len(loo) if loo else float("nan"), (t - 1) / move.shape[1], p.shape[0] - t)

    def cells(self) -> list[str]:
        top = ", ".join(f"{k}: {v:.2f}" for k, v in self.top_share.items())
        tasks = f"{self.tasks}" + (f" ({self.unmoved} kept the start)" if self.unmoved else "")
        return [tasks, f"{self.start_norm:.2f}", f"{self.final_norm:.2f}", f"{self.move_norm:.2f}",
                f"{self.move_cosine:+.3f}", top, f"{self.start_kept:.2f}",
                f"{100 * self.in_others_span:.1f}% ({100 * self.chance_span:.2f}%)"]


GEOMETRY_HEADER = ["mean test accuracy", "tasks", "start norm/token", "PT prompt norm/token", "move norm/token",
                   "cos(moves), 2 tasks", "variance in top PCs", "start kept", "move in the others' span (chance)"]


def moves_of(prompts: Tensor, starts: Tensor) -> Tensor:
    """The flattened moves [T', n * d] of the tasks whose PT moved (a move below UNMOVED of its start's norm is
    rounding: that task kept its start and has no direction to compare)."""
    moves = (prompts.float() - starts.float()).flatten(1)
    return moves[moves.norm(dim=1) > UNMOVED * starts.float().flatten(1).norm(dim=1)]


def span_share(moves: Tensor, basis: Tensor) -> float:
    """Mean over the rows of `moves` [k, D] of the share of |row|^2 inside the span of the rows of `basis` [m, D]:
    how much of a task's move a linear subspace of the other tasks' moves could express."""
    u, sv, _ = torch.linalg.svd(basis.double().T, full_matrices=False)  # [D, m]
    q = u[:, sv > sv.max() * 1e-9] if sv.numel() and sv.max() > 0 else u[:, :0]  # the span's own rank, no more
    a = moves.double()
    return float(((a @ q).pow(2).sum(1) / a.pow(2).sum(1)).mean())


def _token_norm(x: Tensor) -> float:
    return float(x.float().norm(dim=-1).mean())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, random_subspace=True)
    parser.add_argument("--run-dir", type=Path, default=STUDY, help="a study run directory with pt/main and msf/")
    parser.add_argument("--everyday", action="store_true", help="also PT the everyday suite under several recipes")
    parser.add_argument("--lrs", default="0.3,0.03,0.01", help="PT learning rates of part 2 (the study's is first)")
    parser.add_argument("--steps", type=int, default=None, help="PT steps (default: the run's config, else 32)")
    return parser.parse_args(argv)


def run_geometry(run_dir: Path, embeddings: Tensor, report: Report) -> dict[str, object]:
    """Part 1: the committed PT prompts and MSF subspaces of a study run."""
    from safetensors.torch import load_file

    from ipt_engine.prompt_tuning import sample_vocab_prompts
    from ipt_engine.subspace_artifact import load_artifact, load_task_vectors

    tasks = json.loads((run_dir / "tasks.json").read_text())
    train = sorted(tasks["train"])
    config = _config(run_dir)
    seed = int(config.get("data_seed", 0))
    # PT drew its starts from the embeddings in the run's dtype: rounded the same, they are the starts exactly
    embeddings = embeddings.to(getattr(torch, str(config.get("dtype", "float32")))).float()
    prompts: dict[str, Tensor] = {}
    for chunk in sorted((run_dir / "pt" / "main").glob("chunk*.safetensors")):
        prompts.update(load_file(str(chunk)))
    train = [n for n in train if n in prompts]
    final = torch.stack([prompts[n].float() for n in train])
    # PT of a chunk draws each task's start from its own stream seeded by (train seed, task name): rebuilt here
    starts = sample_vocab_prompts(embeddings, len(train), final.shape[1], seed, task_names=train)
    geometry = Geometry.of(final, starts)
    wrong = Geometry.of(final, sample_vocab_prompts(embeddings, len(train), final.shape[1], seed + 1,
                                                    task_names=train))
    report.add(f"{run_dir.name}: PT prompts of the train tasks", "", *geometry.cells())
    held = sorted(n for n in tasks.get("test", {}) if n in prompts)
    held_out = None
    if held:
        held_moves = moves_of(torch.stack([prompts[n].float() for n in held]),
                              sample_vocab_prompts(embeddings, len(held), final.shape[1], seed, task_names=held))
        train_moves = moves_of(final, starts)
        held_out = {"tasks": held_moves.shape[0], "in_train_span": span_share(held_moves, train_moves),
                    "chance": train_moves.shape[0] / train_moves.shape[1]}
    report.add("the same, against starts drawn with another seed (a check)", "", *wrong.cells())
    saturation: dict[str, dict[str, float]] = {}
    for msf in sorted((run_dir / "msf").glob("dI*"), key=lambda p: int(p.name[2:])):
        vectors = load_task_vectors(msf)
        if vectors is None:
            continue
        proj_b = load_artifact(msf).subspace.proj_b
        with torch.no_grad():
            pre = proj_b.up(vectors.float())
        saturation[msf.name] = {"z_norm": float(vectors.norm(dim=1).mean()),
                                "saturated": float((pre.abs() > SATURATED).float().mean())}
    return {"geometry": geometry.__dict__, "check_other_seed": wrong.__dict__, "msf": saturation,
            "held_out": held_out,
            "vocabulary_norm": _token_norm(embeddings[:5000])}


def _config(run_dir: Path) -> dict[str, object]:
    import yaml

    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def run_everyday(bb: object, args: argparse.Namespace, pt_settings: dict[str, object], report: Report
                 ) -> dict[str, object]:
    """Part 2: PT of the everyday suite under each (learning rate, start) recipe, the study's budget."""
    from ipt_engine.data.everyday import everyday_tasks
    from ipt_engine.evaluation import evaluate
    from ipt_engine.experiments.intervals import mean_with_interval
    from ipt_engine.prompt_tuning import prompt_tune, sample_vocab_prompts, shared_start_prompts
    from ipt_engine.training import TrainConfig

    tasks = everyday_tasks()
    n_prompt = int(pt_settings.get("n_prompt", 20))
    if args.quick:
        tasks = [replace(t, train=t.train[:6], dev=t.dev[:4], test=t.test[:4]) for t in tasks[:2]]
        n_prompt = 4
    names = [t.name for t in tasks]
    emb = bb.input_embeddings  # type: ignore[attr-defined]
    own = sample_vocab_prompts(emb, len(tasks), n_prompt, 0, task_names=names).cpu()
    shared = shared_start_prompts(emb, len(tasks), n_prompt, 0).cpu()
    out: dict[str, object] = {}
    for lr in [float(x) for x in args.lrs.split(",")]:
        for label, starts in (("own start per task", own), ("one shared start", shared)):
            config = TrainConfig(learning_rate=lr, max_steps=int(pt_settings["max_steps"]),
                                 batch_size=int(pt_settings["batch_size"]), eval_every=int(pt_settings["eval_every"]),
                                 patience=int(pt_settings["patience"]), dev_loss=True, seed=0)
            began = time.perf_counter()
            result = prompt_tune(bb, tasks, config, n_prompt=n_prompt, initial_prompts=starts.to(emb.device))
            seconds = time.perf_counter() - began
            with torch.no_grad():
                test = evaluate(bb, tasks, result.prompts.to(emb.device), "test")
            geometry = Geometry.of(result.prompts, starts)
            mean = mean_with_interval(test)
            report.add(f"everyday, PT lr {lr:g}, {label} ({seconds:.0f} s)", mean.percent(), *geometry.cells())
            out[f"lr{lr:g}/{label}"] = {"test": dict(zip(names, test, strict=True)), "mean": mean.to_dict(),
                                        "geometry": geometry.__dict__, "seconds": seconds}
    return out


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    from ipt_engine.backbone import Backbone

    with ExitStack() as stack:
        setup = prepare(args, stack, random_subspace=True)
        bb = Backbone.load(setup.backbone, device=setup.device, dtype=setup.dtype)
        config = _config(args.run_dir)
        pt_settings = {"max_steps": 32, "batch_size": 4, "eval_every": 8, "patience": 2, "n_prompt": 20,
                       **dict(config.get("pt") or {}), **({"n_prompt": config["n_prompt"]} if config else {})}
        if args.steps:
            pt_settings["max_steps"] = args.steps
        if args.quick:
            pt_settings.update(max_steps=4, eval_every=2)
        report = Report(
            "pt_geometry", "What MSF is given: the geometry of PT prompts", device_kind(bb.device),
            context=[f"backbone: {setup.label} on {device_description(bb.device)}, {setup.dtype}",
                     "per-token norms are means over tasks and prompt tokens; 'cos(moves)' is the mean cosine between "
                     "two different tasks' (PT prompt - start), flattened; 'variance in top PCs' the share of the "
                     "centred moves' variance in the first 1/5/10 principal components (1/T each if they shared "
                     "nothing); 'start kept' the mean of <P, S>/|S|^2 (1: the start is still wholly in the prompt); "
                     "'move in the others' span' the mean share of a task's |move|^2 inside the span of the other "
                     "tasks' moves (leave one out; chance: moves in random directions); a task whose PT kept its start "
                     f"(a move below {UNMOVED:g} of its start's norm) is left out of the move statistics",
                     f"PT budget of part 2 (the study's): {pt_settings['max_steps']} steps of "
                     f"{pt_settings['batch_size']} rows per task, dev every {pt_settings['eval_every']} steps, "
                     f"patience {pt_settings['patience']}, ties of dev accuracy broken by dev loss; AdamW"],
            header=["prompts", *GEOMETRY_HEADER])
        values: dict[str, object] = {}
        if not args.quick and (args.run_dir / "pt" / "main").is_dir():
            values["run"] = run_geometry(args.run_dir, bb.input_embeddings.detach().float().cpu(), report)
            msf = values["run"]["msf"]  # type: ignore[index]
            report.notes.append(
                f"vocabulary (first 5,000 tokens) per-token norm: {values['run']['vocabulary_norm']:.2f}; "  # type: ignore[index]
                "MSF task vectors of the run: " + "; ".join(
                    f"{k}: mean |z| {v['z_norm']:.1f}, {100 * v['saturated']:.0f}% of tanh units saturated "
                    f"(|pre-activation| > {SATURATED:g})" for k, v in msf.items()))
            held = values["run"]["held_out"]  # type: ignore[index]
            if held:
                report.notes.append(
                    f"the {held['tasks']} held-out tasks whose PT moved: {100 * held['in_train_span']:.1f}% of their "
                    f"moves' squared norm lies in the span of the train tasks' moves (a linear subspace of what MSF "
                    f"was given); moves in random directions: {100 * held['chance']:.2f}%")
        if args.everyday or args.quick:
            values["everyday"] = run_everyday(bb, args, pt_settings, report)
        report.values.update(values)
        return finish(report, args, argv)


if __name__ == "__main__":
    main()
