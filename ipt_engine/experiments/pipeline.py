"""`ipt experiment run`: every stage of the paper's study, resumable and cached in a run directory.

Run directory layout (each file is written when its stage or chunk finishes; a rerun reads what is there):
    config.yaml, command.txt, tasks.json      what was run, on which tasks
    pt/<tag>/chunkNNN.{json,safetensors}      PT per chunk of tasks (tags: main, unseen-data, stability-seedS)
    msf/dI<d>/                                the subspace artifact for each d_I (+ task_vectors.safetensors)
    recon/dI<d>.json                          train tasks scored with Proj_b(Proj(P_i))
    ist/dI<d>/<challenge>/chunkNNN.*          IST per challenge: seen_same_data, seen_unseen_data, unseen_tasks
    ist/dI<d>/<challenge>-random/chunkNNN.*   the control: IST in a seeded random Proj_b of the same shapes
    controls/dI<d>-z0.json                    test scores with Proj_b(0) of the MSF subspace (z = 0)
    controls/no-prompt.json                   test scores of the bare PLM (no soft prompt)
    ipt_pt/seed<S>/chunkNNN.*                 IPT-initialised PT of the unseen tasks
    baselines.json, timings.json, summary.json
Tasks of one chunk train together in one batched run (each row with its own prompt).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import torch
import yaml
from torch import Tensor

from ipt_engine.backbone import Backbone
from ipt_engine.data.pool import TaskPool, texts_of
from ipt_engine.data.splits import load_split
from ipt_engine.errors import InvalidTaskError
from ipt_engine.evaluation import evaluate, reference_of
from ipt_engine.experiments.config import ExperimentConfig
from ipt_engine.experiments.selection import choose_d, learnable
from ipt_engine.ist import intrinsic_subspace_tune
from ipt_engine.ist_optimizers import start_candidates, tune
from ipt_engine.metrics import compute_metric
from ipt_engine.msf import find_subspace, reconstruction_error
from ipt_engine.named_tensors import load_named, save_named, stack_for
from ipt_engine.prompt_tuning import prompt_tune, shared_start_prompts
from ipt_engine.subspace import ProjB, SubspaceConfig
from ipt_engine.subspace_artifact import VECTORS_FILE, WEIGHTS_FILE, load_artifact, save_artifact
from ipt_engine.tasks import Task, TaskKind

log = logging.getLogger(__name__)

CHALLENGES = ("seen_same_data", "seen_unseen_data", "unseen_tasks")
RANDOM_SUBSPACE_SEED = 2024  # the control's Proj_b: seeded (plus d_I), never trained
ChunkFn = Callable[[list[Task]], tuple[dict[str, dict[str, Any]], dict[str, Tensor]]]


def trivial_score(task: Task) -> float:
    """The dev score of a task-aware guess: the majority train label (classification), a uniform guess
    over the options (multiple choice), the most frequent train output (generation)."""
    if task.kind is TaskKind.MULTIPLE_CHOICE:
        return mean(1 / len(e.options or ("",)) for e in task.dev)
    guess = Counter(e.output for e in task.train).most_common(1)[0][0]
    refs = [reference_of(e) for e in task.dev]
    return compute_metric(task.metric, [guess] * len(task.dev), refs, labels=task.labels)


def cap_per_family(names: Sequence[str], limit: int) -> list[str]:
    """At most `limit` subtasks of each BIG-bench task family ("family:subtask"), in sorted order: families
    with many subtasks (arithmetic, natural_instructions) would otherwise crowd a small run."""
    taken: Counter[str] = Counter()
    kept = []
    for n in sorted(names):
        family = n.split(":")[0]
        if taken[family] < limit:
            taken[family] += 1
            kept.append(n)
    return kept


class ExperimentRun:
    """One run of a config in a directory; stages are methods, each cached on disk."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, pool_dir: Path, command: str = "") -> None:
        self.config = config
        self.dir = run_dir
        self.pool = TaskPool(pool_dir)
        split = load_split(pool_dir / "splits" / f"{config.split}.json")
        self.train_names = self._select(split["train"], config.max_train_tasks)
        self.test_names = self._select(split["test"], config.max_test_tasks)
        self._backbone: Backbone | None = None
        self._task_cache: dict[tuple[str, int], Task] = {}
        run_dir.mkdir(parents=True, exist_ok=True)
        check_resumable(run_dir, config)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if command:
            (run_dir / "command.txt").write_text(command + "\n")
        (run_dir / "tasks.json").write_text(json.dumps({
            "split": config.split, "pool": str(pool_dir),
            "train": {n: self.pool.kind(n).value for n in self.train_names},
            "test": {n: self.pool.kind(n).value for n in self.test_names}}, indent=1) + "\n")

    # ------------------------------------------------------------------------------------------ helpers
    def _select(self, names: list[str], cap: int | None) -> list[str]:
        names = [n for n in names if n in self.pool.entries]
        if self.config.max_per_family is not None:
            names = cap_per_family(names, self.config.max_per_family)
        if cap is None or cap >= len(names):
            return sorted(names)
        if self.config.prefer_short_inputs:
            names = self._by_kind_shortest_first(names)
        return sorted(names[:cap])

    def _by_kind_shortest_first(self, names: list[str]) -> list[str]:
        """The shortest tasks of each kind, taken in turn (classification, multiple choice, generation), so
        that a small CPU run still covers every kind."""
        def input_length(n: str) -> float:
            exs = self.pool.load(n)["examples"][:50]
            return mean(len(e["input"]) + len(e["output"]) for e in exs)
        by_kind = {k: sorted((n for n in names if self.pool.kind(n) is k), key=input_length) for k in TaskKind}
        return [n for group in itertools.zip_longest(*by_kind.values()) for n in group if n is not None]

    @property
    def seen_ist_names(self) -> list[str]:
        """The train tasks that IST re-learns in the two "seen" challenges: those with data for a second, disjoint
        draw (`no_second_draw` lists the others), all of them or `ist_seen_tasks` taken in turn from each kind
        (so a cap still covers classification, multiple choice and generation)."""
        return self._in_turn_by_kind([n for n in self.train_names if n not in self.no_second_draw],
                                     self.config.ist_seen_tasks)

    @property
    def stability_names(self) -> list[str]:
        """The unseen tasks of the stability study: all of them or `stability_tasks` taken in turn by kind."""
        return self._in_turn_by_kind(self.test_names, self.config.stability_tasks)

    def _in_turn_by_kind(self, names: list[str], cap: int | None) -> list[str]:
        """`names`, or (with a smaller `cap`) the first `cap` of them taken in turn from each kind, sorted."""
        if cap is None or cap >= len(names):
            return names
        by_kind = [[n for n in names if self.pool.kind(n) is k] for k in TaskKind]
        order = [n for group in itertools.zip_longest(*by_kind) for n in group if n is not None]
        return sorted(order[:cap])

    @functools.cached_property
    def no_second_draw(self) -> dict[str, str]:
        """{train task: why} for the tasks whose data leaves no train + dev for the "unseen data" draw."""
        out = {}
        for n in self.train_names:
            try:
                (task,) = self.tasks([n], self.config.unseen_data_seed)
            except InvalidTaskError as exc:
                out[n] = f"no data left for a draw disjoint from the main one ({exc})"
                continue
            if not task.dev:
                out[n] = "no dev examples left for a draw disjoint from the main one"
        return out

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = Backbone.load(self.config.backbone, dtype=self.config.dtype)
        return self._backbone

    def tasks(self, names: Sequence[str], data_seed: int) -> list[Task]:
        """The few-shot tasks of draw `data_seed`. Every draw shares the task's fixed test set; a draw other than
        the main one keeps its train and dev off the main draw's (by normalised text), so "seen tasks, unseen
        data" means data MSF never saw."""
        out = []
        cfg = self.config
        for n in names:
            key = (n, data_seed)
            if key not in self._task_cache:
                exclude: set[str] = set()
                if data_seed != cfg.data_seed:
                    (main,) = self.tasks([n], cfg.data_seed)
                    exclude = texts_of([*main.train, *main.dev])
                self._task_cache[key] = self.pool.few_shot(n, data_seed, cfg.k_per_class, cfg.k_other, cfg.max_test,
                                                           cfg.dev_k_per_class, cfg.dev_k_other, exclude=exclude)
            out.append(self._task_cache[key])
        return out

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        path = self.dir / "timings.json"
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[stage] = round(timings.get(stage, 0.0) + seconds, 3)  # ms: a tiny stage is not 0
        path.write_text(json.dumps(timings, indent=1) + "\n")
        return result

    def _chunked(self, stage_dir: Path, tasks: list[Task], fn: ChunkFn) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Run `fn` on chunks of `tasks_per_run` tasks; a chunk whose files exist (same tasks) is loaded."""
        stage_dir.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {}
        tensors: dict[str, Tensor] = {}
        size = self.config.tasks_per_run
        for i in range(0, len(tasks), size):
            chunk = tasks[i:i + size]
            meta, weights = stage_dir / f"chunk{i // size:03d}.json", stage_dir / f"chunk{i // size:03d}.safetensors"
            if meta.is_file() and weights.is_file():
                saved = json.loads(meta.read_text())
                if sorted(saved) == sorted(t.name for t in chunk):
                    results.update(saved)
                    tensors.update(load_named(weights))
                    continue
            log.info("%s: chunk %d (%d tasks)", stage_dir.relative_to(self.dir), i // size, len(chunk))
            res, ten = self._timed(str(stage_dir.relative_to(self.dir)).split("/")[0], lambda c=chunk: fn(c))
            save_named(weights, ten)
            meta.write_text(json.dumps(res, indent=1) + "\n")
            results.update(res)
            tensors.update(ten)
        return results, tensors

    def test_scores(self, tasks: list[Task], prompts: Tensor) -> list[float]:
        """Each task's test score with its prompt: prompts [len(tasks), n, d] (the run's evaluator and settings)."""
        return evaluate(self.backbone, tasks, prompts.to(self.backbone.device), "test",
                        max_new_tokens=self.config.max_new_tokens)

    # ------------------------------------------------------------------------------------------- stages
    def prompt_tuning(self, tag: str, names: Sequence[str], data_seed: int, train_seed: int,
                      initial: dict[str, Tensor] | None = None, stage: str = "pt"
                      ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """PT (or, with `initial` prompts, IPT-initialised PT) of `names`: best-dev prompts and test scores."""
        cfg = self.config

        def run(chunk: list[Task]) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
            init = stack_for([t.name for t in chunk], initial, "initial prompts") if initial else None
            if init is None and cfg.pt_start == "shared":  # every task (and chunk) from the same draw of the seed
                init = shared_start_prompts(self.backbone.input_embeddings, len(chunk), cfg.n_prompt, train_seed)
            result = prompt_tune(self.backbone, chunk, cfg.pt.train_config(train_seed, cfg.max_new_tokens),
                                 n_prompt=cfg.n_prompt, initial_prompts=init)
            test = self.test_scores(chunk, result.prompts)
            res = {t.name: {"dev": r.dev_score, "test": s, "steps": r.steps, "best_step": r.best_step,
                            "error": r.error} for t, r, s in zip(chunk, result.train.tasks, test, strict=True)}
            return res, {t.name: result.prompts[i] for i, t in enumerate(chunk)}

        return self._chunked(self.dir / stage / tag, self.tasks(names, data_seed), run)

    def baselines(self) -> dict[str, float]:
        path = self.dir / "baselines.json"
        if path.is_file():
            return json.loads(path.read_text())
        # the "unseen data" draw exists only for the seen-task IST (some tasks have no data left for it)
        draws = {self.config.data_seed: sorted(set(self.train_names) | set(self.test_names)),
                 self.config.unseen_data_seed: self.seen_ist_names}
        out = {f"{n}@{seed}": trivial_score(t) for seed, names in draws.items()
               for n, t in zip(names, self.tasks(names, seed), strict=True)}
        path.write_text(json.dumps(out, indent=1) + "\n")
        return out

    def subspace(self, d: int, train_prompts: dict[str, Tensor]) -> Path:
        """MSF for one d_I on the train tasks' PT prompts (main seed); returns the artifact directory."""
        cfg = self.config
        out = self.dir / "msf" / f"dI{d}"
        if (out / "subspace.json").is_file() and (out / "task_vectors.safetensors").is_file():
            if not (out / WEIGHTS_FILE).is_file():
                # a run directory restored from git (the weights are not committed): recomputing MSF would
                # give another Proj_b than the one the stages after it used
                raise FileNotFoundError(
                    f"{out / WEIGHTS_FILE} is missing but the stages after MSF may have used it; copy it back, or "
                    f"delete {out}, {self.dir / 'ist' / f'dI{d}'} and {self.dir / 'controls' / f'dI{d}-z0.json'} "
                    f"(and recon/dI{d}.json, ipt_pt/dI{d}-*) to recompute them from a new MSF")
            return out
        tasks = self.tasks(self.train_names, cfg.data_seed)
        prompts = stack_for(self.train_names, train_prompts, "PT prompts") if cfg.with_proj else None
        sub_cfg = SubspaceConfig(cfg.n_prompt, self.backbone.hidden_size, d, cfg.d_hidden, cfg.with_proj)

        def run() -> Any:
            return find_subspace(self.backbone, tasks, cfg.msf.train_config(cfg.data_seed, cfg.max_new_tokens),
                                 sub_cfg, task_prompts=prompts, alpha=cfg.alpha,
                                 recon_warmup_steps=cfg.msf_recon_warmup_steps)

        result = self._timed("msf", run)
        summary: dict[str, Any] = {"mean_dev_score": result.train.mean_dev_score, "steps": result.train.steps}
        # what the joint LM steps add: MSF's own first dev evaluation (step 0) scores the prompts before any
        # joint step, i.e. the reconstruction warm-up alone (or Proj_b's initialisation without a warm-up)
        start = {t.name: r.history[0]["dev"] for t, r in zip(tasks, result.train.tasks, strict=True)
                 if r.history and r.history[0]["step"] == 0}
        if len(start) == len(tasks):
            summary["warmup_mean_dev_score"] = mean(start.values())
            summary["warmup_dev"] = start
            summary["dev"] = {t.name: r.dev_score for t, r in zip(tasks, result.train.tasks, strict=True)}
        # and after them: the last dev evaluation (the kept weights are the best, which may be the warm-up's)
        last = {t.name: r.history[-1]["dev"] for t, r in zip(tasks, result.train.tasks, strict=True)
                if r.history and r.history[-1]["step"] > 0}
        if len(last) == len(tasks):
            summary["joint_mean_dev_score"] = mean(last.values())
            summary["joint_dev"] = last
        if prompts is not None:
            summary["reconstruction_mse"] = reconstruction_error(result.subspace, prompts)
        save_artifact(out, result.subspace, self.backbone.backbone_id, self.backbone.input_embeddings,
                      dtype=getattr(torch, cfg.msf_weights_dtype), eval_summary=summary,
                      provenance={"experiment": cfg.name, "tasks": self.train_names, "alpha": cfg.alpha,
                                  "msf": cfg.msf.__dict__})
        save_named(out / "task_vectors.safetensors",
                   {n: result.task_vectors[i] for i, n in enumerate(self.train_names)})
        return out

    def reconstruction(self, d: int, artifact: Path, train_prompts: dict[str, Tensor]) -> dict[str, float]:
        """Test scores of the train tasks with their reconstructed prompts Proj_b(Proj(P_i))."""
        path = self.dir / "recon" / f"dI{d}.json"
        if path.is_file():
            return json.loads(path.read_text())
        sub = load_artifact(artifact).subspace
        if sub.proj is None:
            return {}
        tasks = self.tasks(self.train_names, self.config.data_seed)
        with torch.no_grad():
            recon = sub.reconstruct(stack_for(self.train_names, train_prompts, "PT prompts"))
        scores = self._timed("recon", lambda: self.test_scores(tasks, recon))
        out = dict(zip(self.train_names, scores, strict=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        return out

    def _challenge_tasks(self, challenge: str) -> tuple[list[str], int]:
        cfg = self.config
        return {
            "seen_same_data": (self.seen_ist_names, cfg.data_seed),
            "seen_unseen_data": (self.seen_ist_names, cfg.unseen_data_seed),
            "unseen_tasks": (self.test_names, cfg.data_seed),
        }[challenge]

    def ist(self, d: int, artifact: Path, challenge: str, random_subspace: bool = False
            ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """IST of one challenge's tasks in the MSF subspace at d_I = d, or (`random_subspace`) in the control:
        a Proj_b of the same shapes at its seeded random initialisation, which MSF never trained.

        With Gauss-Newton (config `ist.optimizer`), IST in the MSF subspace chooses its start among z = 0, the mean
        and the train tasks' vectors (their medoids in prompt space when there are many: `ipt_engine.ist_starts`), as
        the service does. The control chooses the same way among the same vectors decoded by its own untrained
        Proj_b, so that the two differ only in the decoder MSF trained, not in how many starts they try. (In the
        "seen" challenges the task's own MSF vector is among the starts only when it is one of the medoids.)"""
        cfg = self.config
        names, seed = self._challenge_tasks(challenge)
        proj_b = load_artifact(artifact).subspace.proj_b
        if random_subspace:
            proj_b = random_proj_b(proj_b.config, RANDOM_SUBSPACE_SEED + d)

        starts = None
        if (artifact / VECTORS_FILE).is_file():
            starts = start_candidates(proj_b.config.d_intrinsic,
                                      stack_for(self.train_names, load_named(artifact / VECTORS_FILE), "task vectors"),
                                      proj_b=proj_b)

        def run(chunk: list[Task]) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
            if cfg.ist.optimizer == "adamw":
                results = intrinsic_subspace_tune(self.backbone, chunk, proj_b,
                                                  cfg.ist.train_config(cfg.data_seed, cfg.max_new_tokens))
            else:
                results = tune(self.backbone, chunk, proj_b, cfg.ist.ist_settings(cfg.data_seed, cfg.max_new_tokens),
                               start_candidates=starts)
            z = torch.stack([r.z for r in results])
            with torch.no_grad():
                test = self.test_scores(chunk, proj_b(z))
            res = {r.task: {"dev": r.dev_score, "test": s, "steps": r.steps, "best_step": r.best_step,
                            "seconds": round(r.wall_seconds, 2), "error": r.error, "history": r.history}
                   for r, s in zip(results, test, strict=True)}
            return res, {r.task: r.z for r in results}

        stage = f"{challenge}-random" if random_subspace else challenge
        return self._chunked(self.dir / "ist" / f"dI{d}" / stage, self.tasks(names, seed), run)

    def zero_vector_scores(self, d: int, artifact: Path) -> dict[str, float]:
        """Test scores of every task with Proj_b(0) of the MSF subspace: where IST from z = 0 starts."""
        path = self.dir / "controls" / f"dI{d}-z0.json"
        if path.is_file():
            return json.loads(path.read_text())
        proj_b = load_artifact(artifact).subspace.proj_b
        names = sorted(set(self.train_names) | set(self.test_names))
        tasks = self.tasks(names, self.config.data_seed)
        with torch.no_grad():
            prompts = proj_b(torch.zeros(len(tasks), d))
        out = dict(zip(names, self._timed("controls", lambda: self.test_scores(tasks, prompts)), strict=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        return out

    def no_prompt_scores(self) -> dict[str, float]:
        """Test scores of every task with the bare PLM (no soft prompt)."""
        path = self.dir / "controls" / "no-prompt.json"
        if path.is_file():
            return json.loads(path.read_text())
        names = sorted(set(self.train_names) | set(self.test_names))
        tasks = self.tasks(names, self.config.data_seed)
        scores = self._timed("controls", lambda: evaluate(self.backbone, tasks, None, "test",
                                                          max_new_tokens=self.config.max_new_tokens))
        out = dict(zip(names, scores, strict=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        return out


# Settings a resumed run may change: they add work (more d_I, seeds or tasks) without changing what is on disk.
RESUMABLE_CHANGES = frozenset({"name", "pool", "d_intrinsic", "stability_seeds", "stability_tasks", "ist_seen_tasks"})


def config_changes(previous: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The settings whose values differ between a run directory's config and `current` (nested keys dotted);
    a key the previous config lacks (added to the code since) is not a change."""
    changed = []
    for key, value in current.items():
        if key not in previous or (not prefix and key in RESUMABLE_CHANGES):
            continue
        if isinstance(value, dict) and isinstance(previous[key], dict):
            changed += config_changes(previous[key], value, f"{prefix}{key}.")
        elif previous[key] != value:
            changed.append(f"{prefix}{key}")
    return changed


def check_resumable(run_dir: Path, config: ExperimentConfig) -> None:
    """Refuse to resume a run directory made with other settings: its chunks are reused by task name, so a
    changed setting would silently mix results of two configurations."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    changed = config_changes(yaml.safe_load(path.read_text()) or {}, config.to_dict())
    if changed:
        raise ValueError(f"{run_dir} holds a run made with other settings ({', '.join(changed)} differ); resume it "
                         f"with the same config, or start a new run directory")


def random_proj_b(config: SubspaceConfig, seed: int) -> ProjB:
    """A Proj_b of `config`'s shapes at PyTorch's default initialisation under `seed` (the global RNG is left
    as it was): the control that says how much of IST's result MSF's training contributes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProjB(config)


UNTIL = ("unseen", "all")  # how far `run_experiment` goes: the unseen tasks (the headline) or every stage


def run_experiment(config: ExperimentConfig, run_dir: Path, pool_dir: Path, command: str = "",
                   until: str = "all") -> dict[str, Any]:
    """Run (or resume) every stage, then write summary.json; returns the summary.

    until="unseen" stops after the unseen tasks (PT, MSF, controls, IST in both subspaces at every d_I) and
    writes a summary marked `"partial": "unseen"` without the seen challenges and the stability study, so that
    a long run can be reported and its subspace exported before the rest is done; a later call resumes."""
    if until not in UNTIL:
        raise ValueError(f"until must be one of {UNTIL}, got {until!r}")
    cfg = config
    run = ExperimentRun(cfg, run_dir, pool_dir, command)
    log.info("experiment %s: %d train tasks, %d held-out tasks -> %s", cfg.name, len(run.train_names),
             len(run.test_names), run_dir)
    baselines = run.baselines()
    all_names = sorted(set(run.train_names) | set(run.test_names))
    pt_main, prompts_main = run.prompt_tuning("main", all_names, cfg.data_seed, cfg.stability_seeds[0])
    # Stages in order of what the study most needs, so that an interrupted run has its headline first:
    # every subspace, then the unseen tasks at every d_I (MSF subspace and control), then the seen challenges.
    artifacts = {d: run.subspace(d, prompts_main) for d in cfg.d_intrinsic}
    per_d: dict[str, Any] = {}
    ist_vectors: dict[int, dict[str, Tensor]] = {}
    for d, artifact in artifacts.items():
        entry: dict[str, Any] = {"msf": json.loads((artifact / "subspace.json").read_text())["eval_summary"],
                                 "z0": run.zero_vector_scores(d, artifact), "random": {}}
        entry["unseen_tasks"], ist_vectors[d] = run.ist(d, artifact, "unseen_tasks")
        entry["random"]["unseen_tasks"], _ = run.ist(d, artifact, "unseen_tasks", random_subspace=True)
        per_d[str(d)] = entry
    is_learnable = learnable(pt_main, baselines, all_names, cfg.data_seed)
    d_choice = choose_d(per_d, pt_main, is_learnable, run.test_names)
    best_d = d_choice["d"]
    pt_unseen_data: dict[str, Any] = {}
    stability: dict[str, Any] | None = None
    if until == "all":
        pt_unseen_data, _ = run.prompt_tuning("unseen-data", run.seen_ist_names, cfg.unseen_data_seed,
                                              cfg.stability_seeds[0])
        for d, artifact in artifacts.items():
            entry = per_d[str(d)]
            entry["recon"] = run.reconstruction(d, artifact, prompts_main)
            for challenge in CHALLENGES[:2]:
                entry[challenge], _ = run.ist(d, artifact, challenge)
                entry["random"][challenge], _ = run.ist(d, artifact, challenge, random_subspace=True)
        stability = _stability(run, cfg, best_d, ist_vectors[best_d], pt_main, is_learnable)
    learnable_unseen_data = learnable(pt_unseen_data, baselines, run.seen_ist_names, cfg.unseen_data_seed) \
        if pt_unseen_data else {}
    summary = {
        "config": cfg.to_dict(), "train_tasks": run.train_names, "test_tasks": run.test_names,
        "seen_ist_tasks": run.seen_ist_names, "no_second_draw": run.no_second_draw,
        "kinds": {n: run.pool.kind(n).value for n in all_names},
        "baselines": baselines, "pt": {"main": pt_main, "unseen-data": pt_unseen_data},
        "learnable": is_learnable, "learnable_unseen_data": learnable_unseen_data,
        "no_prompt": run.no_prompt_scores(),
        "per_d": per_d, "best_d": best_d, "d_choice": d_choice, "stability": stability,
        "timings": json.loads((run_dir / "timings.json").read_text()) if (run_dir / "timings.json").is_file() else {},
    }
    if until != "all":
        summary["partial"] = until
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _stability(run: ExperimentRun, cfg: ExperimentConfig, d: int, z: dict[str, Tensor],
               pt_main: dict[str, Any], is_learnable: dict[str, bool]) -> dict[str, Any]:
    """PT vs IPT-initialised PT (from Proj_b(z) of IST at d_I = d, chosen on dev) over training seeds, on the
    unseen tasks. Std in points (x100) with ddof 1 over seeds; `kept_start` counts the seeds whose best dev
    was the starting prompt (step 0), which gives a std of 0 by construction rather than by stability.

    The first seed's PT is the main PT run (same data, same seed; a task trains the same alone or batched)."""
    proj_b = load_artifact(run.dir / "msf" / f"dI{d}").subspace.proj_b
    with torch.no_grad():
        initial = {n: proj_b(z[n][None])[0] for n in run.stability_names}
    pt_runs, ipt_runs = {}, {}
    for seed in cfg.stability_seeds:
        if seed == cfg.stability_seeds[0]:
            pt_runs[str(seed)] = {n: pt_main[n] for n in run.stability_names}
        else:
            pt_runs[str(seed)], _ = run.prompt_tuning(f"stability-seed{seed}", run.stability_names, cfg.data_seed,
                                                      seed)
        ipt_runs[str(seed)], _ = run.prompt_tuning(f"dI{d}-seed{seed}", run.stability_names, cfg.data_seed, seed,
                                                   initial=initial, stage="ipt_pt")
    per_task = {}
    for n in run.stability_names:
        pt_scores = [pt_runs[s][n]["test"] for s in pt_runs]
        ipt_scores = [ipt_runs[s][n]["test"] for s in ipt_runs]
        per_task[n] = {"pt": pt_scores, "ipt_pt": ipt_scores, "pt_std": seed_std(pt_scores),
                       "ipt_pt_std": seed_std(ipt_scores), "learnable": is_learnable[n],
                       "pt_kept_start": sum(pt_runs[s][n]["best_step"] == 0 for s in pt_runs),
                       "ipt_pt_kept_start": sum(ipt_runs[s][n]["best_step"] == 0 for s in ipt_runs)}
    return {"d_intrinsic": d, "seeds": cfg.stability_seeds, "std_ddof": 1, "per_task": per_task}


def seed_std(scores: Sequence[float]) -> float | None:
    """The sample std (ddof 1) of per-seed scores in points (x100); None with fewer than two seeds."""
    return stdev(scores) * 100 if len(scores) >= 2 else None
