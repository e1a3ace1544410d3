"""The service's two per-task caches: predict latency on a miss (a task's first request: Proj_b(z) is computed,
and on a causal backbone the prompt's keys and values too) and on a hit, and what each computation costs alone.

Through the real app over HTTP on loopback, tasks stored in a private Redis (random z vectors). One client sends
requests one at a time (no batching with others), in pairs: a task's first request (a miss), then a second
request of the same task with another input (a hit). The app's own counters (ipt_prompt_cache_lookups_total and,
when the prefix KV cache is on, ipt_prefix_kv_cache_lookups_total) check that every first request missed and every
second one hit. Proj_b(z) and the prompt's keys and values are also timed alone, on the model's device.

Run:
    .venv/bin/python -m benchmarks.cache_bench                 # SmolLM2; ~1 min on 2 CPU cores
    .venv/bin/python -m benchmarks.cache_bench --requests 200  # more pairs
    .venv/bin/python -m benchmarks.cache_bench --quick         # smoke run with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextlib import ExitStack

import torch

from benchmarks.load import metric_value, predict_request, run_load
from benchmarks.model_setup import add_common_arguments, prepare, subspace_shape
from benchmarks.redis_server import redis_description, redis_server
from benchmarks.report import Report, device_description, finish
from benchmarks.served_app import APP, TaskWriter, category_inputs, served_app, service_settings
from benchmarks.timing import device_kind, median, ms, pct, timed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--requests", type=int, default=None,
                        help="tasks, each asked twice: a miss, then a hit (default: 32 on CPU, 200 on CUDA, 12 with "
                             "--quick)")
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--projb-repeats", type=int, default=50, help="timed calls of Proj_b(z) alone")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def lookups(counter: object) -> tuple[float, float]:
    """(hits, misses) a cache lookup counter has counted so far."""
    return (metric_value(counter, "_total", {"result": "hit"}), metric_value(counter, "_total", {"result": "miss"}))


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    from ipt_engine.tasks import source_prefix
    from service import metrics
    from service.redis_connection import connect
    from service.runtime import load_runtime, reset_runtime
    from service.task_store import TaskStore

    with ExitStack() as stack:
        stack.callback(reset_runtime)
        setup = prepare(args, stack)
        redis_url = stack.enter_context(redis_server(setup.workdir))
        per_request = args.inputs_per_request
        settings = service_settings(setup, redis_url, max_inputs_per_predict=max(64, per_request))
        runtime = load_runtime(settings)
        device = runtime.backbone.device
        pairs = args.requests or (12 if args.quick else 200 if device.type == "cuda" else 32)
        if pairs > settings.prompt_cache_size:
            raise SystemExit(f"--requests {pairs} exceeds the prompt cache ({settings.prompt_cache_size}): "
                             f"hits would turn into misses")
        store = TaskStore(connect(settings))
        name, labels, inputs = category_inputs()
        writer = TaskWriter(store, name, labels, runtime.subspace.config.d_intrinsic, runtime.artifact_id, args.seed)
        warm_ids, ids = writer.write(3), writer.write(pairs)

        def texts(i: int) -> list[str]:
            return [inputs[(i * per_request + j) % len(inputs)] for j in range(per_request)]

        stream = [predict_request(task, texts(2 * k + second)) for k, task in enumerate(ids) for second in (0, 1)]
        with served_app(settings) as (base, app):
            run_load(base, [predict_request(t, texts(k)) for k, t in enumerate(warm_ids * 2)], 1)  # untimed
            caches = {"prompt": metrics.PROMPT_CACHE, "prefix KV": metrics.PREFIX_CACHE}
            before = {c: lookups(m) for c, m in caches.items()}
            result = run_load(base, stream, 1)
            counted = {c: tuple(a - b for a, b in zip(lookups(m), before[c], strict=True)) for c, m in caches.items()}
            prefix_on = app.state.batcher.prefix_cache is not None
        for cache, (hits, misses) in counted.items():
            expected = (pairs, pairs) if cache == "prompt" or prefix_on else (0, 0)
            if (hits, misses) != expected:
                raise RuntimeError(f"expected {expected[1]:g} {cache} cache misses then {expected[0]:g} hits, the app "
                                   f"counted {misses:g} misses and {hits:g} hits")
        miss_lat, hit_lat = result.latencies[0::2], result.latencies[1::2]
        z = torch.randn(1, runtime.subspace.config.d_intrinsic, device=device)
        with torch.no_grad():
            projb = timed(lambda: runtime.subspace.decode(z), args.projb_repeats, device)
        projb_s = median(projb)
        prompt = runtime.subspace.decode(z).detach()
        kv_times = timed(lambda: runtime.backbone.prompt_kv(prompt, [source_prefix(name)]), args.projb_repeats,
                         device) if prefix_on else []
        config = runtime.subspace.config
        prompt_bytes = config.n_prompt * config.d_model * runtime.backbone.dtype.itemsize
        projb_params = sum(p.numel() for p in runtime.subspace.proj_b.parameters())

        missed = ("Proj_b(z) and the keys and values of the prompt and the task's source prefix computed" if prefix_on
                  else "Proj_b(z) computed")
        report = Report(
            "cache_bench", "Per-task caches: predict on a miss vs a hit", device_kind(device),
            context=[
                f"backbone: {setup.label} on {device_description(device)}, {setup.dtype}",
                f"subspace: {setup.subspace_note}; {subspace_shape(runtime)}; Proj_b {projb_params / 1e6:.1f} M "
                f"parameters",
                f"service: {APP}, {redis_description(store.r)}; one request at a time, "
                f"{per_request} input(s) each, {len(labels)} labels; {pairs} tasks, each asked twice (miss, then hit)",
            ],
            header=["measure", "p50", "p99", "mean"])
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        report.add(f"predict, cache miss (a task's first request: {missed})", ms(pct(miss_lat, 50)),
                   ms(pct(miss_lat, 99)), ms(mean(miss_lat)))
        report.add("predict, cache hit (the task's second request)", ms(pct(hit_lat, 50)), ms(pct(hit_lat, 99)),
                   ms(mean(hit_lat)))
        diffs = [m - h for m, h in zip(miss_lat, hit_lat, strict=True)]
        report.add("miss - hit, paired by task", ms(pct(diffs, 50)), ms(pct(diffs, 99)), ms(mean(diffs)))
        report.add(f"Proj_b(z) alone, one task ({args.projb_repeats} calls)", ms(projb_s), ms(pct(projb, 99)),
                   ms(mean(projb)))
        share_miss = projb_s / pct(miss_lat, 50)
        report.add("Proj_b share of a predict on a miss (Proj_b p50 / miss p50)", f"{share_miss:.1%}", "-", "-")
        report.add("Proj_b share of a predict on a hit", "0% (not computed)", "-", "-")
        if prefix_on:
            report.add(f"the keys and values of the prompt + source prefix alone, one task ({args.projb_repeats} "
                       "calls)",
                       ms(median(kv_times)), ms(pct(kv_times, 99)), ms(mean(kv_times)))
        report.notes += [
            f"a cached prompt holds n x d = {config.n_prompt} x {config.d_model} values: {prompt_bytes / 1e6:.2f} MB; "
            f"the default cache of {settings.prompt_cache_size} prompts holds up to "
            f"{prompt_bytes * settings.prompt_cache_size / 1e9:.2f} GB",
            *(f"the app counted {misses:g} {cache} cache misses and {hits:g} hits over the timed requests, as expected"
              for cache, (hits, misses) in counted.items() if cache == "prompt" or prefix_on),
            *([] if prefix_on else ["prefix KV cache: off (a seq2seq backbone, or IPT_PREFIX_CACHE_BYTES=0)"]),
        ]
        report.values.update({"miss_p50": pct(miss_lat, 50), "hit_p50": pct(hit_lat, 50), "miss_p99": pct(miss_lat, 99),
                              "hit_p99": pct(hit_lat, 99), "projb_s": projb_s, "projb_share": share_miss,
                              "pairs": pairs, "hits": counted["prompt"][0], "misses": counted["prompt"][1],
                              "prefix_hits": counted["prefix KV"][0], "prefix_misses": counted["prefix KV"][1],
                              "prompt_kv_s": median(kv_times) if kv_times else None})
        return finish(report, args, argv)


if __name__ == "__main__":
    main()
