"""The PromQL of deploy/monitoring, parsed with a real PromQL parser (promql-parser): each alert rule's and
each dashboard query's metric selectors (metric, label matchers) and the labels it groups or matches on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser

# what Grafana substitutes before a query reaches Prometheus; ranges become a valid duration to parse
GRAFANA_RANGES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
GRAFANA_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value), op one of = != =~ !~

    def values(self, label: str, op: str = "=") -> list[str]:
        return [v for name, o, v in self.matchers if name == label and o == op]


@dataclass
class Query:
    source: str  # where it comes from, for messages
    expr: str
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # by / without / on / ignoring / group_left / group_right
    functions: set[str] = field(default_factory=set)


_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def analyse(source: str, expr: str) -> Query:
    """Parse `expr` (raises ValueError when it is not valid PromQL) and collect what it selects."""
    query = Query(source, expr)

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple((m.name, _OPS[str(m.op)], m.value) for m in node.matchers.matchers)
            assert node.name, f"{source}: a selector without a metric name"
            query.selectors.append(Selector(node.name, matchers))
        elif isinstance(node, promql_parser.AggregateExpr | promql_parser.BinaryExpr) and node.modifier is not None:
            modifier = node.modifier
            if isinstance(node, promql_parser.AggregateExpr):
                query.grouping.update(modifier.labels)
            else:
                if modifier.matching is not None:
                    query.grouping.update(modifier.matching.labels)
                query.grouping.update(modifier.group_labels or [])
        elif isinstance(node, promql_parser.Call):
            query.functions.add(node.func.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return query


def rule_queries(prometheus_rule: dict) -> dict[str, Query]:
    """{alert name: its expression analysed}."""
    out = {}
    for group in prometheus_rule["spec"]["groups"]:
        for rule in group["rules"]:
            out[rule["alert"]] = analyse(f"alert {rule['alert']}", str(rule["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_RANGES.items():
        expr = expr.replace(f"[{variable}]", f"[{value}]")
    return expr


def grafana_variables(text: str) -> set[str]:
    return {a or b for a, b in GRAFANA_VARIABLE.findall(text)}


def dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def dashboard_queries(board: dict) -> list[Query]:
    """Every panel target's expression, and the metric and label of each query variable's label_values()."""
    out = []
    for panel in panels(board):
        for target in panel.get("targets", []):
            out.append(analyse(f"panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"])))
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = LABEL_VALUES.match(definition)
        assert match, f"variable {variable['name']}: only label_values(selector, label) is supported: {definition}"
        query = analyse(f"variable {variable['name']}", match[1])
        query.grouping.add(match[2])
        out.append(query)
    return out
