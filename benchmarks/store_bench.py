"""Cost growth with the number of stored tasks: Redis memory per task and predict latency at 1k, 10k, 100k tasks.

Tasks are written straight into a private Redis (pipelined, laid out exactly as service.task_store writes them:
see TaskWriter in benchmarks/served_app.py), spread over `--owners` tenants, while the real app serves predictions
over HTTP on loopback. At each level:
- memory per task: MEMORY USAGE (exact, SAMPLES 0) of a sample of tasks' keys (the hash and the z string) plus
  each tenant's task index (a sorted set) shared out over its tasks; and the whole server's growth (INFO
  used_memory) divided by the tasks written;
- predict latency, one request at a time: on a small working set of tasks (prompt cache hits) and on tasks drawn
  at random among all stored ones, each asked once (cache misses: Proj_b runs);
- the store lookups a predict makes (TaskStore.get + TaskStore.vector), timed alone;
- one GET /metrics (it reads the per-status task counters).
Target (issue 7): at most 1.5 KB (1,500 bytes) per task at d_I = 250; latency flat in the number of tasks. 1,000
tasks with a 250-float z are written too and measured for the target, with z stored as float16 (the default) and
as float32.

Run:
    .venv/bin/python -m benchmarks.store_bench                         # SmolLM2; ~2-3 min on 2 CPU cores
    .venv/bin/python -m benchmarks.store_bench --counts 1000,10000,100000,1000000 --requests 50
    .venv/bin/python -m benchmarks.store_bench --quick                 # smoke run with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from contextlib import ExitStack

import httpx

from benchmarks.load import predict_request, run_load
from benchmarks.model_setup import add_common_arguments, prepare, subspace_shape
from benchmarks.redis_server import redis_description, redis_server
from benchmarks.report import Report, device_description, finish
from benchmarks.served_app import APP, BENCH_OWNER, TaskWriter, category_inputs, served_app, service_settings
from benchmarks.timing import device_kind, ms, pct

TARGET_BYTES = 1500
TARGET_D_INTRINSIC = 250


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--counts", default=None,
                        help="stored-task levels, comma separated (default 1000,10000,100000; --quick: 100,400,2000)")
    parser.add_argument("--requests", type=int, default=None,
                        help="predict requests per mode and level (default: 50 on CPU, 200 on CUDA, 4 with --quick)")
    parser.add_argument("--owners", type=int, default=100,
                        help="tenants the stored tasks are spread over; the served (open-mode) tenant owns one task in "
                             "ten, the others share the rest")
    parser.add_argument("--working-set", type=int, default=4, help="tasks of the cache-hit mode")
    parser.add_argument("--memory-sample", type=int, default=2000, help="tasks whose keys MEMORY USAGE measures")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def memory_per_task(r: object, ids: Sequence[str], owner_keys: Sequence[str], total: int, sample: int,
                    rng: random.Random) -> tuple[float, float, float]:
    """(mean bytes of a task's hash, of its z string, its share of the tenants' index sorted sets)."""
    chosen = rng.sample(list(ids), min(sample, len(ids)))
    pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
    for task_id in chosen:
        pipe.memory_usage(f"ipt:task:{task_id}", samples=0)
        pipe.memory_usage(f"ipt:task:{task_id}:z", samples=0)
    for key in owner_keys:
        pipe.memory_usage(key, samples=0)
    out = pipe.execute()
    hashes, zs, index = out[0:2 * len(chosen):2], out[1:2 * len(chosen):2], out[2 * len(chosen):]
    return sum(hashes) / len(hashes), sum(zs) / len(zs), sum(v or 0 for v in index) / total


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    from service.redis_connection import connect
    from service.runtime import load_runtime, reset_runtime
    from service.task_store import VECTOR_DTYPES, TaskStore

    counts = sorted({int(k) for k in (args.counts or ("100,400,2000" if args.quick else
                                                      "1000,10000,100000")).split(",") if k.strip()})
    owners = [BENCH_OWNER] + [f"tenant{i:04d}" for i in range(1, max(2, args.owners))]

    def owner_of(index: int) -> str:  # one task in ten is the served tenant's
        return BENCH_OWNER if index % 10 == 0 else owners[1 + index % (len(owners) - 1)]
    rng = random.Random(args.seed)
    with ExitStack() as stack:
        stack.callback(reset_runtime)
        setup = prepare(args, stack)
        redis_url = stack.enter_context(redis_server(setup.workdir))
        settings = service_settings(setup, redis_url)
        runtime = load_runtime(settings)
        device = runtime.backbone.device
        n_requests = args.requests or (4 if args.quick else 200 if device.type == "cuda" else 50)
        store = TaskStore(connect(settings))
        r = store.r
        name, labels, inputs = category_inputs()
        d_i = runtime.subspace.config.d_intrinsic
        writer = TaskWriter(store, name, labels, d_i, runtime.artifact_id, args.seed)
        baseline = int(r.info("memory")["used_memory"])
        ids: list[str] = []
        served_ids: list[str] = []  # the open-mode tenant's tasks: those the app can serve
        asked: set[str] = set()
        levels = []
        with served_app(settings) as (base, _app):
            working: list[str] = []
            for level in counts:
                start = time.perf_counter()
                offset = len(ids)
                new = writer.write(level - offset, lambda k, offset=offset: owner_of(offset + k))
                write_s = time.perf_counter() - start
                served_ids += [t for k, t in enumerate(new, start=offset) if owner_of(k) == BENCH_OWNER]
                ids += new
                if not working:
                    working = served_ids[:args.working_set]
                    run_load(base, [predict_request(t, [inputs[k]]) for k, t in enumerate(working * 2)], 1)  # warm
                    asked.update(working)
                hash_b, z_b, index_b = memory_per_task(r, ids, [f"ipt:tenant:{o}:tasks" for o in owners],
                                                       len(ids) + 1, args.memory_sample, rng)
                growth = (int(r.info("memory")["used_memory"]) - baseline) / len(ids)
                fresh = rng.sample([t for t in served_ids if t not in asked], min(n_requests, len(served_ids)
                                                                                 - len(asked)))
                asked.update(fresh)
                lookups = []
                for task_id in fresh:
                    t0 = time.perf_counter()
                    store.get(task_id, BENCH_OWNER)
                    store.vector(task_id)
                    lookups.append(time.perf_counter() - t0)
                hot = run_load(base, [predict_request(working[k % len(working)], [inputs[k % len(inputs)]])
                                      for k in range(n_requests)], 1)
                cold = run_load(base, [predict_request(t, [inputs[k % len(inputs)]]) for k, t in enumerate(fresh)], 1)
                with httpx.Client(base_url=base, trust_env=False, timeout=600) as client:
                    t0 = time.perf_counter()
                    client.get("/metrics").raise_for_status()
                    metrics_s = time.perf_counter() - t0
                levels.append({"tasks": len(ids) + 1, "write_s": write_s, "hash": hash_b, "z": z_b, "index": index_b,
                               "per_task": hash_b + z_b + index_b, "growth": growth, "hot": hot, "cold": cold,
                               "lookup_p50": pct(lookups, 50), "metrics_s": metrics_s})
        # the target is stated at d_I = 250: 1,000 such tasks per vector dtype (the service default first)
        target_rows: dict[str, tuple[float, float, float]] = {}
        for dtype in (store.vector_dtype, *(d for d in VECTOR_DTYPES if d != store.vector_dtype)):
            owner = f"tenant-dI{TARGET_D_INTRINSIC}-{dtype}"
            wide = TaskWriter(TaskStore(r, vector_dtype=dtype), name, labels, TARGET_D_INTRINSIC,
                              runtime.artifact_id, args.seed + 1)
            wide_ids = wide.write(1000, owner)
            target_rows[dtype] = memory_per_task(r, wide_ids, [f"ipt:tenant:{owner}:tasks"], len(wide_ids),
                                                 args.memory_sample, rng)
        kept = store.count_by_status()  # the counters every write kept in step
        t0 = time.perf_counter()
        store.recount_by_status()
        recount_s = time.perf_counter() - t0
        counted = store.count_by_status()  # the same, rebuilt from the tasks themselves
        if kept != counted:
            raise RuntimeError(f"the status counters drifted from the tasks: kept {kept}, counted {counted}")
        total_tasks = sum(counted.values())

        report = Report(
            "store_bench", "Cost growth: Redis memory and predict latency by stored tasks", device_kind(device),
            context=[
                f"backbone: {setup.label} on {device_description(device)}, {setup.dtype}",
                f"subspace: {setup.subspace_note}; {subspace_shape(runtime)}",
                f"store: {redis_description(r)}, private server; tasks spread over {len(owners)} tenants, each task "
                f"as the service stores a trained one (hash + {d_i}-float z + an entry in its tenant's index)",
                f"predict: {APP}, one request at a time, one input, {n_requests} requests "
                f"per mode and level; working set of {len(working)} tasks (cache hits) vs tasks drawn at random among "
                f"the stored ones, each asked once (cache misses)",
            ],
            header=["stored tasks", "memory per task (hash + z + index)", "server growth per task",
                    "predict p50 / p99, working set", "predict p50 / p99, random task", "store lookups p50",
                    "GET /metrics"])
        for lv in levels:
            report.add(f"{lv['tasks']:,}", f"{lv['per_task']:.0f} B ({lv['hash']:.0f} + {lv['z']:.0f} + "
                       f"{lv['index']:.0f})", f"{lv['growth']:.0f} B", f"{ms(lv['hot'].p50)} / {ms(lv['hot'].p99)}",
                       f"{ms(lv['cold'].p50)} / {ms(lv['cold'].p99)}", ms(lv["lookup_p50"]), ms(lv["metrics_s"]))
        for dtype, row in target_rows.items():
            report.add(f"1,000 at d_I = {TARGET_D_INTRINSIC}, {dtype} z", f"{sum(row):.0f} B ({row[0]:.0f} + "
                       f"{row[1]:.0f} + {row[2]:.0f})", "-", "-", "-", "-", "-")
        at_target = sum(target_rows[store.vector_dtype])
        first, last = levels[0], levels[-1]
        report.notes += [
            f"memory per task at d_I = {TARGET_D_INTRINSIC} with the service's default {store.vector_dtype} z: "
            f"{at_target:.0f} B (target at most {TARGET_BYTES:,} B: {'met' if at_target <= TARGET_BYTES else 'NOT met'}"
            f"); with float32 z (IPT_VECTOR_DTYPE=float32) {sum(target_rows['float32']):.0f} B",
            f"predict p50 from {first['tasks']:,} to {last['tasks']:,} stored tasks: working set "
            f"{last['hot'].p50 / first['hot'].p50:.2f}x, random task {last['cold'].p50 / first['cold'].p50:.2f}x "
            f"(flat: about 1.00x)",
            "server growth per task includes Redis's keyspace overhead (two keys per task) and allocator slack, which "
            "MEMORY USAGE leaves out; it jumps when Redis resizes its main dictionary",
            "GET /metrics reads per-status counters (one HGETALL) kept by every task transition; rebuilding them "
            f"from the tasks (one Lua scan, done once for a store that lacks them) took {recount_s * 1000:.0f} ms at "
            f"{total_tasks:,} tasks",
            "write time (pipelined, this script): " + ", ".join(f"{lv['write_s']:.1f} s to {lv['tasks']:,}"
                                                                 for lv in levels),
        ]
        report.values.update({"levels": [{k: (v.p50 if k in ("hot", "cold") else v) for k, v in lv.items()}
                                         for lv in levels], "per_task_at_target": at_target, "d_intrinsic": d_i,
                              "per_task_at_target_by_dtype": {k: sum(v) for k, v in target_rows.items()},
                              "recount_s": recount_s})
        return finish(report, args, argv)


if __name__ == "__main__":
    main()
