"""The worker entry point (`ipt worker`).

It uses RQ's SimpleWorker: jobs run in the worker process itself instead of a forked child per job. A
forking worker would reload (or share by fork) the model for every job, and CUDA cannot be initialised
again in a forked child; with SimpleWorker the backbone and Proj_b are loaded once, at start-up, and
every job reuses them. Job timeouts still apply (SIGALRM-based death penalty in the main thread), jobs of
a worker that died are retried (Retry on enqueue + RQ's abandoned-job handling), and SIGTERM triggers a
warm shutdown: the current job finishes, then the worker exits.

Once the model is loaded the worker beats into Redis (service/worker_liveness.py) until it stops, so that the
API can tell whether any worker will train what it queues. A worker whose metrics port is taken still works
(it logs the error): a missing metrics endpoint is a monitoring problem, a dead worker is an outage.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from rq import Queue, SimpleWorker

from service.redis_connection import connect
from service.runtime import load_runtime
from service.settings import Settings
from service.worker_liveness import Heartbeat
from workers.log_redaction import install_job_log_redaction
from workers.process_settings import set_process_settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings | None = None, burst: bool = False) -> bool:
    """Load the model once, then process IST jobs until stopped (or, with burst, until the queue is empty)."""
    settings = settings or Settings()
    install_job_log_redaction()  # a failed job's log record must not carry the user's examples
    if settings.worker_metrics_port and not burst:
        start_metrics_server(settings)
    connection = connect(settings)
    set_process_settings(settings)
    load_runtime(settings)  # before the first job, so that no job pays the load
    import workers.jobs  # noqa: F401  RQ imports a job's function on first use; ~1.7 s the first job paid
    name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    worker = SimpleWorker([Queue(settings.queue_name, connection=connection)], connection=connection, name=name)
    heartbeat = Heartbeat(connection, settings.queue_name, name, settings.worker_heartbeat_interval_s,
                          settings.worker_heartbeat_ttl_s).start()
    try:
        return bool(worker.work(burst=burst, with_scheduler=True))
    finally:
        heartbeat.stop()


def start_metrics_server(settings: Settings) -> bool:
    """Serve this worker's /metrics (ipt_ist_jobs_total, ipt_ist_job_duration_seconds); False, with the error
    logged, when the port cannot be bound (the worker goes on without it)."""
    from prometheus_client import start_http_server

    try:
        start_http_server(int(settings.worker_metrics_port or 0), addr=settings.worker_metrics_host)
    except OSError as exc:
        log.error("worker metrics on %s:%s unavailable (%s); the worker runs without them (set "
                  "IPT_WORKER_METRICS_PORT to a free port, or 0 for none)", settings.worker_metrics_host,
                  settings.worker_metrics_port, exc)
        return False
    log.info("worker metrics on http://%s:%s/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
    return True
