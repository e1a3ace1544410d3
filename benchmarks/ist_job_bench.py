"""IST job: the time from POST /tasks to `succeeded` for a 16-shot 3-label task, through the running app and a real
worker.

The real app (uvicorn on loopback) and a real worker process (`python -m workers`, as `ipt worker` runs it) share a
private redis-server. The worker is started first and waited for (its model load is reported apart, it is not part
of a job). Then, `--repeats` times, one task is created with POST /tasks (the category task of the tests: 16
examples per label for training, 8 per label for dev) and polled with GET /tasks/{id} until it is final. The time
to `succeeded` runs from just before the POST to the task's `finished_at` (written by the worker), so the polling
interval does not blur it; the record also splits it into queue wait and training.

Training settings: by default none are sent, so the service's defaults apply (Gauss-Newton IST, up to 12 iterations,
patience 4); --optimizer and the other training flags send what they name (e.g. `--optimizer adamw --max-steps 200
--eval-every 10` for the earlier default). The bare model's dev score, which the worker measures, is reported beside
the learned one.

Run:
    .venv/bin/python -m benchmarks.ist_job_bench                        # SmolLM2 + shipped subspace; ~3 min, 2 CPUs
    .venv/bin/python -m benchmarks.ist_job_bench --repeats 3 --subspace DIR
    .venv/bin/python -m benchmarks.ist_job_bench --quick                # smoke run with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from benchmarks.model_setup import add_common_arguments, prepare, subspace_shape
from benchmarks.redis_server import redis_description, redis_server
from benchmarks.report import ROOT, Report, device_description, finish
from benchmarks.served_app import APP, served_app, service_settings
from benchmarks.timing import device_kind, median, ms

QUEUE = "ipt-bench-ist"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, random_subspace=False)
    parser.add_argument("--repeats", type=int, default=None, help="tasks created one after the other (default 1 on "
                                                                    "CPU, 3 on CUDA)")
    parser.add_argument("--optimizer", default=None, choices=["gauss_newton", "lbfgs", "adamw"],
                        help="IST optimiser (default: none sent, the service's default)")
    parser.add_argument("--max-iterations", type=int, default=None, help="gauss_newton / lbfgs iterations (--quick 2)")
    parser.add_argument("--max-steps", type=int, default=None, help="adamw max steps")
    parser.add_argument("--eval-every", type=int, default=None, help="adamw: steps between dev evaluations")
    parser.add_argument("--batch-size", type=int, default=None, help="adamw: rows per step")
    parser.add_argument("--learning-rate", type=float, default=None, help="adamw learning rate")
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--poll-s", type=float, default=None, help="polling interval (default 0.5 s; --quick 0.05 s)")
    parser.add_argument("--worker-timeout-s", type=float, default=900, help="how long the worker may take to start")
    args = parser.parse_args(argv)
    if args.quick and args.max_iterations is None and args.optimizer in (None, "gauss_newton", "lbfgs"):
        args.max_iterations = 2
    args.poll_s = args.poll_s or (0.05 if args.quick else 0.5)
    return args


def worker_env(settings: Any) -> dict[str, str]:
    """The environment of `python -m workers`: the calling environment without its IPT_* variables, plus the
    settings under test (a worker reads its settings from the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPT_")}
    env.update({"IPT_REDIS_URL": str(settings.redis_url), "IPT_SUBSPACE": str(settings.subspace),
                "IPT_BACKBONE": settings.backbone, "IPT_DTYPE": settings.dtype, "IPT_QUEUE_NAME": settings.queue_name,
                "IPT_WORKER_METRICS_PORT": "0"})
    if settings.device:
        env["IPT_DEVICE"] = settings.device
    if settings.torch_threads:
        env["IPT_TORCH_THREADS"] = str(settings.torch_threads)
    return env


def start_worker(settings: Any, log_path: Path, timeout: float) -> tuple[subprocess.Popen[bytes], float]:
    """Start a worker and wait until it has registered with RQ (after loading the model); returns it and the
    seconds that took."""
    import redis
    from rq import Queue, Worker

    log = log_path.open("wb")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "workers"], env=worker_env(settings), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    connection = redis.Redis.from_url(str(settings.redis_url))
    queue = Queue(settings.queue_name, connection=connection)
    while not Worker.all(connection=connection, queue=queue):
        if proc.poll() is not None or time.perf_counter() - start > timeout:
            stop_worker(proc)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the worker did not start (exit code {proc.returncode}); its log ends with:\n{tail}")
        time.sleep(0.1)
    return proc, time.perf_counter() - start


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: RQ's warm shutdown
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    from ipt_engine.testing import RELATED, TARGET, category_task
    from service.runtime import reset_runtime

    task = category_task(TARGET[0], TARGET[1], seed=len(RELATED), train_per_label=16, dev_per_label=8)
    body: dict[str, Any] = {
        "name": task.name, "kind": "classification", "labels": list(task.labels or ()),
        "train": [{"input": e.input, "output": e.output} for e in task.train],
        "dev": [{"input": e.input, "output": e.output} for e in task.dev],
    }
    training = {k: v for k, v in (("optimizer", args.optimizer), ("max_iterations", args.max_iterations),
                                  ("max_steps", args.max_steps), ("eval_every", args.eval_every),
                                  ("batch_size", args.batch_size), ("learning_rate", args.learning_rate),
                                  ("patience", args.patience)) if v is not None}
    if training:
        body["training"] = training
    with ExitStack() as stack:
        stack.callback(reset_runtime)
        setup = prepare(args, stack, random_subspace=False)
        redis_url = stack.enter_context(redis_server(setup.workdir))
        settings = service_settings(setup, redis_url, queue_name=QUEUE)
        worker, worker_start_s = start_worker(settings, setup.workdir / "worker.log", args.worker_timeout_s)
        stack.callback(stop_worker, worker)
        base, app = stack.enter_context(served_app(settings))
        runtime = app.state.runtime
        device = runtime.backbone.device
        repeats = args.repeats or (3 if device.type == "cuda" else 1)
        runs: list[dict[str, Any]] = []
        with httpx.Client(base_url=base, trust_env=False, timeout=60) as client:
            for _ in range(repeats):
                posted_at = time.time()
                answer = client.post("/tasks", json=body)
                post_s = time.time() - posted_at
                if answer.status_code != 202:
                    raise RuntimeError(f"POST /tasks: {answer.status_code} {answer.text[:500]}")
                task_id = answer.json()["id"]
                while True:
                    record = client.get(f"/tasks/{task_id}").json()
                    if record["status"] in ("succeeded", "failed", "cancelled"):
                        seen_s = time.time() - posted_at
                        break
                    if time.time() - posted_at > 3 * 3600:
                        raise RuntimeError(f"task {task_id} still {record['status']} after 3 hours")
                    time.sleep(args.poll_s)
                if record["status"] != "succeeded":
                    raise RuntimeError(f"task {task_id} ended {record['status']}: {record.get('error')}")
                runs.append({"total": record["finished_at"] - posted_at, "seen": seen_s, "post": post_s,
                             "queued": record["started_at"] - record["created_at"],
                             "training": record["finished_at"] - record["started_at"], "steps": record["steps"],
                             "dev": record["dev_score"], "bare_dev": record["bare_dev_score"]})

        sent = ", ".join(f"{k} {v}" for k, v in training.items()) if training else "none sent: the service's defaults"
        report = Report(
            "ist_job_bench", "IST job: POST /tasks to succeeded", device_kind(device),
            context=[
                f"backbone: {setup.label} on {device_description(device)} (worker and app on the same machine), "
                f"{setup.dtype}",
                f"subspace: {setup.subspace_note}; {subspace_shape(runtime)}",
                f"task: {task.name}, {len(body['labels'])} labels, {len(task.train)} train + {len(task.dev)} dev "
                f"examples (16-shot); training settings: {sent}",
                f"service: {APP}, one `python -m workers` process, "
                f"{redis_description(app.state.store.r)}; the task was polled every {args.poll_s:g} s",
            ],
            header=["run", "POST -> succeeded", "queued", "training (worker)", "steps", "dev accuracy",
                    "bare model dev", "seen by the client", "POST answered in"])
        for k, run in enumerate(runs, start=1):
            report.add(k, ms(run["total"]), ms(run["queued"]), ms(run["training"]), run["steps"], f"{run['dev']:.3f}",
                       f"{run['bare_dev']:.3f}", ms(run["seen"]), ms(run["post"]))
        if len(runs) > 1:
            report.add("median", ms(median([r["total"] for r in runs])), ms(median([r["queued"] for r in runs])),
                       ms(median([r["training"] for r in runs])), "-", "-", "-", ms(median([r["seen"] for r in runs])),
                       ms(median([r["post"] for r in runs])))
        report.notes += [
            f"worker start before the first job (imports, model and subspace load, RQ registration): "
            f"{worker_start_s:.1f} s; not part of any job",
            "POST -> succeeded: from just before the POST to the task's finished_at; queued: created_at to started_at; "
            "training: started_at to finished_at (dev evaluations included)",
            "queued: the worker's poll of the queue and its claim of the task; the job module is imported at worker "
            "start (the first job used to pay ~1.7 s for it)",
        ]
        report.values.update({"runs": runs, "worker_start_s": worker_start_s, "median_total": median(
            [r["total"] for r in runs])})
        return finish(report, args, argv)


if __name__ == "__main__":
    main()
