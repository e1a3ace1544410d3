"""Soft-prompt cache: predict latency on a cache miss (the first request of a task: Proj_b(z) is computed) and on a
cache hit, and the cost of Proj_b as a share of a predict.

Through the real app over HTTP on loopback, tasks stored in a private Redis (random z vectors). One client sends
requests one at a time (no batching with others), in pairs: a task's first request (a miss), then a second
request of the same task with another input (a hit). The app's own counter (ipt_prompt_cache_lookups_total) checks
that every first request missed and every second one hit. Proj_b(z) is also timed alone, on the model's device.

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


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
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
        with served_app(settings) as (base, _app):
            run_load(base, [predict_request(t, texts(k)) for k, t in enumerate(warm_ids * 2)], 1)  # untimed
            hits0 = metric_value(metrics.PROMPT_CACHE, "_total", {"result": "hit"})
            misses0 = metric_value(metrics.PROMPT_CACHE, "_total", {"result": "miss"})
            result = run_load(base, stream, 1)
            hits = metric_value(metrics.PROMPT_CACHE, "_total", {"result": "hit"}) - hits0
            misses = metric_value(metrics.PROMPT_CACHE, "_total", {"result": "miss"}) - misses0
        if (hits, misses) != (pairs, pairs):
            raise RuntimeError(f"expected {pairs} misses then {pairs} hits, the app counted {misses:g} misses and "
                               f"{hits:g} hits")
        miss_lat, hit_lat = result.latencies[0::2], result.latencies[1::2]
        z = torch.randn(1, runtime.subspace.config.d_intrinsic, device=device)
        with torch.no_grad():
            projb = timed(lambda: runtime.subspace.decode(z), args.projb_repeats, device)
        projb_s = median(projb)
        config = runtime.subspace.config
        prompt_bytes = config.n_prompt * config.d_model * runtime.backbone.dtype.itemsize
        projb_params = sum(p.numel() for p in runtime.subspace.proj_b.parameters())

        report = Report(
            "cache_bench", "Soft-prompt cache: predict on a miss vs a hit", device_kind(device),
            context=[
                f"backbone: {setup.label} on {device_description(device)}, {setup.dtype}",
                f"subspace: {setup.subspace_note}; {subspace_shape(runtime)}; Proj_b {projb_params / 1e6:.1f} M "
                f"parameters",
                f"service: {APP}, {redis_description(store.r)}; one request at a time, "
                f"{per_request} input(s) each, {len(labels)} labels; {pairs} tasks, each asked twice (miss, then hit)",
            ],
            header=["measure", "p50", "p99", "mean"])
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        report.add("predict, prompt cache miss (a task's first request)", ms(pct(miss_lat, 50)), ms(pct(miss_lat, 99)),
                   ms(mean(miss_lat)))
        report.add("predict, prompt cache hit", ms(pct(hit_lat, 50)), ms(pct(hit_lat, 99)), ms(mean(hit_lat)))
        diffs = [m - h for m, h in zip(miss_lat, hit_lat, strict=True)]
        report.add("miss - hit, paired by task", ms(pct(diffs, 50)), ms(pct(diffs, 99)), ms(mean(diffs)))
        report.add(f"Proj_b(z) alone, one task ({args.projb_repeats} calls)", ms(projb_s), ms(pct(projb, 99)),
                   ms(mean(projb)))
        share_miss = projb_s / pct(miss_lat, 50)
        report.add("Proj_b share of a predict on a miss (Proj_b p50 / miss p50)", f"{share_miss:.1%}", "-", "-")
        report.add("Proj_b share of a predict on a hit", "0% (not computed)", "-", "-")
        report.notes += [
            f"a cached prompt holds n x d = {config.n_prompt} x {config.d_model} values: {prompt_bytes / 1e6:.2f} MB; "
            f"the default cache of {settings.prompt_cache_size} prompts holds up to "
            f"{prompt_bytes * settings.prompt_cache_size / 1e9:.2f} GB",
            f"the app counted {misses:g} misses and {hits:g} hits over the timed requests, as expected",
        ]
        report.values.update({"miss_p50": pct(miss_lat, 50), "hit_p50": pct(hit_lat, 50), "miss_p99": pct(miss_lat, 99),
                              "hit_p99": pct(hit_lat, 99), "projb_s": projb_s, "projb_share": share_miss,
                              "pairs": pairs, "hits": hits, "misses": misses})
        return finish(report, args, argv)


if __name__ == "__main__":
    main()
