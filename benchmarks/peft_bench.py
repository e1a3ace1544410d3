"""The peer: HuggingFace PEFT prompt tuning (PromptTuningConfig) against our IST, on the same model and task.

Same backbone (SmolLM2 by default: `Backbone.load(...).model` and its tokenizer), same task (the 3-label category
task of the tests, 16 examples per label for training, 8 per label for dev), same text format (the project's
`to_text_pair`), same rows per step and the same dev evaluator (rank classification accuracy, `evaluate`) for both:
- time to train to the same dev score: IST (z in R^{d_I}, Proj_b and the PLM frozen; the service's settings) runs
  its course; its best dev accuracy is the target (or --target-dev). PEFT prompt tuning (n virtual tokens,
  SAMPLE_VOCAB init, AdamW, its own forward and loss) trains until its dev accuracy reaches the target. Times are
  wall times from the start of training to the evaluation that first reached the target, evaluations included;
- bytes stored per task: the PEFT adapter files (save_pretrained: adapter_model.safetensors + adapter_config.json)
  against our d_I values as the service stores them (float16 by default), and what the task takes in Redis with
  its metadata (MEMORY USAGE, written by the service's TaskStore into a private redis-server);
- inference: PEFT puts one prompt on a whole batch, so K requests of K different tasks take K forward passes
  (set_adapter between them); ours answers them in one mixed forward (the service's MicroBatcher.run_batch).
  PEFT scores each answer option as its own sequence (the usual way with a PEFT model); ours scores all of a row's
  options in its one pass, so a row of ours per request is reported too, to tell batching from scoring.

PEFT is installed for the benchmarks only: `bash benchmarks/setup.sh` (into .bench-deps/, never the project's).

Run:
    bash benchmarks/setup.sh                                   # once: PEFT into .bench-deps/
    .venv/bin/python -m benchmarks.peft_bench                  # SmolLM2 + the shipped subspace; ~10-15 min, 2 cores
    .venv/bin/python -m benchmarks.peft_bench --subspace DIR --pt-steps 100 --infer-tasks 32
    .venv/bin/python -m benchmarks.peft_bench --quick          # smoke run with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.model_setup import add_common_arguments, prepare, subspace_shape
from benchmarks.redis_server import redis_description, redis_server
from benchmarks.report import ROOT, Report, device_description, finish
from benchmarks.timing import device_kind, median, timed

BENCH_DEPS = ROOT / ".bench-deps"


def import_peft() -> Any:
    """PEFT from .bench-deps/ (appended to sys.path, so it never shadows the project's packages)."""
    if str(BENCH_DEPS) not in sys.path:
        sys.path.append(str(BENCH_DEPS))
    try:
        import peft
    except ImportError:
        raise SystemExit("PEFT is not installed for the benchmarks: run `bash benchmarks/setup.sh` (it installs "
                         "benchmarks/requirements.txt into .bench-deps/, outside the project's dependencies)") from None
    return peft


def ist_description(settings: Any) -> str:
    """How IST was run, in words (settings: ipt_engine.ist_optimizers.ISTSettings)."""
    if settings.optimizer == "adamw":
        return (f"AdamW lr {settings.learning_rate}, up to {settings.max_steps} steps of {settings.batch_size} rows, "
                f"patience {settings.patience} evaluations")
    return (f"{settings.optimizer} on the full train set, up to {settings.max_iterations} iterations, patience "
            f"{settings.patience}, dev after every iteration")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, random_subspace=False)
    parser.add_argument("--ist-optimizer", default="gauss_newton", choices=["gauss_newton", "lbfgs", "adamw"],
                        help="IST optimiser (default gauss_newton, the service's)")
    parser.add_argument("--ist-iterations", type=int, default=None,
                        help="IST iterations of a full-batch optimiser (default 12, the service's; --quick 2)")
    parser.add_argument("--ist-steps", type=int, default=None,
                        help="IST AdamW max steps (default 200, the service's; --quick 4)")
    parser.add_argument("--pt-steps", type=int, default=None, help="PEFT PT max steps (default 200, as IST; --quick 6)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between dev evaluations (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="training rows per step, both methods")
    parser.add_argument("--patience", type=int, default=None,
                        help="IST: evaluations without improvement before it stops (default: as many steps as the "
                             "service's default training allows, 50; --quick 5)")
    parser.add_argument("--ist-lr", type=float, default=1.0, help="IST learning rate (the service's default)")
    parser.add_argument("--pt-lr", type=float, default=0.1,
                        help="PEFT PT learning rate (AdamW; the repo's real-model PT test uses 0.1)")
    parser.add_argument("--pt-tokens", type=int, default=None,
                        help="PEFT virtual tokens (default: the subspace's n, so both prompts have the same length)")
    parser.add_argument("--target-dev", type=float, default=None,
                        help="dev accuracy both must reach (default: IST's best)")
    parser.add_argument("--infer-tasks", type=int, default=None,
                        help="K: requests of K different tasks in the inference comparison (default 16; --quick 4)")
    parser.add_argument("--infer-repeats", type=int, default=None, help="timed passes (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--train-precision", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the training passes' autocast, both methods (default auto, the service's: bfloat16 "
                             "where the hardware computes it natively); dev is scored in the model's dtype")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.ist_steps = args.ist_steps or (4 if quick else 200)  # the service's default max_steps
    args.ist_iterations = args.ist_iterations or (2 if quick else 12)  # the service's default max_iterations
    args.pt_steps = args.pt_steps or (6 if quick else 200)
    args.eval_every = args.eval_every or (2 if quick else 5)
    if args.patience is None:  # AdamW: as many steps as the service's default allows (5 evals x 10 steps)
        args.patience = 4 if args.ist_optimizer != "adamw" else (5 if quick else max(1, 50 // args.eval_every))
    args.infer_tasks = args.infer_tasks or (4 if quick else 16)
    return args


@dataclass
class Trace:
    """Dev evaluations of one training run: (seconds since its start, step, dev accuracy)."""

    points: list[tuple[float, int, float]]
    total_s: float

    @property
    def best(self) -> float:
        return max(p[2] for p in self.points)

    def reached(self, target: float) -> tuple[float, int] | None:
        """(seconds, step) of the first evaluation at or above `target`."""
        return next(((t, s) for t, s, d in self.points if d >= target - 1e-9), None)


def encode(tokenizer: Any, source: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids as Backbone scores them: the source with special tokens; the target without, then EOS."""
    src = tokenizer(source, add_special_tokens=True).input_ids
    tgt = [*tokenizer(target, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return src, tgt


def pad(seqs: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], device=device)


def peft_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]], device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels (-100 on the source and padding) for PEFT's forward."""
    encoded = [encode(tokenizer, s, t) for s, t in pairs]
    ids = [s + t for s, t in encoded]
    labels = [[-100] * len(s) + t for s, t in encoded]
    return {"input_ids": pad(ids, tokenizer.pad_token_id, device),
            "attention_mask": pad([[1] * len(x) for x in ids], 0, device),
            "labels": pad(labels, -100, device)}


@torch.no_grad()
def peft_answers(model: Any, tokenizer: Any, n_virtual: int, sources: Sequence[str], options: Sequence[str],
                 device: torch.device) -> list[int]:
    """Rank classification with PEFT's forward: every (source, option) as its own sequence behind the active
    adapter's prompt, in one batch; the option with the highest mean token log-likelihood wins."""
    rows = [encode(tokenizer, s, o) for s in sources for o in options]
    ids = pad([s + t for s, t in rows], tokenizer.pad_token_id, device)
    mask = pad([[1] * (len(s) + len(t)) for s, t in rows], 0, device)
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # [rows, n + L, V]
    scores = []
    for r, (s, t) in enumerate(rows):
        positions = torch.arange(n_virtual + len(s) - 1, n_virtual + len(s) - 1 + len(t), device=device)
        scores.append(float(logp[r, positions, torch.tensor(t, device=device)].mean()))
    k = len(options)
    return [max(range(k), key=lambda j, i=i: scores[i * k + j]) for i in range(len(sources))]


def passes(fn: Any, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls of fn after one warm-up call."""
    return median(timed(fn, repeats, device))


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    import redis as redis_lib

    from ipt_engine.backbone import Backbone
    from ipt_engine.device import autocast_to, train_autocast_dtype
    from ipt_engine.evaluation import evaluate
    from ipt_engine.ist_optimizers import ISTSettings, start_candidates, tune
    from ipt_engine.subspace_artifact import load_artifact, load_task_vectors
    from ipt_engine.tasks import Example, TaskHead, TaskKind
    from ipt_engine.testing import RELATED, TARGET, category_task
    from ipt_engine.training import HistoryEntry
    from service.predictor import Item, MicroBatcher
    from service.runtime import Runtime
    from service.settings import Settings
    from service.task_store import TaskStore, encode_vector

    with ExitStack() as stack:
        setup = prepare(args, stack, random_subspace=False)  # a missing subspace fails here, before any loading
        peft = import_peft()
        bb = Backbone.load(setup.backbone, device=setup.device, dtype=setup.dtype)
        device = bb.device
        artifact = load_artifact(setup.subspace, backbone_id=bb.backbone_id, embeddings=bb.input_embeddings,
                                 device=device)
        subspace = artifact.subspace
        config = subspace.config
        n_tokens = args.pt_tokens or config.n_prompt
        task = category_task(TARGET[0], TARGET[1], seed=len(RELATED), train_per_label=16)
        labels = list(task.labels or ())
        ist_settings = ISTSettings(optimizer=args.ist_optimizer, max_iterations=args.ist_iterations,
                                   patience=args.patience, learning_rate=args.ist_lr, max_steps=args.ist_steps,
                                   batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed,
                                   train_precision=args.train_precision)
        autocast = train_autocast_dtype(args.train_precision, device, bb.dtype)
        # the service's starts: z = 0, the mean and medoids of the subspace's known task vectors (when it ships any)
        starts = start_candidates(config.d_intrinsic, load_task_vectors(setup.subspace), proj_b=subspace.proj_b)

        # ---- ours: IST in the subspace
        points: list[tuple[float, int, float]] = []
        start = time.perf_counter()

        def on_evaluate(step: int, entries: dict[int, HistoryEntry]) -> list[int]:
            points.append((time.perf_counter() - start, step, float(entries[0]["dev"] or 0.0)))
            return []

        (ist,) = tune(bb, [task], subspace.proj_b, ist_settings, start_candidates=starts, on_evaluate=on_evaluate)
        ist_trace = Trace(points, time.perf_counter() - start)
        target = args.target_dev if args.target_dev is not None else ist_trace.best

        # ---- the peer: PEFT prompt tuning, on its own copy of the same model
        peer_bb = Backbone.load(setup.backbone, device=setup.device, dtype=setup.dtype)
        peft_config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=n_tokens,
                                              prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
        torch.manual_seed(args.seed)
        with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5 deprecates (its FutureWarning)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = peft.get_peft_model(peer_bb.model, peft_config)
        tok = peer_bb.tokenizer
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.pt_lr, weight_decay=1e-5)
        pairs = [(p.source, p.target) for p in (task.text_pair(e) for e in task.train)]
        rng = random.Random(args.seed)
        order: list[int] = []

        def peft_dev() -> float:
            with torch.no_grad():
                prompt = model.get_prompt(batch_size=1).detach().to(bb.device)
            return evaluate(bb, [task], prompt, "dev")[0]  # the same evaluator as IST's

        points = []
        start = time.perf_counter()
        points.append((time.perf_counter() - start, 0, peft_dev()))
        step = 0
        for step in range(1, args.pt_steps + 1):
            if points[-1][2] >= target - 1e-9:
                step -= 1
                break
            rows = []
            for _ in range(args.batch_size):
                if not order:
                    order = list(range(len(pairs)))
                    rng.shuffle(order)
                rows.append(pairs[order.pop()])
            with autocast_to(device, autocast):
                loss = model(**peft_batch(tok, rows, device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % args.eval_every == 0 or step == args.pt_steps:
                points.append((time.perf_counter() - start, step, peft_dev()))
        peft_trace = Trace(points, time.perf_counter() - start)
        dev_sources = [task.text_pair(e).source for e in task.dev]
        options = [" " + label for label in labels]
        own = peft_answers(model, tok, n_tokens, dev_sources, options, device)
        peft_own_dev = sum(labels[k] == e.output for k, e in zip(own, task.dev, strict=True)) / len(task.dev)

        # ---- bytes stored per task
        adapter_dir = setup.workdir / "peft-adapter"
        model.save_pretrained(str(adapter_dir))
        adapter_files = {f.name: f.stat().st_size for f in adapter_dir.iterdir() if f.is_file()}
        adapter_bytes = sum(v for k, v in adapter_files.items() if k.startswith("adapter_"))
        store_dtype = Settings().vector_dtype
        z_bytes = len(encode_vector(ist.z.numpy(), store_dtype))  # as the service stores z
        url = stack.enter_context(redis_server(setup.workdir))
        store = TaskStore(redis_lib.Redis.from_url(url), vector_dtype=store_dtype)
        artifact_id = f"{artifact.metadata.backbone_id}/dI{config.d_intrinsic}/{artifact.metadata.created_at}"
        record, _ = store.create("public", task.name, task.kind.value, labels, config.d_intrinsic, artifact_id)
        store.mark_running(record.id, ist_settings.total_steps)
        store.set_progress(record.id, ist.steps, ist.dev_score)
        store.mark_succeeded(record.id, ist.z.numpy(), ist.dev_score, ist.steps)
        key = f"ipt:task:{record.id}"
        redis_bytes = sum(store.r.memory_usage(k, samples=0) or 0 for k in (key, f"{key}:z"))

        # ---- inference: K requests of K different tasks
        k_tasks = args.infer_tasks
        repeats = args.infer_repeats or (1 if device.type == "cpu" else 5)
        texts = [e.input for e in task.test + task.dev][:k_tasks]
        texts = [texts[i % len(texts)] for i in range(k_tasks)]
        sources = [task.text_pair(Example(t, "")).source for t in texts]
        for i in range(1, k_tasks):
            model.add_adapter(f"task{i}", peft.PromptTuningConfig(
                task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=n_tokens,
                prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB))
        names = ["default"] + [f"task{i}" for i in range(1, k_tasks)]

        def peft_per_task() -> None:
            for name, source in zip(names, sources, strict=True):
                model.set_adapter(name)
                peft_answers(model, tok, n_tokens, [source], options, device)

        def peft_one_task() -> None:
            model.set_adapter("default")
            peft_answers(model, tok, n_tokens, sources, options, device)

        peft_per_task_s = passes(peft_per_task, repeats, device)
        peft_one_task_s = passes(peft_one_task, repeats, device)
        batcher = MicroBatcher(Runtime(bb, subspace, artifact_id, 0.0), max_size=k_tasks, max_wait_s=0.0)
        with torch.no_grad():
            zs = torch.cat([ist.z[None].to(device), torch.randn(k_tasks - 1, config.d_intrinsic, device=device)])
            prompts = subspace.decode(zs)
        head = TaskHead(task.name, TaskKind.CLASSIFICATION, tuple(labels))
        mixed = [Item((f"task{i}", 1), head, prompts[i], Example(t, "")) for i, t in enumerate(texts)]
        single = [Item(("task0", 1), head, prompts[0], Example(t, "")) for t in texts]
        ours_mixed_s = passes(lambda: batcher.run_batch(mixed), repeats, device)
        ours_one_task_s = passes(lambda: batcher.run_batch(single), repeats, device)
        ours_per_request_s = passes(lambda: [batcher.run_batch([item]) for item in mixed], repeats, device)
        batcher.executor.shutdown(wait=False)

        # ---- report
        def reached(trace: Trace) -> str:
            hit = trace.reached(target)
            return f"{hit[0]:.1f} s (step {hit[1]})" if hit else f"not reached in {trace.total_s:.1f} s"

        ist_hit, peft_hit = ist_trace.reached(target), peft_trace.reached(target)
        report = Report(
            "peft_bench", "The peer: HuggingFace PEFT prompt tuning vs IST", device_kind(device),
            context=[
                f"backbone: {setup.label} on {device_description(device)}, {setup.dtype}; PEFT {peft.__version__}",
                f"subspace: {setup.subspace_note}; {subspace_shape(Runtime(bb, subspace, '', 0.0))}",
                f"task: {task.name} ({len(labels)} labels), {len(task.train)} train / {len(task.dev)} dev examples; "
                f"{args.batch_size} rows per step, dev evaluated every {args.eval_every} steps by the same evaluator",
                f"IST: {ist_description(ist_settings)}, "
                + (f"started at the best by train loss of {len(starts)} candidates (z = 0, the mean and medoids of "
                   f"the subspace's task vectors)" if len(starts) > 1 else
                   "z from 0 (the subspace ships no task vectors to start from)")
                + ", as the service; PEFT: "
                f"{n_tokens} virtual tokens, SAMPLE_VOCAB init, AdamW lr {args.pt_lr}, up to {args.pt_steps} steps, "
                f"stopped at the target",
                f"training passes: {'autocast to ' + str(autocast).removeprefix('torch.') if autocast else 'float32'} "
                f"on both sides (--train-precision {args.train_precision}); dev scored in {setup.dtype}",
                f"target dev accuracy: {target:.3f} ({'given' if args.target_dev is not None else 'IST best'})",
                f"inference: K = {k_tasks} requests, one input each, {len(labels)} options; median of {repeats} "
                f"timed pass(es) after a warm-up",
            ],
            header=["measure", "PEFT prompt tuning", "ours (IST, mixed batches)", "ours vs PEFT"])
        d = bb.hidden_size
        report.add("trainable parameters per task", f"{n_tokens * d:,} ({n_tokens} x {d})", f"{config.d_intrinsic:,}",
                   f"PEFT / ours = {n_tokens * d / config.d_intrinsic:.0f}")
        speed = f"PEFT / ours = {peft_hit[0] / ist_hit[0]:.2f}" if peft_hit and ist_hit and ist_hit[0] > 0 else "n/a"
        report.add(f"time to dev accuracy >= {target:.3f}", reached(peft_trace), reached(ist_trace), speed)
        report.add("best dev accuracy (steps run, wall time)",
                   f"{peft_trace.best:.3f} ({peft_trace.points[-1][1]} steps, {peft_trace.total_s:.1f} s)",
                   f"{ist_trace.best:.3f} ({ist.steps} steps, {ist_trace.total_s:.1f} s)", "-")
        report.add("PEFT's dev accuracy scored by its own forward (same prompt)", f"{peft_own_dev:.3f}", "-", "-")
        report.add("bytes stored per task", f"{adapter_bytes:,} B (adapter files)",
                   f"{z_bytes:,} B z ({store_dtype}); {redis_bytes:,} B in Redis with metadata",
                   f"PEFT / ours = {adapter_bytes / redis_bytes:.1f} (Redis), {adapter_bytes / z_bytes:.0f} (z)")
        report.add(f"{k_tasks} requests of {k_tasks} different tasks", f"{k_tasks / peft_per_task_s:.2f} examples/s "
                   f"({k_tasks} forwards)", f"{k_tasks / ours_mixed_s:.2f} examples/s (1 mixed forward)",
                   f"ours / PEFT = {peft_per_task_s / ours_mixed_s:.2f}")
        report.add(f"{k_tasks} requests of one task, one forward", f"{k_tasks / peft_one_task_s:.2f} examples/s",
                   f"{k_tasks / ours_one_task_s:.2f} examples/s",
                   f"ours / PEFT = {peft_one_task_s / ours_one_task_s:.2f}")
        report.add(f"{k_tasks} requests, one forward each", f"{k_tasks / peft_per_task_s:.2f} examples/s",
                   f"{k_tasks / ours_per_request_s:.2f} examples/s",
                   f"ours / PEFT = {peft_per_task_s / ours_per_request_s:.2f}")
        report.notes += [
            "adapter files: " + ", ".join(f"{k} {v:,} B" for k, v in sorted(adapter_files.items()))
            + " (README.md is PEFT's model card, not counted)",
            "PEFT scores each option as a full sequence; ours runs each input once and scores all its options in "
            "that pass: the last row (one forward per request on both sides) shows that part alone, the row "
            "above it the batching alone",
            f"dev accuracy of the trained PEFT prompt: {peft_trace.points[-1][2]:.3f} by the shared evaluator, "
            f"{peft_own_dev:.3f} by PEFT's own forward (they should agree)",
        ]
        report.values.update({
            "target": target, "ist_best": ist_trace.best, "peft_best": peft_trace.best,
            "ist_time_to_target": ist_hit[0] if ist_hit else None,
            "peft_time_to_target": peft_hit[0] if peft_hit else None,
            "adapter_bytes": adapter_bytes, "z_bytes": z_bytes, "redis_bytes": redis_bytes,
            "peft_per_task_throughput": k_tasks / peft_per_task_s, "ours_mixed_throughput": k_tasks / ours_mixed_s,
            "peft_own_dev": peft_own_dev, "peft_shared_dev": peft_trace.points[-1][2],
            "redis": redis_description(store.r),
        })
        return finish(report, args, argv)


if __name__ == "__main__":
    main()
