"""Predicting and scoring tasks with one soft prompt per task, all tasks batched together.

Rows of every task go through the backbone together, each row with its own task's prompt: option tasks
(classification, multiple choice) by rank classification, generation tasks by greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ipt_engine.backbone import Backbone
from ipt_engine.errors import InvalidTaskError
from ipt_engine.metrics import compute_metric
from ipt_engine.prompt_kv import PromptKV
from ipt_engine.tasks import Example, Task, TaskHead

DEFAULT_GENERATION_BATCH = 32


@dataclass(frozen=True)
class Prediction:
    """The answer to one input; for option tasks also each option's probability and ranking score.

    probabilities: softmax over the options of each option's total log-likelihood (`OptionScores.probabilities`).
    scores: the ranking scores, mean log-likelihood per option token (or the total, without length
        normalisation); `output` is the option with the highest score."""

    output: str
    options: tuple[str, ...] | None = None
    probabilities: tuple[float, ...] | None = None
    scores: tuple[float, ...] | None = None


def predict(backbone: Backbone, tasks: Sequence[Task | TaskHead], examples: Sequence[Sequence[Example]],
            prompts: Tensor | None, *, prompt_kv: PromptKV | None = None, max_new_tokens: int = 32,
            length_normalized: bool = True, generation_batch: int = DEFAULT_GENERATION_BATCH
            ) -> list[list[Prediction]]:
    """Answer `examples[t]` of every task t with prompt `prompts[t]`.

    Args:
        prompts: [num_tasks, n, d], one soft prompt per task, or None for the bare PLM.
        prompt_kv: instead of `prompts` (causal LMs), the tasks' prompts already run through the model
            (`Backbone.prompt_kv`, one row per task): the same answers without recomputing the prompts.
    Returns:
        per task, one Prediction per example.
    """
    if prompts is not None and prompts.shape[0] != len(tasks):
        raise ValueError(f"{len(tasks)} tasks but {prompts.shape[0]} prompts")
    if prompt_kv is not None and prompt_kv.batch != len(tasks):
        raise ValueError(f"{len(tasks)} tasks but {prompt_kv.batch} cached prompts")
    flat = [(t, i) for t, exs in enumerate(examples) for i in range(len(exs))]
    results: list[list[Prediction | None]] = [[None] * len(exs) for exs in examples]
    option_rows = [(t, i) for t, i in flat if tasks[t].kind.has_options]
    gen_rows = [(t, i) for t, i in flat if not tasks[t].kind.has_options]

    def rows_prompts(rows: list[tuple[int, int]]) -> Tensor | None:
        if prompts is None:
            return None
        return prompts.index_select(0, torch.tensor([t for t, _ in rows], device=prompts.device))

    def rows_kv(rows: list[tuple[int, int]]) -> PromptKV | None:
        return None if prompt_kv is None else prompt_kv.select([t for t, _ in rows])

    with torch.no_grad():
        if option_rows:
            sources, options, formatted = [], [], []
            for t, i in option_rows:
                ex = examples[t][i]
                opts = tasks[t].options_for(ex) or ()
                if len(opts) < 2:
                    raise InvalidTaskError(f"{tasks[t].kind} task {tasks[t].name!r}: input {ex.input!r:.60} has "
                                           f"{len(opts)} answer option(s); give at least 2")
                sources.append(tasks[t].text_pair(ex).source)
                options.append(opts)
                formatted.append(option_targets(opts))
            scored = backbone.score_options(rows_prompts(option_rows), sources, formatted,
                                            prompt_kv=rows_kv(option_rows))
            for (t, i), opts, sc in zip(option_rows, options, scored, strict=True):
                results[t][i] = Prediction(opts[sc.best(length_normalized)], tuple(opts),
                                           tuple(float(p) for p in sc.probabilities()),
                                           tuple(float(v) for v in sc.scores(length_normalized)))
        for start in range(0, len(gen_rows), generation_batch):
            chunk = gen_rows[start:start + generation_batch]
            sources = [tasks[t].text_pair(examples[t][i]).source for t, i in chunk]
            texts = backbone.generate(rows_prompts(chunk), sources, max_new_tokens=max_new_tokens,
                                      prompt_kv=rows_kv(chunk))
            for (t, i), text in zip(chunk, texts, strict=True):
                results[t][i] = Prediction(text)
    return [[p for p in per_task if p is not None] for per_task in results]


def row_texts(task: Task | TaskHead, example: Example) -> tuple[str, list[str] | None]:
    """What one row of `task` feeds the backbone: its source, and its answer options formatted as the targets
    `predict` scores (None for a generation task)."""
    options = task.options_for(example)
    return task.text_pair(example).source, None if options is None else option_targets(options)


def option_targets(options: Sequence[str]) -> list[str]:
    """Answer options as the targets scored after a row's source (a space, then the option)."""
    return [" " + o.strip() for o in options]


