"""Mixed-task serving: predict throughput and latency with 1, 10, 100, 1000 distinct tasks in the request stream.

Everything goes through the service as users reach it: the real app (uvicorn on loopback) over HTTP, tasks stored
in a real Redis (a private redis-server; random z vectors, which is all a timing needs), the prompt cache and the
micro-batcher, which runs the requests of many tasks in one forward pass (a pass closes at IPT_BATCH_MAX_TOKENS
fed tokens). A closed loop of `--concurrency` clients sends one-input predict requests, round-robin over the
stream's tasks. The default is twice the rows a pass of the server with the prefix KV cache takes (the token budget
over a row's tokens, at most IPT_BATCH_MAX_SIZE), for every configuration alike: while one full pass runs, the next
fills. With only B clients a closed loop settles into two cohorts of B/2 that take turns on the model, and the
server never runs a full pass (seen: 16 inputs per forward with 32 clients).

Compared in one run, on the same inputs:
- the stream of 1 task (every forward pass serves one prompt) against 10, 100, 1000 tasks (mixed passes);
- a one-request-per-forward server: the same app with IPT_BATCH_MAX_SIZE=1, on the largest stream;
- the gain batching gives the bare PLM on this machine: engine predict, no prompt, batch 32 vs batch 1; and the
  same with one soft prompt of the subspace's n tokens, rows as long as the served ones (like for like);
- the app with the prefix KV cache and the app without it, serving side by side, timed in interleaved rounds
  (`--rounds`, order alternating) and pooled, so that a slow spell of this shared machine falls on both.
Targets: 1000 tasks at >= 0.95x the single-task throughput (issue 18; issue 7 asked 0.9x); against per-request
serving, at least the bare PLM's batching gain (issue 7); with the prefix KV cache >= 2.0x the throughput without it
at 1000 tasks (issue 18).

The prompt cache starts filled with the stream's tasks (the steady state of a service whose cache holds its
active tasks); cache misses are measured by benchmarks/cache_bench.py.

Run:
    .venv/bin/python -m benchmarks.serving_bench                   # SmolLM2; ~3-4 min on 2 CPU cores
    .venv/bin/python -m benchmarks.serving_bench --requests 480    # more requests per configuration
    .venv/bin/python -m benchmarks.serving_bench --write-docs      # also write the table into docs/benchmarks.md
    .venv/bin/python -m benchmarks.serving_bench --quick           # smoke run with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

from benchmarks.load import BatchStats, LoadResult, ModelBusy, predict_request, run_load
from benchmarks.model_setup import add_common_arguments, prepare, subspace_shape
from benchmarks.redis_server import redis_description, redis_server
from benchmarks.report import Report, device_description, finish
from benchmarks.served_app import (
    APP,
    TaskWriter,
    category_inputs,
    prefill_prefix_cache,
    prefill_prompt_cache,
    served_app,
    service_settings,
)
from benchmarks.timing import device_kind, median, ms, ratio, sync, timed

MIXED_TARGET = 0.95
"""Throughput at the largest stream over the single-task stream that issue 18 asks for."""
ENGINE_BATCH = 32
"""Rows of the engine-only measurements (the PLM's batching gain, batch 32 vs 1)."""
PER_REQUEST_REQUESTS = 256
"""Requests the one-request-per-forward server gets at most (it is ~8x slower: a full stream would dominate the run)."""
PREFIX_CACHE_TARGET = 2.0
"""Throughput with the prefix KV cache over without it, at the largest stream, that issue 18 asks for."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--tasks", default="1,10,100,1000",
                        help="distinct tasks per stream, comma separated (1, the baseline, is always run)")
    parser.add_argument("--requests", type=int, default=None,
                        help="timed requests per configuration and round (default: 384 on CPU, 1024 on CUDA, 48 with "
                             "--quick, and at least 6 per client, so that a run is mostly full passes, not its start "
                             f"and its tail; the one-request-per-forward server gets at most {PER_REQUEST_REQUESTS})")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed-loop clients (default: twice the rows of a full pass with the prefix cache)")
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="IPT_BATCH_MAX_SIZE of the batched servers (default: the service's)")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="IPT_BATCH_MAX_TOKENS of the batched servers (default: the service's for the device)")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="IPT_BATCH_MAX_WAIT_MS (default: the service's)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the batched configurations (default: 3, 1 with --quick): each "
                             "round runs every stream with the prefix cache and the largest without it, in "
                             "alternating order, so that a slow spell of a shared machine hits all of them")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


Measured = tuple[LoadResult, BatchStats, float]
"""A timed load run: its result, the predictor's batches during it, the share of its wall time the model was busy."""


def timed_run(base: str, stream: Sequence[tuple[str, dict[str, object]]], concurrency: int) -> Measured:
    before = BatchStats.snapshot()
    with ModelBusy() as busy:
        result = run_load(base, stream, concurrency)
    return result, BatchStats.snapshot().since(before), busy.seconds / result.wall


def pooled(runs: Sequence[Measured]) -> Measured:
    """Rounds of one configuration as one run (requests together, wall times and batches added)."""
    result = LoadResult.pooled([r for r, _, _ in runs])
    stats = sum((s for _, s, _ in runs), BatchStats())
    return result, stats, sum(b * r.wall for r, _, b in runs) / result.wall


def make_stream(task_ids: Sequence[str], inputs: Sequence[str], count: int, per_request: int,
                seed: int) -> list[tuple[str, dict[str, object]]]:
    """`count` predict requests, round-robin over the tasks in a shuffled order (consecutive requests hit different
    tasks); request i carries the same inputs whatever the stream, so streams differ only in their tasks."""
    order = list(task_ids)
    random.Random(seed).shuffle(order)
    return [predict_request(order[i % len(order)],
                            [inputs[(i * per_request + j) % len(inputs)] for j in range(per_request)])
            for i in range(count)]


def plm_batching(backbone: object, name: str, labels: Sequence[str], inputs: Sequence[str], batch: int,
                 repeats: int, prompt: object = None, prompt_kv: object = None) -> tuple[float, float, float, float]:
    """Engine predict of one task, with no prompt (the bare PLM), one soft prompt [1, n, d] (rows as long as the
    served ones) or that prompt's cached keys and values (`Backbone.prompt_kv`, one row): (examples/s at batch 1,
    at batch `batch`, median seconds per call of each)."""
    from ipt_engine.evaluation import predict
    from ipt_engine.tasks import Example, TaskHead, TaskKind

    head = TaskHead(name, TaskKind.CLASSIFICATION, tuple(labels))
    examples = [Example(inputs[i % len(inputs)], "") for i in range(batch)]
    device = backbone.device  # type: ignore[attr-defined]

    def run(xs: list[Example]) -> None:
        predict(backbone, [head], [xs], prompt, prompt_kv=prompt_kv)  # type: ignore[arg-type]

    for e in examples[:2]:
        run([e])  # warm-up
    run(examples)
    sync(device)
    singles = []
    for e in examples:  # `batch` single calls: their median is steady enough
        start = time.perf_counter()
        run([e])
        sync(device)
        singles.append(time.perf_counter() - start)
    batched = timed(lambda: run(examples), repeats, device, warmup=0)
    one, many = median(singles), median(batched)
    return 1 / one, batch / many, one, many


def matmul_peak_flops(device: object, dtype: object, size: int = 2048, repeats: int = 5) -> float:
    """This machine's measured matmul throughput (FLOP/s): the median of `repeats` size x size products in the
    model's dtype, the ceiling a forward pass of dense layers can approach."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)  # type: ignore[arg-type]
    b = torch.randn(size, size, device=device, dtype=dtype)  # type: ignore[arg-type]
    times = timed(lambda: a @ b, repeats, device, warmup=1)
    return 2 * size ** 3 / median(times)


@dataclass(frozen=True)
class RequestWork:
    """What one served row costs the model besides its prompt, as the backbone packs it (`option_packing`)."""

    source: float  # mean source tokens
    prefix: float  # mean source tokens the prefix KV cache holds (the task's "{name}:"), skipped with the cache
    options: int  # option tokens fed after the source: each option's tokens but its last (label + EOS)
    scored: int  # columns the LM head runs on: the last source column and each fed option token

    def tokens(self, n_prompt: int, cached: bool) -> float:
        """Tokens one row feeds: without the cache its prompt, source and options; with it, the source past the
        cached prefix and the options."""
        return self.source - self.prefix + self.options if cached else n_prompt + self.source + self.options

    def flops(self, n_prompt: int, cached: bool, body_params: int, head_params: int) -> float:
        """Model FLOPs of one row: 2 x body parameters per token fed, 2 x LM-head parameters per scored column."""
        return 2.0 * body_params * self.tokens(n_prompt, cached) + 2.0 * head_params * self.scored


def request_work(backbone: object, name: str, labels: Sequence[str], inputs: Sequence[str]) -> RequestWork:
    """The work of one served request with one input, as the backbone tokenizes it and `option_packing` lays it out
    (each label followed by EOS)."""
    from ipt_engine.option_packing import pack_rows
    from ipt_engine.tasks import TaskKind, source_prefix, to_text_pair

    tok = backbone.tokenizer  # type: ignore[attr-defined]
    prefix = tok(source_prefix(name)).input_ids
    sources = [tok(to_text_pair(name, TaskKind.CLASSIFICATION, x).source).input_ids for x in inputs]
    skipped = [len(prefix) if s[:len(prefix)] == prefix and len(s) > len(prefix) else 0 for s in sources]
    options = [(k, [*tok(" " + label, add_special_tokens=False).input_ids, tok.eos_token_id])
               for k, label in enumerate(labels)]
    packed = pack_rows([[0]], [options], pad_id=0)  # a one-token source: what follows it is the same for any
    return RequestWork(sum(map(len, sources)) / len(sources), sum(skipped) / len(skipped), packed.width - 1,
                       len(packed.scored_columns()[0]))


def model_parameters(backbone: object) -> tuple[int, int]:
    """(body parameters, LM-head parameters): the body runs on every token, the head only where it is scored. A
    tied input embedding is a lookup, not a matmul, so it counts in neither."""
    model = backbone.model  # type: ignore[attr-defined]
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied weight is counted once
    tied = head.data_ptr() == embedding.data_ptr()
    return total - embedding.numel() - (0 if tied else head.numel()), head.numel()


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    import torch

    from ipt_engine.tasks import source_prefix
    from service.predictor import default_batch_tokens
    from service.redis_connection import connect
    from service.runtime import load_runtime, reset_runtime
    from service.settings import Settings
    from service.task_store import TaskStore

    counts = sorted({1} | {int(k) for k in args.tasks.split(",") if k.strip()})  # 1: the single-task baseline
    if counts[0] < 1:
        raise SystemExit("--tasks needs positive task counts, e.g. 1,10,100,1000")
    defaults = Settings.model_fields
    batch = args.batch_size or int(defaults["batch_max_size"].default)
    wait_ms = args.max_wait_ms if args.max_wait_ms is not None else float(defaults["batch_max_wait_ms"].default)
    per_request = args.inputs_per_request
    with ExitStack() as stack:
        stack.callback(reset_runtime)
        setup = prepare(args, stack)
        redis_url = stack.enter_context(redis_server(setup.workdir))
        settings = service_settings(
            setup, redis_url, batch_max_size=batch, batch_max_wait_ms=wait_ms,
            prompt_cache_size=max(int(defaults["prompt_cache_size"].default), counts[-1]),
            max_inputs_per_predict=max(int(defaults["max_inputs_per_predict"].default), per_request))
        runtime = load_runtime(settings)  # the app below reuses this process-wide runtime
        device = runtime.backbone.device
        n_prompt = runtime.subspace.config.n_prompt
        tokens = args.batch_tokens or default_batch_tokens(device.type)
        name, labels, inputs = category_inputs()
        work = request_work(runtime.backbone, name, labels, inputs)
        seq2seq = runtime.backbone.is_encoder_decoder

        def rows_per_pass(cached: bool) -> int:
            """Rows a full pass takes: the token budget over a row's fed tokens, at most IPT_BATCH_MAX_SIZE."""
            return min(batch, max(int(tokens // work.tokens(n_prompt, cached)), 1))

        pass_rows = rows_per_pass(not seq2seq)  # with the cache if any
        concurrency = args.concurrency or 2 * max(pass_rows // per_request, 1)
        # the prefix KV cache holds every task of the largest stream (round-robin over more tasks than an LRU holds
        # would miss every time); its bytes per task are reported below
        per_task_kv = 0 if seq2seq else runtime.backbone.prompt_kv(  # seq2seq: no cache
            torch.zeros(1, n_prompt, runtime.backbone.hidden_size, device=device), [source_prefix(name)]).nbytes
        settings = settings.model_copy(update={
            "prefix_cache_bytes": per_task_kv * (counts[-1] + 1), "batch_max_tokens": tokens,
            "batch_max_pending": max(int(defaults["batch_max_pending"].default), 4 * concurrency * per_request)})
        n_requests = args.requests or (48 if args.quick else max(1024 if device.type == "cuda" else 384,
                                                                   6 * concurrency))
        store = TaskStore(connect(settings))
        writer = TaskWriter(store, name, labels, runtime.subspace.config.d_intrinsic, runtime.artifact_id, args.seed)
        ids = writer.write(counts[-1])
        streams = {k: make_stream(ids[:k], inputs, n_requests, per_request, args.seed) for k in counts}
        warm = make_stream(ids[:counts[-1]], inputs[::-1], concurrency, per_request, args.seed + 1)

        rounds = args.rounds or (1 if args.quick else 3)
        # the app with the prefix cache and the app without it serve side by side (one model, one at a time)
        with served_app(settings) as (base, app), \
                served_app(settings.model_copy(update={"prefix_cache_bytes": 0})) as (base_off, app_off):
            fill_s = prefill_prompt_cache(app, runtime, store, ids[:counts[-1]])
            kv_fill_s = prefill_prefix_cache(app, runtime, store, ids[:counts[-1]])
            prefill_prompt_cache(app_off, runtime, store, ids[:counts[-1]])
            for b in (base, base_off):
                run_load(b, warm, concurrency)  # untimed: kernels, connections, batch rhythm
            runs: dict[int | str, list[Measured]] = {}
            for r in range(rounds):
                configs: list[tuple[int | str, str, int]] = [*((k, base, k) for k in counts),
                                                             ("off", base_off, counts[-1])]
                for key, b, k in configs if r % 2 == 0 else configs[::-1]:
                    runs.setdefault(key, []).append(timed_run(b, streams[k], concurrency))
            kv_held = app.state.batcher.prefix_cache.nbytes if app.state.batcher.prefix_cache else 0
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        batched = {k: pooled(runs[k]) for k in counts}
        no_kv, no_kv_stats, no_kv_busy = pooled(runs["off"])
        round_gains = [on[0].throughput / off[0].throughput for on, off in zip(runs[counts[-1]], runs["off"],
                                                                                   strict=True)]
        with served_app(settings.model_copy(update={"batch_max_size": 1})) as (base, app):
            prefill_prompt_cache(app, runtime, store, ids[:counts[-1]])
            run_load(base, warm[:2], 1)
            before = BatchStats.snapshot()
            with ModelBusy() as busy:
                # one request a forward
                per_request_result = run_load(base, streams[counts[-1]][:PER_REQUEST_REQUESTS], concurrency)
            per_request_stats = BatchStats.snapshot().since(before)
            per_request_busy = busy.seconds / per_request_result.wall
        repeats = 3 if device.type == "cpu" else 10  # batched calls, median taken (one alone varied by 25% on CPU)
        bare_1, bare_b, bare_1_s, bare_b_s = plm_batching(runtime.backbone, name, labels, inputs, ENGINE_BATCH, repeats)
        stored = store.vector(ids[0])
        assert stored is not None
        with torch.no_grad():
            prompt = runtime.subspace.decode(torch.from_numpy(stored[0])[None].to(device))
        one_1, one_b, one_1_s, one_b_s = plm_batching(runtime.backbone, name, labels, inputs, ENGINE_BATCH, repeats,
                                                      prompt)
        if kv_held:  # the same rows on the prompt's cached keys and values: the engine's own prefix-cache gain
            kv = runtime.backbone.prompt_kv(prompt, [source_prefix(name)])
            kv_1, kv_b, kv_1_s, kv_b_s = plm_batching(runtime.backbone, name, labels, inputs, ENGINE_BATCH, repeats,
                                                      prompt_kv=kv)
        peak = matmul_peak_flops(device, runtime.backbone.dtype)
        body, head = model_parameters(runtime.backbone)

        def flop_share(throughput: float, cached: bool) -> str:
            """Model FLOP/s (`RequestWork.flops`; padding and attention not counted) as a share of the peak."""
            return f"{work.flops(n_prompt, cached, body, head) * throughput / peak:.1%}"

        single = batched[counts[0]][0].throughput
        report = Report(
            "serving_bench", "Mixed-task serving through the app", device_kind(device),
            context=[
                f"backbone: {setup.label} on {device_description(device)}, {setup.dtype}",
                f"subspace: {setup.subspace_note}; {subspace_shape(runtime)}",
                f"service: {APP}, {redis_description(store.r)}; IPT_BATCH_MAX_SIZE="
                f"{batch}, IPT_BATCH_MAX_TOKENS={tokens} (~{pass_rows} rows a pass with the prefix cache, "
                f"~{rows_per_pass(False)} without), "
                f"IPT_BATCH_MAX_WAIT_MS={wait_ms:g}; {concurrency} closed-loop clients; {n_requests} timed "
                f"requests per row and round, {per_request} input(s) each, {len(labels)} labels (rank "
                f"classification); the batched rows pooled over {rounds} interleaved round(s), the per-request "
                f"server one round of {min(n_requests, PER_REQUEST_REQUESTS)} requests",
                f"prompt cache filled with the stream's tasks before timing ({counts[-1]} Proj_b(z) in {fill_s:.1f} s)",
            ],
            header=["configuration", "tasks requested", "examples/s", "p50 latency", "p99 latency",
                    "inputs per forward", "tokens per forward", "tasks per forward", "model busy", "vs 1 task",
                    "vs per-request server", "model FLOP/s of peak"])
        cached = "prefix KV cache on" if kv_held else "no prefix KV cache (seq2seq)"
        for k in counts:
            result, stats, busy_share = batched[k]
            report.add(f"batched server, {k} task{'s' if k > 1 else ''} in the stream ({cached})", min(k, n_requests),
                       f"{result.throughput:.2f}", ms(result.p50), ms(result.p99), f"{stats.mean_inputs:.1f}",
                       f"{stats.mean_tokens:.0f}", f"{stats.mean_tasks:.1f}", f"{busy_share:.0%}",
                       ratio(result.throughput, single), ratio(result.throughput, per_request_result.throughput),
                       flop_share(result.throughput, bool(kv_held)))
            report.values[f"model_busy_{k}"] = busy_share
            report.values[f"throughput_{k}"] = result.throughput
            report.values[f"p50_{k}"], report.values[f"p99_{k}"] = result.p50, result.p99
            report.values[f"tasks_per_forward_{k}"] = stats.mean_tasks
            report.values[f"inputs_per_forward_{k}"] = stats.mean_inputs
            report.values[f"tokens_per_forward_{k}"] = stats.mean_tokens
        report.add(f"batched server, {counts[-1]} tasks, prefix KV cache off (IPT_PREFIX_CACHE_BYTES=0)",
                   min(counts[-1], n_requests), f"{no_kv.throughput:.2f}", ms(no_kv.p50), ms(no_kv.p99),
                   f"{no_kv_stats.mean_inputs:.1f}", f"{no_kv_stats.mean_tokens:.0f}", f"{no_kv_stats.mean_tasks:.1f}",
                   f"{no_kv_busy:.0%}",
                   ratio(no_kv.throughput, single), ratio(no_kv.throughput, per_request_result.throughput),
                   flop_share(no_kv.throughput, False))
        report.add(f"one request per forward (IPT_BATCH_MAX_SIZE=1), {counts[-1]} tasks",
                   min(counts[-1], n_requests, PER_REQUEST_REQUESTS),
                   f"{per_request_result.throughput:.2f}", ms(per_request_result.p50), ms(per_request_result.p99),
                   f"{per_request_stats.mean_inputs:.1f}", f"{per_request_stats.mean_tokens:.0f}",
                   f"{per_request_stats.mean_tasks:.1f}",
                   f"{per_request_busy:.0%}", ratio(per_request_result.throughput, single), "1.00x",
                   flop_share(per_request_result.throughput, bool(kv_held)))
        report.add("bare PLM (engine, no prompt), batch 1", "-", f"{bare_1:.2f}", ms(bare_1_s), "-", "1", "-", "-",
                   "-", "-", "-", "-")
        report.add(f"bare PLM (engine, no prompt), batch {ENGINE_BATCH}", "-", f"{bare_b:.2f}", ms(bare_b_s), "-",
                   str(ENGINE_BATCH), "-", "-", "-", "-", "-", "-")
        report.add(f"PLM with one soft prompt ({n_prompt} tokens, engine), batch 1", "1", f"{one_1:.2f}", ms(one_1_s),
                   "-", "1", "-", "1", "-", "-", "-", "-")
        report.add(f"PLM with one soft prompt ({n_prompt} tokens, engine), batch {ENGINE_BATCH}", "1", f"{one_b:.2f}",
                   ms(one_b_s), "-", str(ENGINE_BATCH), "-", "1", "-", "-", "-", "-")
        if kv_held:
            report.add("PLM with one task's prompt + source prefix cached (engine), batch 1", "1", f"{kv_1:.2f}",
                       ms(kv_1_s), "-", "1", "-", "1", "-", "-", "-", "-")
            report.add(f"PLM with one task's prompt + source prefix cached (engine), batch {ENGINE_BATCH}", "1",
                       f"{kv_b:.2f}", ms(kv_b_s), "-", str(ENGINE_BATCH), "-", "1", "-", "-", "-", "-")
        most = batched[counts[-1]][0].throughput
        kv_gain = most / no_kv.throughput
        report.values.update({"batch_max_tokens": tokens, "concurrency": concurrency,
                              "tokens_per_forward_no_prefix_cache": no_kv_stats.mean_tokens,
                              "prefix_cache_gain": kv_gain, "no_prefix_cache_throughput": no_kv.throughput,
                              "matmul_peak_flops": peak, "prefix_cache_bytes_per_task": per_task_kv,
                              "prefix_cache_bytes_held": kv_held, "peak_rss_bytes": peak_rss})
        if kv_held:
            report.context.append(
                f"prefix KV cache: {per_task_kv / 1e6:.2f} MB per task ({n_prompt} prompt positions and the "
                f"{work.prefix:.0f} tokens of the task's source prefix '{source_prefix(name)}'), filled with the "
                f"stream's tasks before timing ({kv_fill_s:.1f} s; {kv_held / 1e9:.2f} GB held; peak RSS of this "
                f"process, which serves the app, with them: {peak_rss / 1e9:.2f} GB)")
        else:
            report.context.append("prefix KV cache: none (a seq2seq backbone: its encoder attends both ways, so "
                                  "a prompt's states depend on the input)")
        report.context.append(
            f"matmul peak measured here: {peak / 1e9:.0f} GFLOP/s ({runtime.backbone.dtype}, 2048^2); a request "
            f"feeds ~{work.tokens(n_prompt, bool(kv_held)):.0f} tokens"
            + (f" with the cache (the source past its prefix + {work.options} option tokens), "
               f"~{work.tokens(n_prompt, False):.0f} without" if kv_held else "")
            + f" ({n_prompt} prompt + {work.source:.0f} source + {work.options} option tokens), and the LM head runs "
            f"at {work.scored} positions, all of a row's options in its one pass")
        if kv_held:
            bound = work.flops(n_prompt, False, body, head) / work.flops(n_prompt, True, body, head)
            kv_met = "met" if kv_gain >= PREFIX_CACHE_TARGET else "NOT met"
            per_round = ", ".join(f"{g:.2f}x" for g in round_gains)
            report.values["prefix_cache_gain_per_round"] = round_gains
            report.values["engine_prefix_cache_gain"] = kv_b / one_b
            report.notes.insert(
                0, f"prefix KV cache, {counts[-1]} tasks: {kv_gain:.2f}x the throughput without it (target >= "
                   f"{PREFIX_CACHE_TARGET}x: {kv_met}; rounds: {per_round}); p50 latency "
                   f"{ms(batched[counts[-1]][0].p50)} vs {ms(no_kv.p50)}; the most skipping the prompt and the source "
                   f"prefix can give on this request mix is its model FLOPs without the cache over those with it = "
                   f"{bound:.2f}x, less the attention to the cached positions and the padding; the engine alone (no "
                   f"HTTP, one task, batch {ENGINE_BATCH}) gains {kv_b / one_b:.2f}x")
        mixed_gain = most / per_request_result.throughput
        measured = [r for r, _, _ in batched.values()] + [no_kv, per_request_result]
        client_cpu = sum(r.client_cpu for r in measured) / sum(len(r.latencies) for r in measured)
        bare_gain = bare_b / bare_1
        prompted_gain = one_b / one_1
        report.values.update({"counts": counts, "single_task_throughput": single, "per_request_throughput":
                              per_request_result.throughput, "mixed_vs_single": most / single,
                              "mixed_vs_per_request": mixed_gain, "bare_gain": bare_gain, "bare_1": bare_1,
                              "bare_batch": bare_b, "requests": n_requests, "prompted_gain": prompted_gain,
                              "model_busy_per_request": per_request_busy,
                              "client_cpu_per_request": client_cpu})
        report.notes += [
            f"{counts[-1]} tasks vs 1 task: {most / single:.3f}x the throughput (target >= {MIXED_TARGET}x: "
            f"{'met' if most / single >= MIXED_TARGET else 'NOT met'})",
            f"{counts[-1]} tasks vs one request per forward: {mixed_gain:.2f}x; batching gain of the bare PLM here "
            f"(batch {ENGINE_BATCH} vs 1): {bare_gain:.2f}x (target: at least that gain: "
            f"{'met' if mixed_gain >= bare_gain else 'NOT met'}); like for like, the PLM's batching gain on rows "
            f"as long as the served ones (one soft prompt of {n_prompt} tokens, batch {ENGINE_BATCH} vs 1): "
            f"{prompted_gain:.2f}x ({'met' if mixed_gain >= prompted_gain else 'NOT met'})",
            "why the two gains differ: a bare row here is the input alone (a few tokens), which a batch-1 forward runs "
            f"at the cost of reading the weights; a batch of {ENGINE_BATCH} is compute-bound, and its cost grows with "
            f"the tokens per row, which the {n_prompt}-token soft prompt multiplies",
            "latency: per request, from sending it to its answer, with all clients busy (closed loop), so it includes "
            "waiting for the batch in progress; p99 of a few hundred requests is close to their maximum",
            "inputs/tokens/tasks per forward: from the predictor's own histograms (ipt_predict_batch_size_inputs, "
            "ipt_predict_batch_tokens, ipt_predict_batch_distinct_tasks) over the timed requests; a pass closes at "
            f"IPT_BATCH_MAX_TOKENS={tokens} fed tokens, so with the prefix cache (no prompt positions) it takes more "
            "rows of the same cost",
            "model busy: the share of the run's wall time the predictor spent in its forward passes "
            "(MicroBatcher.run_batch); well below 100% means HTTP, queueing or the client, not the model, set the pace",
            f"load client: {client_cpu * 1e3:.2f} ms of CPU per request (mean over the timed runs), in a process of "
            "its own on the same cores as the server (one keep-alive h11 connection per client, "
            "benchmarks/load_client.py)",
        ]
        return finish(report, args, argv)


if __name__ == "__main__":
    main()
