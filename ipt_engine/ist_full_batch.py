"""What the full-batch IST optimisers share: a task's train loss as a function of z, and dev selection.

A task's train set is tiny (32 to 64 rows), so the full-batch optimisers (`ipt_engine.ist_gauss_newton`,
`ipt_engine.ist_lbfgs`) use every row at every step: the loss is a deterministic function of z. Each task
runs alone, so batching tasks cannot change what a task gets.

`DevSelection` evaluates dev after each iteration, keeps the z with the lowest dev loss (a smooth quantity; dev
accuracy on 8 to 24 examples ties too often to select on), records the per-iteration history (train loss,
dev loss, dev score, |z|, wall time) and stops a task after `patience` iterations without a lower dev loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from ipt_engine.backbone import Backbone
from ipt_engine.device import autocast_to
from ipt_engine.evaluation import predict_with_prompts, score_predictions
from ipt_engine.ist import ISTResult
from ipt_engine.prompt_kv import PromptKV
from ipt_engine.subspace import ProjB
from ipt_engine.tasks import Task
from ipt_engine.training import STOPPED_BY_REQUEST, EvalHook, HistoryEntry, mean_dev_losses

MAX_TOKENS_PER_PASS = 2048
"""Tokens of one forward-backward micro-batch: about the category task's 48 rows (1,760 tokens, one pass). The
activations a backward keeps grow with it, ~3 MB per token with SmolLM2: a study task's 32 rows of 11,740 tokens in
one pass grew the process to 20 GB; in passes of this size its peak was 7.1 GB."""


class TrainObjective:
    """One task's mean per-row train loss L(z) = mean_i loss_i(z) over all its train rows, with the prompt
    Proj_b(z). Two losses (`option_loss`):

    - tasks with answer options (classification, multiple choice), by default: the cross-entropy of the
      right option among the row's options, each scored as the service ranks them (mean log-likelihood per
      token). It is what accuracy measures: the token loss of a label word is mostly about how likely label
      words are at all (5 to 12 nats per token on everyday tasks with SmolLM2), which moves no decision.
    - otherwise (generation, or `option_loss=False`): the mean negative log-likelihood per target token.

    `autocast`: a dtype the backbone's passes run in under torch.autocast (e.g. bfloat16 on a CPU that computes
    it natively: half the time of a float32 forward-backward), or None for the model's own dtype. Proj_b(z) and
    the losses stay float32; dev (`DevSelection`) is always scored in the model's dtype, as the service serves."""

    def __init__(self, backbone: Backbone, task: Task, proj_b: ProjB, max_rows_per_forward: int = 64,
                 option_loss: bool = True, autocast: torch.dtype | None = None,
                 max_tokens_per_pass: int = MAX_TOKENS_PER_PASS) -> None:
        self.backbone, self.proj_b, self.chunk, self.autocast = backbone, proj_b, max_rows_per_forward, autocast
        self.max_tokens = max_tokens_per_pass
        self._lengths: list[int] | None = None
        self.pairs = [task.text_pair(e) for e in task.train]
        self.options: list[list[str]] | None = None
        self.gold: list[int] = []
        if option_loss and task.kind.has_options:
            options = [[o.strip() for o in task.options_for(e) or ()] for e in task.train]
            if all(e.output.strip() in opts and len(opts) >= 2 for e, opts in zip(task.train, options, strict=True)):
                self.options = [[" " + o for o in opts] for opts in options]
                self.gold = [opts.index(e.output.strip()) for e, opts in zip(task.train, options, strict=True)]

    @property
    def num_rows(self) -> int:
        return len(self.pairs)

    @property
    def loss_name(self) -> str:
        return "option cross-entropy" if self.options is not None else "token NLL"

    def _row_losses(self, z_rows: Tensor, start: int | Sequence[int]) -> Tensor:
        """Per-row losses [k], row j with the prompt Proj_b(z_rows[j]) (z_rows [k, d_I]), of rows start..start+k
        or of the row indices `start` (a sequence of k indices)."""
        rows = range(start, start + z_rows.shape[0]) if isinstance(start, int) else list(start)
        chunk = [self.pairs[i] for i in rows]
        prompts, sources = self.proj_b(z_rows), [p.source for p in chunk]
        with self._precision():
            if self.options is None:
                ll, count = self.backbone.target_log_likelihood(prompts, sources, [p.target for p in chunk])
                return -(ll.float() / count.clamp(min=1))
            return self._option_losses(prompts, rows)

    def _precision(self) -> AbstractContextManager[object]:
        """The backbone's passes under autocast to `self.autocast`, or as they are."""
        return autocast_to(self.backbone.device, self.autocast)

    def _option_scores(self, prompts: Tensor | None, rows: Sequence[int], prompt_kv: PromptKV | None = None
                       ) -> list[Tensor]:
        """Each row's option scores (mean log-likelihood per token, as predictions rank them): len(rows) tensors
        [K_i], with prompts [len(rows), n, d] or their keys and values (`prompt_kv`, len(rows) rows)."""
        assert self.options is not None
        sources, options = [self.pairs[i].source for i in rows], [self.options[i] for i in rows]
        sums, counts = self.backbone.option_log_likelihoods(prompts, sources, options, prompt_kv=prompt_kv)
        return [s.float() for s in (sums / counts.clamp(min=1)).split([len(o) for o in options])]

    def _option_losses(self, prompts: Tensor | None, rows: Sequence[int], prompt_kv: PromptKV | None = None) -> Tensor:
        """The right option's cross-entropy [len(rows)] of the given rows (see `_option_scores`)."""
        scores = self._option_scores(prompts, rows, prompt_kv)
        gold = [self.gold[i] for i in rows]
        return torch.stack([-s.log_softmax(0)[g] for s, g in zip(scores, gold, strict=True)])

    @property
    def max_options(self) -> int:
        """The most answer options of a train row (0 without the option loss)."""
        return max((len(o) for o in self.options), default=0) if self.options is not None else 0

    def micro_batches(self, rows: Sequence[int]) -> list[list[int]]:
        """`rows` in consecutive micro-batches of at most `max_rows_per_forward` rows and, unless one row alone
        is longer, `max_tokens_per_pass` tokens (prompt, input and longest answer): a forward-backward holds
        every activation of its micro-batch, so long rows (generation tasks with long inputs) must not share
        one pass by row count alone."""
        if self._lengths is None:
            tok, n = self.backbone.tokenizer, self.proj_b.config.n_prompt
            answers = self.options or [[p.target] for p in self.pairs]
            self._lengths = [n + len(tok(p.source).input_ids) + max(len(tok(a).input_ids) for a in answer)
                             for p, answer in zip(self.pairs, answers, strict=True)]
        batches: list[list[int]] = []
        tokens = 0
        for i in rows:
            if batches and len(batches[-1]) < self.chunk and tokens + self._lengths[i] <= self.max_tokens:
                batches[-1].append(i)
                tokens += self._lengths[i]
            else:
                batches.append([i])
                tokens = self._lengths[i]
        return batches

    def spread_rows(self, count: int) -> list[int]:
        """`count` row indices spread evenly over the train set (all rows when it has no more): a cheap sample
        that still covers every part of a train set given in order (e.g. grouped by label)."""
        n = self.num_rows
        if count >= n:
            return list(range(n))
        return sorted({i * n // count for i in range(count)})

    @torch.no_grad()
    def losses_at(self, z: Tensor, rows: Sequence[int]) -> Tensor:
        """Losses [len(rows)] at z [d_I] of the given train rows (no gradient). With answer options on a causal
        LM, the prompt Proj_b(z) runs through the model once and every row reuses its keys and values."""
        z = z.detach().to(self.backbone.device)
        chunks = self.micro_batches(rows)
        if self.options is not None and not self.backbone.is_encoder_decoder:
            prompt = self.proj_b(z[None])
            with self._precision():
                kv = self.backbone.prompt_kv(prompt)
                return torch.cat([self._option_losses(None, c, kv.select([0] * len(c))).float().cpu()
                                  for c in chunks])
        return torch.cat([self._row_losses(z.expand(len(c), -1), c).float().cpu() for c in chunks])

    @torch.no_grad()
    def row_losses(self, z: Tensor, max_rows: int | None = None) -> Tensor:
        """Per-row losses [N] at z [d_I] (no gradient), over the first `max_rows` rows when given."""
        n = self.num_rows if max_rows is None else min(max_rows, self.num_rows)
        z = z.detach().to(self.backbone.device)
        return torch.cat([self._row_losses(z.expand(len(c), -1), c).float().cpu()
                          for c in self.micro_batches(range(n))])

    def row_losses_and_grads(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row losses [N] and per-row gradients d loss_i / dz [N, d_I] at z [d_I], from one forward and one
        backward pass: each row gets its own copy of z, so the gradient of the summed loss with respect to the
        copies holds every row's gradient."""
        losses, grads = [], []
        for rows in self.micro_batches(range(self.num_rows)):
            copies = z.detach().to(self.backbone.device).expand(len(rows), -1).clone().requires_grad_(True)
            row_loss = self._row_losses(copies, rows)
            (grad,) = torch.autograd.grad(row_loss.sum(), copies)
            losses.append(row_loss.detach().float().cpu())
            grads.append(grad.detach().float().cpu())
        return torch.cat(losses), torch.cat(grads)

    def row_losses_grads_and_ggn(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row losses [N], per-row gradients [N, d_I] and the exact Gauss-Newton matrix of the mean option
        loss [d_I, d_I] at z, for tasks with answer options (`max_options` K): one forward and K - 1 backward
        passes.

        Row i's loss is the cross-entropy of softmax(s_i) with s_i its K_i option scores, so its Gauss-Newton
        matrix is J_i^T (diag(p_i) - p_i p_i^T) J_i with J_i = d s_i / dz [K_i, d_I]. That Hessian of the
        softmax sees only score differences, so J_i is needed only along an orthonormal basis V of the
        vectors summing to zero (K_i - 1 of them, `contrasts`): backward pass j gives every row's v_j^T J_i at
        once (each row has its own copy of z). The gradient J_i^T (p_i - e_gold) lies in the same span, so it
        comes from the same passes. Unlike the empirical Fisher (G^T G / N, from the gradients alone), this
        curvature does not vanish on rows that already fit nor overstate it on rows far from a fit."""
        if self.options is None:
            raise ValueError("the Gauss-Newton matrix is for tasks with answer options; use row_losses_and_grads")
        d = z.numel()
        losses, grads, ggn = [], [], torch.zeros(d, d, dtype=torch.float64)
        for rows in self.micro_batches(range(self.num_rows)):
            copies = z.detach().to(self.backbone.device).expand(len(rows), -1).clone().requires_grad_(True)
            prompts = self.proj_b(copies)
            with self._precision():
                scores = self._option_scores(prompts, rows)
            probs = [sc.detach().double().softmax(0).cpu() for sc in scores]
            gold = [self.gold[i] for i in rows]
            losses.append(torch.stack([-sc.detach().log_softmax(0)[g] for sc, g in zip(scores, gold, strict=True)])
                          .float().cpu())
            bases = [contrasts(len(sc)) for sc in scores]  # [K_i, K_i - 1] each
            passes = max(b.shape[1] for b in bases)
            projected = torch.zeros(len(rows), passes, d, dtype=torch.float64)  # row i, pass j: v_j^T J_i
            for j in range(passes):
                objective = sum((sc * b[:, j].to(sc)).sum() for sc, b in zip(scores, bases, strict=True)
                                if j < b.shape[1])
                (grad,) = torch.autograd.grad(objective, copies, retain_graph=j < passes - 1)
                projected[:, j] = grad.detach().double().cpu()
            for i, (p, b, g) in enumerate(zip(probs, bases, gold, strict=True)):
                r = projected[i, :b.shape[1]]  # [K_i - 1, d]: V^T J_i
                residual = p.clone()
                residual[g] -= 1
                grads.append((b.T @ residual) @ r)  # J_i^T (p - e_gold), as (p - e_gold) = V V^T (p - e_gold)
                hessian = b.T @ (torch.diag(p) - torch.outer(p, p)) @ b  # [K_i - 1, K_i - 1]
                ggn += r.T @ hessian @ r
        return torch.cat(losses), torch.stack(grads).float(), ggn / self.num_rows


def contrasts(k: int) -> Tensor:
    """An orthonormal basis of the vectors in R^k whose entries sum to zero: [k, k - 1] (Helmert contrasts)."""
    basis = torch.zeros(k, k - 1, dtype=torch.float64)
    for j in range(1, k):
        basis[:j, j - 1] = 1.0
        basis[j, j - 1] = -float(j)
        basis[:, j - 1] /= math.sqrt(j * (j + 1))
    return basis


class DevSelection:
    """Dev evaluation and best-z bookkeeping of one task in a full-batch IST run.

    `observe` is called at the start (iteration 0) and after every iteration; it returns True when the task
    should stop (out of patience, or stopped by `on_evaluate`, e.g. its owner cancelled it)."""

    def __init__(self, backbone: Backbone, task: Task, proj_b: ProjB, *, patience: int, max_new_tokens: int,
                 option_loss: bool = True, task_index: int = 0, on_evaluate: EvalHook | None = None) -> None:
        self.backbone, self.task, self.proj_b, self.option_loss = backbone, task, proj_b, option_loss
        self.patience, self.max_new_tokens = patience, max_new_tokens
        self.task_index, self.on_evaluate = task_index, on_evaluate
        self.began = time.perf_counter()
        self.history: list[HistoryEntry] = []
        self.best_z: Tensor | None = None
        self.best_step, self.best_score, self.best_loss = 0, -math.inf, math.inf
        self.error: str | None = None

    @torch.no_grad()
    def observe(self, step: int, z: Tensor, train_loss: float | None) -> bool:
        prompt = self.proj_b(z.detach().to(self.backbone.device)[None])
        score, dev_loss = dev_score_and_loss(self.backbone, self.task, prompt, self.option_loss,
                                             self.max_new_tokens)
        entry: HistoryEntry = {"step": step, "train_loss": train_loss, "dev_loss": dev_loss, "dev": score,
                               "norm": float(z.detach().norm()), "seconds": time.perf_counter() - self.began}
        self.history.append(entry)
        if dev_loss < self.best_loss or self.best_z is None:
            self.best_z, self.best_step = z.detach().float().cpu().clone(), step
            self.best_score, self.best_loss = score, dev_loss
        if self.on_evaluate is not None and self.task_index in set(self.on_evaluate(step, {self.task_index: entry})):
            self.error = STOPPED_BY_REQUEST
            return True
        return step - self.best_step >= self.patience

    def result(self, steps: int) -> ISTResult:
        assert self.best_z is not None, "observe() the starting z first"
        return ISTResult(self.task.name, self.best_z, self.best_score, steps, self.best_step,
                         time.perf_counter() - self.began, self.error, self.history)


@torch.no_grad()
def dev_score_and_loss(backbone: Backbone, task: Task, prompt: Tensor, option_loss: bool = True,
                       max_new_tokens: int = 32) -> tuple[float, float]:
    """A task's dev score and dev loss with `prompt` [1, n, d]. The loss is the one
    `TrainObjective` trains (the right option's cross-entropy, read off the scored options, for tasks with
    options and `option_loss`; else the mean token NLL of the dev targets, one more forward pass)."""
    (predictions,) = predict_with_prompts(backbone, [task], [task.dev], prompt, max_new_tokens=max_new_tokens)
    score = score_predictions(task, task.dev, predictions)
    if option_loss and task.kind.has_options:
        gold = [p.options.index(e.output.strip()) if p.options and e.output.strip() in p.options else None
                for e, p in zip(task.dev, predictions, strict=True)]
        if all(g is not None for g in gold):
            # the train objective's cross-entropy: over the ranking scores (mean log-likelihood per token)
            nll = [-float(torch.tensor(p.scores).log_softmax(0)[g]) for p, g in zip(predictions, gold, strict=True)]
            return score, sum(nll) / len(nll)
    return score, mean_dev_losses(backbone, [task], prompt)[0]


def check_initial_z(initial_z: Tensor | None, num_tasks: int, d_intrinsic: int) -> Tensor:
    """The starting z of each task, [num_tasks, d_I] (zeros when None)."""
    if initial_z is None:
        return torch.zeros(num_tasks, d_intrinsic)
    if tuple(initial_z.shape) != (num_tasks, d_intrinsic):
        raise ValueError(f"initial_z must be [{num_tasks}, {d_intrinsic}], got {tuple(initial_z.shape)}")
    return initial_z.detach().float()


def run_per_task(backbone: Backbone, tasks: Sequence[Task], proj_b: ProjB,
                 tune_one: Callable[[int, Task], ISTResult]) -> list[ISTResult]:
    """Run `tune_one(index, task)` for each task with Proj_b borrowed: frozen, in eval mode, on the backbone's
    device, and put back as it was (device, mode, requires_grad flags) afterwards."""
    home, was_training = next(proj_b.parameters()).device, proj_b.training
    was_trainable = [p.requires_grad for p in proj_b.parameters()]
    proj_b.to(backbone.device).eval().requires_grad_(False)
    try:
        return [tune_one(i, task) for i, task in enumerate(tasks)]
    finally:
        for p, flag in zip(proj_b.parameters(), was_trainable, strict=True):
            p.requires_grad_(flag)
        proj_b.to(home).train(was_training)


def finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)
