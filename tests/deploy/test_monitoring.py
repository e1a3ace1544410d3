"""deploy/monitoring, statically: the ServiceMonitor and PodMonitor scrape the API and worker pods on their
metrics ports under the job names the rules use; every alert rule and dashboard query is valid PromQL; the
alerts the issue asks for exist, each with a severity, a `for`, and a runbook section in docs/deploy.md;
the dashboard is well formed and shows every signal an alert watches. (Whether the metrics exist at all is
checked against the running service in test_live_metrics.py.)"""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.conftest import API, DOCS, MONITORING, WORKER, Obj, app_routes, container, one, pod_labels, selects
from tests.deploy.queries import (
    GRAFANA_RANGES,
    Query,
    analyse,
    dashboard,
    dashboard_queries,
    grafana_variables,
    panels,
    rule_queries,
)

BOARD = dashboard(MONITORING / "grafana-dashboard.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PREDICT_ROUTE = "/tasks/{task_id}/predict"


def scrape_jobs(monitoring: list[Obj]) -> dict[str, str]:
    """{Deployment name: the `job` label its pods' samples get} from the monitors' relabelings."""
    jobs = {}
    for kind, endpoints, name in (("ServiceMonitor", "endpoints", API), ("PodMonitor", "podMetricsEndpoints", WORKER)):
        (endpoint,) = one(monitoring, kind)["spec"][endpoints]
        (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
        assert relabel.get("action", "replace") == "replace" and "sourceLabels" not in relabel
        jobs[name] = relabel["replacement"]
    return jobs


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_the_monitors_scrape_the_api_and_worker_pods(overlays: dict, monitoring: list) -> None:
    docs = overlays["cpu"]
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert {m["metadata"]["namespace"] for m in monitoring} == {namespace}, "monitors select in their namespace"
    api, worker = one(docs, "Deployment", API), one(docs, "Deployment", WORKER)
    routes = app_routes()

    monitor = one(monitoring, "ServiceMonitor")
    services = [s for s in docs if s["kind"] == "Service" and selects(monitor["spec"]["selector"],
                                                                       s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == [API]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "GET" in routes["/metrics"]

    pod_monitor = one(monitoring, "PodMonitor")
    assert selects(pod_monitor["spec"]["selector"], pod_labels(worker))
    assert not selects(pod_monitor["spec"]["selector"], pod_labels(api))
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container(worker)["ports"]}
    assert endpoint["path"] == "/metrics"
    assert scrape_jobs(monitoring) == {API: "ipt-api", WORKER: "ipt-worker"}


def test_alert_rules_are_valid_promql_with_severity_for_and_a_runbook(monitoring: list) -> None:
    rule = one(monitoring, "PrometheusRule")
    anchors = github_anchors(DOCS.read_text())
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len({a["alert"] for a in alerts}) == len(alerts), "alert names repeat"
    for alert in alerts:
        analyse(alert["alert"], str(alert["expr"]))  # raises on invalid PromQL
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert re.fullmatch(r"\d+m", alert["for"]), alert["alert"]
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], alert["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/deploy.md" and anchor in anchors, f"{alert['alert']}: no runbook section {anchor!r}"


def test_invalid_promql_is_refused() -> None:
    """Control: the parser refuses a misspelt function and an unbalanced expression."""
    for bad in ("histogramquantile(0.99, x_bucket)", "sum(rate(x[5m])", "rate(x[five])"):
        with pytest.raises(ValueError):
            analyse("control", bad)


def test_the_alerts_the_service_needs_exist(monitoring: list) -> None:
    """Error rate, predict p99 latency, queue backlog age, job failure rate, workers down (and API down)."""
    queries = rule_queries(one(monitoring, "PrometheusRule"))

    def alerts(predicate) -> list[str]:  # type: ignore[no-untyped-def]
        return [name for name, q in queries.items() if any(predicate(q, s) for s in q.selectors)]

    error_rate = alerts(lambda q, s: s.metric == "ipt_http_requests_total" and s.values("status", "=~") == ["5.."])
    p99 = alerts(lambda q, s: s.metric == "ipt_http_request_duration_seconds_bucket"
                 and s.values("route") == [PREDICT_ROUTE] and re.search(r"histogram_quantile\(\s*0\.99\s*,", q.expr))
    backlog = alerts(lambda q, s: s.metric == "ipt_ist_queue_oldest_job_age_seconds")
    failures = alerts(lambda q, s: s.metric == "ipt_ist_jobs_total" and "failed|error" in s.values("outcome", "=~"))
    workers_down = alerts(lambda q, s: s.metric == "up" and s.values("job") == ["ipt-worker"])
    api_down = alerts(lambda q, s: s.metric == "up" and s.values("job") == ["ipt-api"])
    found = {"error rate": error_rate, "predict p99": p99, "backlog age": backlog, "job failures": failures,
             "workers down": workers_down, "api down": api_down}
    assert all(found.values()), {k: v for k, v in found.items() if not v}
    assert "ipt-worker" in str(queries[workers_down[0]].expr) and "ipt_ist_queue_length_jobs" in "".join(
        queries[n].expr for n in workers_down), "workers down must matter only while jobs wait"


def test_every_query_selects_the_scrape_jobs_and_real_routes(monitoring: list) -> None:
    jobs = set(scrape_jobs(monitoring).values())
    routes = set(app_routes())
    queries = [*rule_queries(one(monitoring, "PrometheusRule")).values(), *dashboard_queries(BOARD)]
    for query in queries:
        for selector in query.selectors:
            for label, op, value in selector.matchers:
                alternatives = set(value.split("|")) if op in ("=~", "!~") else {value}
                if label == "job":
                    assert op in ("=", "=~") and alternatives <= jobs, f"{query.source}: job {value!r}"
                if label == "route":
                    assert alternatives <= routes, f"{query.source}: {alternatives - routes} are not routes of the app"
            if selector.metric.startswith("ipt_"):
                assert selector.values("job") or selector.values("job", "=~"), f"{query.source}: no job selected"


def test_the_dashboard_is_well_formed(monitoring: list) -> None:
    assert BOARD["uid"] and BOARD["title"] and BOARD["schemaVersion"] >= 36
    variables = {v["name"] for v in BOARD["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    all_panels = panels(BOARD)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE
            used = grafana_variables(target["expr"]) - {v.strip("$") for v in GRAFANA_RANGES}
            assert used <= variables, f"panel {panel['title']!r} uses undefined variables {used - variables}"
    queries = dashboard_queries(BOARD)
    assert len(queries) >= len([p for p in all_panels if p["type"] != "row"])
    # the dashboard shows every signal an alert watches
    alert_metrics = {s.metric for q in rule_queries(one(monitoring, "PrometheusRule")).values() for s in q.selectors}
    board_metrics = {s.metric for q in queries for s in q.selectors}
    assert alert_metrics <= board_metrics, f"alerted on but not on the dashboard: {alert_metrics - board_metrics}"


def test_the_dashboard_ships_in_a_configmap_for_grafanas_sidecar(monitoring: list) -> None:
    config_map = one(monitoring, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = config_map["data"].values()
    assert json.loads(content) == BOARD


def test_queries_are_analysed_fully() -> None:
    """Control for the analysis the metric checks rely on: selectors inside functions, aggregations and both
    sides of binary operators are all found, with their matchers and grouping labels."""
    query: Query = analyse("control", 'sum by (route) (rate(a_total{job="x", route=~"/a|/b"}[5m])) '
                                      '/ on (route) group_left () max without (le) (b_bucket) and on () vector(1)')
    assert [s.metric for s in query.selectors] == ["a_total", "b_bucket"]
    assert query.selectors[0].matchers == (("job", "=", "x"), ("route", "=~", "/a|/b"))
    assert query.grouping == {"route", "le"} and {"rate", "vector"} <= query.functions
