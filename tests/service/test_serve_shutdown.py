"""`ipt serve` as a user runs it (a real subprocess, a tiny model, its embedded Redis) stopped by signals:
SIGTERM or SIGINT leaves no child process (worker, RQ's scheduler, redis-server) and no listening port,
within the grace period; a second SIGTERM forces the exit at once even while the worker cannot stop. Each run
also checks the auth mode that configured API keys imply. Children are found by a marker in their
environment (every child inherits it), so that none escapes by leaving the process tree or group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from service.embedded_redis import EmbeddedRedis, EmbeddedRedisError, redis_server_binary
from service.settings import Settings, hash_api_key

START_TIMEOUT_S = 240.0  # two processes import torch on a busy 2-core machine
GRACE_S = 20.0
KEY = "serve-test-key"
MARKER = "IPT_SERVE_TEST_MARKER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def marked(marker: str, data_dir: Path) -> list[psutil.Process]:
    """Live processes whose environment carries this run's marker, or whose command line names its data
    directory (redis-server overwrites its environment with its process title, which names its socket);
    zombies count as gone."""
    found = []
    for proc in psutil.process_iter():
        with suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER) == marker or str(data_dir) in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    marker: str
    api_port: int
    metrics_port: int
    log: Path
    data_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def children(self) -> list[psutil.Process]:
        return [p for p in marked(self.marker, self.data_dir) if p.pid != self.proc.pid]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def ipt_serve(service_settings: Settings, tmp: Path, *args: str, **env: str) -> Iterator[Serve]:
    """`ipt serve ARGS` with its own data directory and ports, ready (a live worker); killed if still running."""
    marker = uuid.uuid4().hex
    api_port, metrics_port = free_port(), free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IPT_") and k != "REDIS_URL"}
    environment.update({MARKER: marker, "IPT_BACKBONE": service_settings.backbone, "IPT_DEVICE": "cpu",
                        "IPT_SUBSPACE": str(service_settings.subspace), "IPT_DATA_DIR": str(tmp / "data"),
                        "IPT_WORKER_METRICS_PORT": str(metrics_port), "IPT_SHUTDOWN_GRACE_S": str(GRACE_S),
                        "IPT_API_KEYS": json.dumps({hash_api_key(KEY): "serve-test"}), "OMP_NUM_THREADS": "1",
                        **env})
    log = tmp / "serve.log"
    ipt = str(Path(sys.executable).parent / "ipt")
    with log.open("wb") as out:
        proc = subprocess.Popen([ipt, "serve", "--port", str(api_port), *args], env=environment, stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp)
    serve = Serve(proc, marker, api_port, metrics_port, log, tmp / "data")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ipt serve exited with {proc.returncode}:\n{serve.output()[-4000:]}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{serve.base}/readyz", timeout=5).json().get("workers") == 1:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"ipt serve did not get ready:\n{serve.output()[-4000:]}")
            time.sleep(0.5)
        # RQ's scheduler process starts just after the worker's first heartbeat
        deadline = time.monotonic() + 30
        while len(serve.children()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield serve
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in marked(marker, serve.data_dir):  # never leave anything behind, even when the test failed
            with suppress(psutil.Error):
                child.kill()


def assert_nothing_left(serve: Serve, ports: list[int], wait_s: float = 10.0) -> None:
    """No marked process and no listening port, within `wait_s`: a process already past reading its environment
    (its memory is released first) can still hold its sockets for a moment before the kernel closes them."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and (marked(serve.marker, serve.data_dir) or any(map(listening, ports))):
        time.sleep(0.2)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in marked(serve.marker, serve.data_dir)]
    assert not left, f"processes left behind: {left}\n{serve.output()[-3000:]}"
    assert not [port for port in ports if listening(port)], f"still listening: {ports}"