def reference_of(example: Example) -> str | list[str]:
    """What a prediction is scored against: the output, or every acceptable output when there are several."""
    return example.output if len(example.all_references) == 1 else list(example.all_references)


def score_predictions(task: Task, examples: Sequence[Example], predictions: Sequence[Prediction]) -> float:
    """The task's metric over its predictions, in [0, 1]."""
    refs = [reference_of(ex) for ex in examples]
    return compute_metric(task.metric, [p.output for p in predictions], refs, labels=task.labels)


PROMPT_KV_ROWS = 256
"""Rows answered per group of tasks whose prompts run through the model once (`predict_with_prompts`): each row
gets a copy of its task's keys and values, 0.92 MB for SmolLM2's 20-token prompt in fp32 (+46 KB per token of
the task's source prefix), so a group holds about 0.25-0.3 GB."""


def predict_with_prompts(backbone: Backbone, tasks: Sequence[Task | TaskHead], examples: Sequence[Sequence[Example]],
                         prompts: Tensor | None, *, max_new_tokens: int = 32, length_normalized: bool = True,
                         max_rows: int = PROMPT_KV_ROWS) -> list[list[Prediction]]:
    """`predict` with one prompt per task [num_tasks, n, d] (or None), each prompt run through the model once.

    A causal LM attends from the inputs to the prompt but never back, so a task's prompt, and the source prefix
    that starts every one of its sources ("{name}:"), have the same keys and values for every one of its
    examples: they are computed once per task (`Backbone.prompt_kv`) and only the inputs and options run per
    example, the same answers for about (n + S) / (S - k) less compute (S the source's tokens, k its prefix's).
    Tasks go in groups of at most `max_rows` examples, which bounds the copied keys and values. A
    seq2seq backbone (its encoder attends both ways) and the bare PLM (no prompt) take the plain path."""
    if prompts is None or backbone.is_encoder_decoder:
        return predict(backbone, tasks, examples, prompts, max_new_tokens=max_new_tokens,
                       length_normalized=length_normalized)
    if prompts.shape[0] != len(tasks):
        raise ValueError(f"{len(tasks)} tasks but {prompts.shape[0]} prompts")
    out: list[list[Prediction]] = []
    for group in row_groups([len(e) for e in examples], max_rows):
        kv = backbone.prompt_kv(prompts.index_select(0, torch.tensor(group, device=prompts.device)),
                                [tasks[i].source_prefix for i in group])
        out += predict(backbone, [tasks[i] for i in group], [examples[i] for i in group], None, prompt_kv=kv,
                       max_new_tokens=max_new_tokens, length_normalized=length_normalized)
    return out


def row_groups(sizes: Sequence[int], max_rows: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most `max_rows` (a larger one alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= max_rows:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def evaluate(backbone: Backbone, tasks: Sequence[Task], prompts: Tensor | None, split: str = "dev", *,
             max_new_tokens: int = 32, length_normalized: bool = True) -> list[float]:
    """Score every task on its `split` ("dev" or "test") with its prompt. prompts: [num_tasks, n, d] or None.

    Tasks without examples in that split score NaN."""
    examples = [list(getattr(t, split)) for t in tasks]
    preds = predict_with_prompts(backbone, tasks, examples, prompts, max_new_tokens=max_new_tokens,
                                 length_normalized=length_normalized)
    return [score_predictions(t, exs, ps) if exs else float("nan")
            for t, exs, ps in zip(tasks, examples, preds, strict=True)]
