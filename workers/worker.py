"""The worker entry point (`ipt worker`).

It uses RQ's SimpleWorker: jobs run in the worker process itself instead of a forked child per job. A
forking worker would reload (or share by fork) the model for every job, and CUDA cannot be initialised
again in a forked child; with SimpleWorker the backbone and Proj_b are loaded once, at start-up, and
every job reuses them. Job timeouts still apply (SIGALRM-based death penalty in the main thread), jobs of
a worker that died are retried (Retry on enqueue + RQ's abandoned-job handling), and SIGTERM triggers a
warm shutdown: the current job finishes, then the worker exits.
"""

from __future__ import annotations

import logging

from rq import Queue, SimpleWorker

from service.redis_connection import connect
from service.settings import Settings
from workers.log_redaction import install_job_log_redaction
from workers.runtime import load_runtime, set_process_settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings | None = None, burst: bool = False) -> bool:
    """Load the model once, then process IST jobs until stopped (or, with burst, until the queue is empty)."""
    settings = settings or Settings()
    install_job_log_redaction()  # a failed job's log record must not carry the user's examples
    if settings.worker_metrics_port and not burst:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port)  # ipt_ist_jobs_total, ipt_ist_job_duration_seconds
    connection = connect(settings)
    set_process_settings(settings)
    load_runtime(settings)  # before the first job, so that no job pays the load
    import workers.jobs  # noqa: F401  RQ imports a job's function on first use; ~1.7 s the first job paid
    worker = SimpleWorker([Queue(settings.queue_name, connection=connection)], connection=connection)
    return bool(worker.work(burst=burst, with_scheduler=True))