def stop(serve: Serve, sig: signal.Signals, timeout: float) -> tuple[int | None, float]:
    start = time.monotonic()
    serve.proc.send_signal(sig)
    try:
        code = serve.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - start


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_everything_within_the_grace_period(sig: signal.Signals, service_settings: Settings,
                                                           tmp_path: Path) -> None:
    with ipt_serve(service_settings, tmp_path) as serve:
        children = serve.children()
        names = sorted(" ".join(p.cmdline()) for p in children)
        assert len(children) == 3, names  # redis-server, the worker, RQ's scheduler (forked by the worker)
        assert any("redis-server" in n for n in names) and sum("-m workers" in n for n in names) == 2, names
        ports = [serve.api_port, serve.metrics_port]
        assert all(listening(port) for port in ports)
        # configured keys mean auth is on: no key is a 401, the key works, and the log says which mode
        assert httpx.get(f"{serve.base}/tasks").status_code == 401
        assert httpx.get(f"{serve.base}/tasks", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert "API keys required (1 configured)" in serve.output()

        code, seconds = stop(serve, sig, GRACE_S + 10)
        assert code == 0, (code, serve.output()[-3000:])
        assert seconds <= GRACE_S, seconds
        assert_nothing_left(serve, ports)
        assert not (serve.data_dir / "redis.sock").exists()


def test_a_second_sigterm_forces_the_exit(service_settings: Settings, tmp_path: Path) -> None:
    """The worker is frozen (SIGSTOP), so the graceful path would wait for it until the grace period is nearly
    over; a second SIGTERM ends everything at once. Also: IPT_OPEN_MODE=false keeps auth on."""
    with ipt_serve(service_settings, tmp_path, IPT_OPEN_MODE="false", IPT_SHUTDOWN_GRACE_S="300") as serve:
        assert httpx.get(f"{serve.base}/tasks").status_code == 401
        worker = next(p for p in serve.children() if p.ppid() == serve.proc.pid and "-m workers" in
                      " ".join(p.cmdline()))
        worker.suspend()
        code, _ = stop(serve, signal.SIGTERM, 5)
        assert code is None, "the first SIGTERM should wait for the frozen worker"
        code, seconds = stop(serve, signal.SIGTERM, 30)
        assert code is not None and code != 0, (code, serve.output()[-3000:])
        assert seconds < 20, seconds
        assert "forcing the exit" in serve.output()
        assert_nothing_left(serve, [serve.api_port, serve.metrics_port])


def test_children_follow_an_ipt_serve_killed_outright(service_settings: Settings, tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the kernel tells the worker and Redis (parent-death signal), which stop."""
    with ipt_serve(service_settings, tmp_path) as serve:
        assert len(serve.children()) == 3
        serve.proc.kill()
        serve.proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while marked(serve.marker, serve.data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_nothing_left(serve, [serve.api_port, serve.metrics_port])


def test_open_mode_must_be_asked_for(service_settings: Settings, tmp_path: Path) -> None:
    """With keys configured, --open is the only way to serve requests without a key (as tenant 'public'), and
    the log says so; a wrong key is still a 401."""
    with ipt_serve(service_settings, tmp_path, "--open") as serve:
        assert httpx.get(f"{serve.base}/tasks").status_code == 200
        assert httpx.get(f"{serve.base}/tasks", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert "OPEN MODE" in serve.output()
        code, _ = stop(serve, signal.SIGTERM, GRACE_S + 10)
        assert code == 0
        assert_nothing_left(serve, [serve.api_port, serve.metrics_port])


def test_the_embedded_redis_is_one_per_data_dir_and_replaces_an_orphan(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = EmbeddedRedis(data)
    first.start()
    try:
        with pytest.raises(EmbeddedRedisError, match="another `ipt serve`"):
            EmbeddedRedis(data).start()
    finally:
        first.stop()
    assert first.process is None and not listening_unix(data / "redis.sock")
    # a server an `ipt serve` killed outright left behind on the socket: shut down and replaced
    orphan = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", str(data / "redis.sock"),
                               "--save", "", "--dir", str(data)], stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not listening_unix(data / "redis.sock") and time.monotonic() < deadline:
            time.sleep(0.05)
        second = EmbeddedRedis(data)
        second.start()
        assert orphan.wait(timeout=15) == 0  # it was asked to shut down, and did
        assert second.pid != orphan.pid and listening_unix(data / "redis.sock")
        second.stop()
    finally:
        if orphan.poll() is None:
            orphan.kill()


def listening_unix(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        return path.exists() and s.connect_ex(str(path)) == 0
