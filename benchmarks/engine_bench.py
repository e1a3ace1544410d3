"""Engine benchmark: model load (GGUF vs fp32 cache), scoring throughput, training step times, Proj_b(z).

Prints a table of figures; it is not a test. Run:
    .venv/bin/python benchmarks/engine_bench.py            # real SmolLM2-135M on this machine
    .venv/bin/python benchmarks/engine_bench.py --skip-gguf  # reuse the existing fp32 cache only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ipt_engine.backbone import Backbone
from ipt_engine.data.everyday import everyday_tasks
from ipt_engine.evaluation import predict, predict_with_prompts
from ipt_engine.ist_full_batch import TrainObjective
from ipt_engine.model_loading import load_smollm2
from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.tasks import TaskKind, to_text_pair
from ipt_engine.testing import RELATED, TARGET, category_task

LABELS = ["positive", "negative", "neutral"]


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sources(count: int) -> list[str]:
    story = ["simple", "moving", "dull", "clever"] * 64
    acting = ["fine", "weak", "strong", "odd"] * 64
    texts = [f"review number {i}: the film had a {w} story and {v} acting overall"
             for i, (w, v) in enumerate(zip(story, acting, strict=True))]
    return [to_text_pair("sentiment", TaskKind.CLASSIFICATION, t).source for t in texts[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--n-prompt", type=int, default=100, help="soft prompt length n (paper: 100)")
    parser.add_argument("--d-intrinsic", type=int, default=250)
    parser.add_argument("--d-hidden", type=int, default=768)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gguf", action="store_true", help="do not time the GGUF dequantisation")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []

    if args.backbone == "smollm2" and not args.skip_gguf:
        with tempfile.TemporaryDirectory() as tmp:
            _, _, first = load_smollm2(Path(tmp))
            _, _, second = load_smollm2(Path(tmp))
        rows.append(("load from GGUF (dequantise + write cache)", f"{first.seconds:.2f} s"))
        rows.append(("load from fp32 safetensors cache", f"{second.seconds:.2f} s"))

    bb = Backbone.load(args.backbone, device=args.device)
    d = bb.hidden_size
    gen = torch.Generator().manual_seed(0)
    n = args.n_prompt

    for batch in (1, 8, 32):
        prompts = (torch.randn(batch, n, d, generator=gen) * 0.5).to(bb.device)
        src = sources(batch)
        opts = [[" " + label for label in LABELS]] * batch
        seconds = timed(lambda p=prompts, s=src, o=opts: bb.score_options(p, s, o), args.repeats)
        rows.append((f"scoring, batch {batch} x {len(LABELS)} options, n={n}", f"{batch / seconds:.1f} examples/s"))

    # a dev or test pass of 4 tasks (the everyday suite's dev sets): every row with its task's prompt, against
    # each task's prompt run once and its keys and values reused by the task's rows (what evaluate() does)
    tasks = everyday_tasks()
    examples = [list(t.dev) for t in tasks]
    rows_total = sum(len(e) for e in examples)
    prompts = (torch.randn(len(tasks), n, d, generator=gen) * 0.5).to(bb.device)
    plain = timed(lambda: predict(bb, tasks, examples, prompts), args.repeats)
    once = timed(lambda: predict_with_prompts(bb, tasks, examples, prompts), args.repeats)
    rows.append((f"evaluation, {len(tasks)} tasks x {rows_total} dev rows, n={n}: prompt with every row",
                 f"{rows_total / plain:.1f} examples/s"))
    rows.append(("evaluation, same rows: each task's prompt run once (keys and values reused)",
                 f"{rows_total / once:.1f} examples/s ({plain / once:.2f}x)"))

    config = SubspaceConfig(n_prompt=n, d_model=d, d_intrinsic=args.d_intrinsic, d_hidden=args.d_hidden)
    torch.manual_seed(0)  # one random Proj_b every run: bfloat16's gradient agreement depends on the draw (at n = 100
    # one draw gave a mean-gradient cosine of -0.15, another 0.80, most 0.99)
    proj_b = IntrinsicSubspace(config).proj_b.to(bb.device)
    proj_b.requires_grad_(False)
    src = sources(args.train_batch)
    targets = [" positive"] * args.train_batch

    def step(prompts: torch.Tensor) -> None:
        ll, count = bb.target_log_likelihood(prompts, src, targets)
        (-(ll / count)).mean().backward()

    pt_prompt = (torch.randn(1, n, d, generator=gen) * 0.5).to(bb.device).requires_grad_(True)
    rows.append((f"PT training step, batch {args.train_batch}, n={n}",
                 f"{timed(lambda: step(pt_prompt.expand(args.train_batch, -1, -1)), args.repeats) * 1000:.0f} ms"))
    z = torch.zeros(1, args.d_intrinsic, device=bb.device, requires_grad=True)
    rows.append((f"IST training step, batch {args.train_batch}, d_I={args.d_intrinsic}",
                 f"{timed(lambda: step(proj_b(z).expand(args.train_batch, -1, -1)), args.repeats) * 1000:.0f} ms"))

    # a full-batch IST iteration's forward-backward (every train row, per-row gradients), in float32 and under the
    # bfloat16 autocast the service uses where the hardware computes it natively
    task = category_task(TARGET[0], TARGET[1], seed=len(RELATED), train_per_label=16)
    exact = TrainObjective(bb, task, proj_b)
    fast = TrainObjective(bb, task, proj_b, autocast=torch.bfloat16)
    z0 = torch.zeros(args.d_intrinsic)
    full = timed(lambda: exact.row_losses_and_grads(z0), args.repeats)
    half = timed(lambda: fast.row_losses_and_grads(z0), args.repeats)
    (_, g_full), (_, g_half) = exact.row_losses_and_grads(z0), fast.row_losses_and_grads(z0)
    cosine = float(torch.nn.functional.cosine_similarity(g_full.mean(0), g_half.mean(0), dim=0))
    row_cosine = float(torch.nn.functional.cosine_similarity(g_full, g_half, dim=1).median())
    rows.append((f"IST forward-backward, {exact.num_rows} train rows (category task), float32", f"{full:.2f} s"))
    rows.append(("IST forward-backward, same rows, bfloat16 autocast",
                 f"{half:.2f} s ({full / half:.2f}x; mean gradient cosine {cosine:.4f}, |mean gradient| "
                 f"{float(g_full.mean(0).norm()):.3g} in float32 and {float(g_half.mean(0).norm()):.3g}; a row's "
                 f"gradient: median cosine {row_cosine:.4f}, median |g_i| {float(g_full.norm(dim=1).median()):.3g})"))
    with torch.no_grad():
        zs = torch.randn(1, args.d_intrinsic, device=bb.device)
        seconds = timed(lambda: proj_b(zs), max(args.repeats, 20))
    numel = sum(p.numel() for p in proj_b.parameters())
    rows.append((f"Proj_b(z), one task, d_I={args.d_intrinsic} -> {n}x{d} ({numel / 1e6:.1f} M params)",
                 f"{seconds * 1000:.2f} ms"))

    device = str(bb.device) if bb.device.type == "cpu" else torch.cuda.get_device_name(bb.device)
    print(f"\nengine benchmark: backbone {bb.backbone_id}, device {device}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, {platform.machine()}")
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
