"""Experiment configuration: one YAML file names the pool split, the task counts, d_I values and the
optimisation settings of every stage (see ipt_engine/configs/smoke.yaml and ipt_engine/configs/paper-small.yaml)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ipt_engine.ist_optimizers import ISTSettings
from ipt_engine.training import TrainConfig

PT_STARTS = ("per_task", "shared")
CONFIG_DIR = Path(str(resources.files("ipt_engine") / "configs"))
"""The shipped configs, package data of ipt_engine (found the same in a checkout and in an installed package)."""


@dataclass
class StageSettings:
    """Optimisation settings of one stage (a subset of TrainConfig)."""

    learning_rate: float
    max_steps: int
    batch_size: int = 8
    eval_every: int = 20
    patience: int = 3  # evaluations without a dev improvement before a task stops
    tasks_per_step: int | None = None
    patience_steps: int | None = None  # steps without a dev improvement before a task stops (replaces patience)
    dev_loss: bool = False  # break ties of the dev score by dev loss, and keep the dev loss in the history
    optimizer: str = "adamw"  # IST only: "adamw" (the loop above) or "gauss_newton" / "lbfgs" (full batch,
    # ipt_engine.ist_optimizers; they use max_iterations and patience_iterations, not the AdamW fields)
    max_iterations: int = ISTSettings.max_iterations  # full-batch IST: forward-backward passes over a task's train set
    patience_iterations: int = ISTSettings.patience  # full-batch IST: iterations without a lower dev loss, then stop
    train_precision: str = ISTSettings.train_precision  # full-batch IST: the train passes' autocast ("auto",
    # "float32", "bfloat16"); a study should name one, so that chunks resumed on other hardware match

    def ist_settings(self, seed: int, max_new_tokens: int) -> ISTSettings:
        """The settings of `ipt_engine.ist_optimizers.tune` for a full-batch optimiser (AdamW runs use
        `train_config`, which keeps the study's step-based patience)."""
        return ISTSettings(optimizer=self.optimizer, max_iterations=self.max_iterations,
                           patience=self.patience_iterations, seed=seed, max_new_tokens=max_new_tokens,
                           train_precision=self.train_precision)

    def train_config(self, seed: int, max_new_tokens: int) -> TrainConfig:
        return TrainConfig(learning_rate=self.learning_rate, max_steps=self.max_steps, batch_size=self.batch_size,
                           eval_every=self.eval_every, patience=self.patience, tasks_per_step=self.tasks_per_step,
                           patience_steps=self.patience_steps, dev_loss=self.dev_loss, seed=seed,
                           max_new_tokens=max_new_tokens)


@dataclass
class ExperimentConfig:
    name: str
    split: str = "random"  # a split file of the pool (ipt data prepare writes them)
    pool: str | None = None  # pool directory (default: the user cache's pool)
    backbone: str = "smollm2"
    dtype: str = "float32"
    max_train_tasks: int | None = None  # cap on the split's train tasks (None: all)
    max_test_tasks: int | None = None  # cap on the split's held-out tasks
    max_per_family: int | None = None  # at most this many subtasks of one BIG-bench task (family:subtask)
    prefer_short_inputs: bool = False  # with caps: take the tasks with the shortest inputs (CPU runs)
    data_seed: int = 0  # few-shot train/dev of the main runs
    unseen_data_seed: int = 1  # train/dev of the "seen tasks, unseen data" challenge (same test sets)
    stability_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds, PT vs IPT-init PT
    k_per_class: int = 16
    k_other: int = 32
    dev_k_per_class: int | None = None  # a smaller dev set than K for model selection (None: K, as in the paper)
    dev_k_other: int | None = None
    max_test: int = 200  # test examples per task
    max_new_tokens: int = 32  # greedy decoding length for generation tasks
    n_prompt: int = 100
    d_intrinsic: list[int] = field(default_factory=lambda: [5, 10, 50, 100, 250])
    d_hidden: int = 768
    alpha: float = 200.0
    with_proj: bool = True
    msf_recon_warmup_steps: int = 0  # MSF with Proj: steps fitting Proj/Proj_b to the prompts alone first
    # the dtype MSF's weights are stored in; every later stage loads them from disk, so with "float16" the study
    # measures exactly the fp16 weights (17.7 MB at n = 20, small enough to commit and to resume from git)
    msf_weights_dtype: str = "float32"
    ist_seen_tasks: int | None = None  # cap on the train tasks re-learnt by IST in the two "seen" challenges
    stability_tasks: int | None = None  # cap on the unseen tasks of the stability study (taken in turn by kind)
    tasks_per_run: int = 8  # tasks trained together in one batched run (also the resume granularity)
    # where PT starts: "per_task", each task from its own draw of vocabulary tokens (seeded by task name), or
    # "shared", every task from one draw, so that the PT prompts MSF auto-encodes differ only by what PT moved
    pt_start: str = "per_task"
    pt: StageSettings = field(default_factory=lambda: StageSettings(0.3, 1000))
    msf: StageSettings = field(default_factory=lambda: StageSettings(1e-3, 1000, tasks_per_step=8))
    ist: StageSettings = field(default_factory=lambda: StageSettings(ISTSettings.learning_rate, 300,
                                                                     eval_every=ISTSettings.eval_every))

    def __post_init__(self) -> None:
        for name in ("pt", "msf", "ist"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, StageSettings(**value))
        if not self.d_intrinsic:
            raise ValueError("d_intrinsic needs at least one value")
        if self.msf_weights_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"msf_weights_dtype must be float32, float16 or bfloat16, got {self.msf_weights_dtype!r}")
        if self.pt_start not in PT_STARTS:
            raise ValueError(f"pt_start must be one of {PT_STARTS}, got {self.pt_start!r}")
        if self.data_seed == self.unseen_data_seed:
            raise ValueError("unseen_data_seed must differ from data_seed")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(name_or_path: str) -> ExperimentConfig:
    """A config by path, or by name from the shipped configs (CONFIG_DIR: 'smoke', 'paper-small', ...)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no experiment config {name_or_path!r}; give a YAML path or one of {known}")
    data = yaml.safe_load(path.read_text()) or {}
    allowed = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; allowed: {sorted(allowed)}")
    return ExperimentConfig(**data)
