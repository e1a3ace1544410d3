"""One entry point for IST with any of its optimisers, as the service and the experiments choose them.

- "gauss_newton" (the default): damped Gauss-Newton steps on the full train set (`ipt_engine.ist_gauss_newton`).
- "lbfgs": full-batch L-BFGS with a strong-Wolfe line search (`ipt_engine.ist_lbfgs`).
- "adamw": the paper's optimiser, mini-batches in one multi-task loop (`ipt_engine.ist`), kept for comparison.

The full-batch optimisers select the z with the lowest dev loss and count `max_iterations`/`patience` in
iterations; AdamW selects on the dev score (ties to the lower dev loss), counts `max_steps` in steps and
`patience` in dev evaluations. Every result carries its per-evaluation history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from torch import Tensor

from ipt_engine.backbone import Backbone
from ipt_engine.device import check_train_precision
from ipt_engine.ist import DEFAULT_IST_LEARNING_RATE, ISTResult, intrinsic_subspace_tune
from ipt_engine.ist_gauss_newton import GaussNewtonConfig, gauss_newton_subspace_tune
from ipt_engine.ist_lbfgs import LBFGSConfig, lbfgs_subspace_tune
from ipt_engine.ist_starts import start_candidates
from ipt_engine.subspace import ProjB
from ipt_engine.tasks import Task
from ipt_engine.training import EvalHook, TrainConfig

__all__ = ["ISTOptimizer", "ISTSettings", "start_candidates", "tune"]


class ISTOptimizer(StrEnum):
    GAUSS_NEWTON = "gauss_newton"
    LBFGS = "lbfgs"
    ADAMW = "adamw"


@dataclass(frozen=True)
class ISTSettings:
    """What a caller chooses about an IST run, and the one source of IST defaults: the service's `training`
    object (service/schemas.py), the IST job a worker runs (service/ist_jobs.py), `ipt ist` and the experiment
    configs' IST stage take their defaults from here. The iteration counts are the default optimiser's own."""

    optimizer: ISTOptimizer = ISTOptimizer.GAUSS_NEWTON
    max_iterations: int = GaussNewtonConfig.max_iterations  # full batch: forward-backward passes over the train set
    patience: int = GaussNewtonConfig.patience  # iterations (full batch) or dev evaluations (AdamW) without a
    # dev improvement
    learning_rate: float = DEFAULT_IST_LEARNING_RATE  # AdamW only
    max_steps: int = 200  # AdamW only
    batch_size: int = 8  # AdamW only: rows per step
    eval_every: int = 10  # AdamW only: steps between dev evaluations
    seed: int = 0  # AdamW only: row sampling
    max_new_tokens: int = 32
    train_precision: str = "auto"  # the train passes' autocast (bfloat16 where the hardware
    # computes it natively; ipt_engine.device.train_autocast_dtype); dev is scored in the model's dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", ISTOptimizer(self.optimizer))
        check_train_precision(self.train_precision)
        for name in ("max_iterations", "patience", "max_steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def total_steps(self) -> int:
        """The most steps (AdamW) or iterations (full batch) a run can take: the progress bar's end."""
        return self.max_steps if self.optimizer is ISTOptimizer.ADAMW else self.max_iterations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "optimizer": self.optimizer.value}

    def adamw_config(self, **overrides: Any) -> TrainConfig:
        """The training loop's settings for AdamW IST (ties of the dev score broken by dev loss, unless
        `overrides` say otherwise: any other TrainConfig field, e.g. progress=True)."""
        fields = {"learning_rate": self.learning_rate, "max_steps": self.max_steps, "batch_size": self.batch_size,
                  "eval_every": self.eval_every, "patience": self.patience, "dev_loss": True,
                  "max_new_tokens": self.max_new_tokens, "seed": self.seed, "train_precision": self.train_precision}
        return TrainConfig(**{**fields, **overrides})


def tune(backbone: Backbone, tasks: Sequence[Task], proj_b: ProjB, settings: ISTSettings, *,
         start_candidates: Tensor | None = None, on_evaluate: EvalHook | None = None) -> list[ISTResult]:
    """IST of every task with the chosen optimiser: one ISTResult per task, in order.

    start_candidates: [k, d_I] starts (e.g. z = 0 and the subspace's known task vectors); Gauss-Newton picks
    the one with the lowest train loss per task; the other optimisers start from z = 0."""
    if settings.optimizer is ISTOptimizer.GAUSS_NEWTON:
        config = GaussNewtonConfig(max_iterations=settings.max_iterations, patience=settings.patience,
                                   max_new_tokens=settings.max_new_tokens, train_precision=settings.train_precision)
        return gauss_newton_subspace_tune(backbone, tasks, proj_b, config, start_candidates=start_candidates,
                                          on_evaluate=on_evaluate)
    if settings.optimizer is ISTOptimizer.LBFGS:
        config_l = LBFGSConfig(max_iterations=settings.max_iterations, patience=settings.patience,
                               max_new_tokens=settings.max_new_tokens, train_precision=settings.train_precision)
        return lbfgs_subspace_tune(backbone, tasks, proj_b, config_l, on_evaluate=on_evaluate)
    return intrinsic_subspace_tune(backbone, tasks, proj_b, settings.adamw_config(), on_evaluate=on_evaluate)
