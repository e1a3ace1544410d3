"""`ipt serve`: an embedded Redis, one worker and the API in one command, and a shutdown that leaves nothing.

Children: the embedded Redis (unless a Redis URL is given; service/embedded_redis.py) and the worker
(`python -m workers`), each in a session of its own, so that a Ctrl-C in the terminal reaches only this
process, which then stops them in order. The worker also gets SIGTERM from the kernel if this process dies
outright (workers/__main__.py), and RQ's scheduler, which the worker forks, is in the worker's process group.

Signals: the first SIGTERM or SIGINT starts a graceful shutdown, bounded by `shutdown_grace_s`
(IPT_SHUTDOWN_GRACE_S): the API stops taking connections and lets requests in flight finish; the worker gets
SIGTERM (a warm shutdown: its current job may finish) and is killed, with its process group, if it has not
exited when the grace period is nearly over (the job is retried at the next start); then Redis is shut down
(it flushes its AOF), killed if it does not exit. A second SIGTERM or SIGINT forces the exit at once, still
killing both children first. Unlike `uvicorn.run`, nothing re-raises the signal before this cleanup has run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn

from service.settings import Settings

log = logging.getLogger(__name__)

REDIS_STOP_RESERVE_S = 5.0
"""Seconds of the grace period kept for Redis to shut down after the worker."""

FORCED_EXIT_CODE = 1


class Shutdown:
    """What this process was asked: nothing yet, a graceful stop (one signal) or a forced one (two)."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.forced = threading.Event()
        self.server: uvicorn.Server | None = None
        self.started_at: float | None = None

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        if len(self.signals) == 1:
            self.started_at = time.monotonic()
            log.warning("%s: shutting down (a second signal forces the exit)", signal.Signals(sig).name)
            if self.server is not None:
                self.server.should_exit = True
        else:
            log.warning("%s again: forcing the exit", signal.Signals(sig).name)
            self.forced.set()
            if self.server is not None:
                self.server.should_exit = self.server.force_exit = True


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: `Shutdown` drives should_exit / force_exit, and no
    signal is re-raised at the end (uvicorn's re-raise killed `ipt serve` before it stopped its children)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _wait(proc: subprocess.Popen[bytes], until: float, forced: threading.Event) -> bool:
    """Wait for `proc` to exit until the monotonic time `until` or a forced shutdown; whether it exited."""
    while proc.poll() is None:
        if forced.is_set() or time.monotonic() >= until:
            return False
        time.sleep(0.05)
    return True


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group `proc` leads (it and whatever it forked), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def stop_worker(worker: subprocess.Popen[bytes], deadline: float, forced: threading.Event) -> None:
    """Warm shutdown until `deadline` (or a forced exit), then SIGKILL to the worker's process group; also
    when the worker exited by itself, so that nothing it forked (RQ's scheduler) is left."""
    if worker.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signal.SIGTERM)
        if not _wait(worker, deadline, forced):
            log.warning("the worker did not stop in time; killing it (its job is retried at the next start)")
    _kill_group(worker)


def worker_argv(burst: bool = False) -> list[str]:
    """The command line of one IST worker process (workers/__main__.py; settings from IPT_* variables). The
    worker is started as a program, by module path: `service` never imports `workers`."""
    return [sys.executable, "-m", "workers", *(["--burst"] if burst else [])]


def serve_all(settings: Settings, host: str, port: int, say: Callable[[str], object] = print) -> int:
    """Run Redis (embedded unless configured), the worker and the API until a signal; stop them all within
    `settings.shutdown_grace_s`. Returns the exit status. `settings` is not changed: what this run decides (the
    embedded Redis's URL, the API's thread count) goes into a copy."""
    from service.embedded_redis import EmbeddedRedis

    shutdown = Shutdown()
    shutdown.install()
    code = 0
    embedded: EmbeddedRedis | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if not settings.redis_url and not os.environ.get("REDIS_URL"):
            embedded = EmbeddedRedis(settings.data_dir)
            # before torch is imported: fewer threads at the fork
            settings = settings.model_copy(update={"redis_url": embedded.start()})
        from service.app import create_app

        env = {**os.environ, "IPT_REDIS_URL": str(settings.redis_url or os.environ.get("REDIS_URL")),
               "IPT_SUBSPACE": str(settings.subspace), "IPT_EXIT_WITH_PARENT": str(os.getpid())}
        if "IPT_WORKER_METRICS_HOST" not in os.environ:
            env["IPT_WORKER_METRICS_HOST"] = host  # bind where the API binds unless told otherwise
        if settings.torch_threads is None:
            # API and worker in one machine: both taking every core thrash when both work (IST ran ~4x slower
            # while the API predicted). The worker takes every core while the API is idle and half while it
            # predicts (service/core_sharing.py); the API keeps the other half.
            cores = os.cpu_count() or 2
            env["IPT_TORCH_THREADS"] = str(cores)
            env["IPT_WORKER_THREADS_WHEN_API_BUSY"] = str(max(1, cores // 2))
            settings = settings.model_copy(update={"torch_threads": max(1, cores - cores // 2)})
        if shutdown.requested:
            return 0  # a signal during start-up (the cleanup below still runs)
        worker = subprocess.Popen(worker_argv(), env=env, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        _watch_worker(worker, shutdown)
        say(f"worker pid {worker.pid}; Redis at {settings.redis_url}"
            f"{f' (embedded, pid {embedded.pid})' if embedded else ''}; API on http://{host}:{port} (docs at /docs)")
        server = _Server(uvicorn.Config(create_app(settings), host=host, port=port,
                                        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s / 3))))
        shutdown.server = server
        if shutdown.requested:
            server.should_exit = True  # a signal during start-up: start and stop at once
        server.run()
        if not shutdown.requested and not server.started:
            log.error("the API could not start (is port %d free?)", port)
            code = 1
    finally:
        began = shutdown.started_at or time.monotonic()
        deadline = began + settings.shutdown_grace_s
        if worker is not None:
            stop_worker(worker, deadline - REDIS_STOP_RESERVE_S, shutdown.forced)
        if embedded is not None:
            remaining = max(0.5, deadline - time.monotonic())
            embedded.stop(timeout_s=2.0 if shutdown.forced.is_set() else remaining)
        log.info("ipt serve stopped in %.1f s", time.monotonic() - began)
    return FORCED_EXIT_CODE if shutdown.forced.is_set() else code


def _watch_worker(worker: subprocess.Popen[bytes], shutdown: Shutdown) -> None:
    """Log when the worker exits while the service runs: tasks would stay queued (see /readyz)."""

    def watch() -> None:
        code = worker.wait()
        if not shutdown.requested:
            log.error("the worker exited with status %s; new tasks stay queued until `ipt serve` is restarted "
                      "(/readyz says degraded)", code)

    threading.Thread(target=watch, name="ipt-worker-watch", daemon=True).start()
