"""Structural schemas for the custom resources of deploy/ that the Kubernetes schemas of kubernetes-validate do
not cover: KEDA's ScaledObject and TriggerAuthentication, the Prometheus Operator's ServiceMonitor, PodMonitor
and PrometheusRule. They are not the projects' full CRD schemas: they hold the fields these manifests may
use, with their types, required fields and allowed values, and refuse any other field (a misspelt field
fails instead of being ignored by the operator). Field names follow the KEDA 2.x and Prometheus Operator
monitoring.coreos.com/v1 CRDs."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STRING = {"type": "string", "minLength": 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = {"type": "string",
            "pattern": r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"}


def closed(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    """An object with exactly these optional properties (and these required)."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "namespace": STRING, "labels": STRING_MAP, "annotations": STRING_MAP}}


def resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return closed({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA,
                   "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))


LABEL_SELECTOR = closed({"matchLabels": {**STRING_MAP, "minProperties": 1}})
RELABEL_ACTIONS = ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                   "uppercase", "keepequal", "dropequal"]
RELABELING = closed({
    "action": {"enum": RELABEL_ACTIONS + [a.capitalize() for a in RELABEL_ACTIONS]},
    "sourceLabels": {"type": "array", "items": STRING},
    "separator": {"type": "string"}, "targetLabel": STRING, "regex": {"type": "string"},
    "modulus": {"type": "integer", "minimum": 1}, "replacement": {"type": "string"},
})
SCRAPE = {
    "path": {"type": "string", "pattern": "^/"}, "scheme": {"enum": ["http", "https"]},
    "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"},
    "relabelings": {"type": "array", "items": RELABELING},
    "metricRelabelings": {"type": "array", "items": RELABELING},
}
NAMESPACE_SELECTOR = closed({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": STRING}})

SERVICE_MONITOR = resource("monitoring.coreos.com/v1", "ServiceMonitor", closed({
    "selector": LABEL_SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR, "jobLabel": STRING,
    "targetLabels": {"type": "array", "items": STRING}, "podTargetLabels": {"type": "array", "items": STRING},
    "sampleLimit": {"type": "integer", "minimum": 0},
    "endpoints": {"type": "array", "minItems": 1, "items": closed(
        {"port": STRING, "targetPort": {"type": ["string", "integer"]}, **SCRAPE})},
}, ("selector", "endpoints")))

POD_MONITOR = resource("monitoring.coreos.com/v1", "PodMonitor", closed({
    "selector": LABEL_SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR, "jobLabel": STRING,
    "podTargetLabels": {"type": "array", "items": STRING}, "sampleLimit": {"type": "integer", "minimum": 0},
    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": closed(
        {"port": STRING, "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535}, **SCRAPE})},
}, ("selector", "podMetricsEndpoints")))

RULE = {
    "type": "object", "additionalProperties": False,
    "properties": {"alert": STRING, "record": STRING, "expr": {"type": ["string", "integer"]}, "for": DURATION,
                   "keep_firing_for": DURATION, "labels": STRING_MAP, "annotations": STRING_MAP},
    "required": ["expr"],
    "oneOf": [{"required": ["alert"], "not": {"required": ["record"]}},
              {"required": ["record"], "not": {"required": ["alert"]}}],
}
PROMETHEUS_RULE = resource("monitoring.coreos.com/v1", "PrometheusRule", closed({
    "groups": {"type": "array", "minItems": 1, "items": closed(
        {"name": STRING, "interval": DURATION, "limit": {"type": "integer"},
         "rules": {"type": "array", "minItems": 1, "items": RULE}}, ("name", "rules"))},
}, ("groups",)))

# KEDA: every trigger's metadata is a map of strings; the redis (lists) scaler's keys are closed.
REDIS_TRIGGER_METADATA = closed({key: STRING for key in (
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv", "passwordFromEnv",
    "listName", "listLength", "activationListLength", "enableTLS", "unsafeSsl", "databaseIndex")},
    ("listName", "listLength"))
TRIGGER = closed({
    "type": STRING, "name": STRING, "metadata": STRING_MAP, "useCachedMetrics": {"type": "boolean"},
    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
    "authenticationRef": closed({"name": STRING, "kind": {"enum": ["TriggerAuthentication",
                                                                   "ClusterTriggerAuthentication"]}}, ("name",)),
}, ("type", "metadata"))
SCALED_OBJECT = resource("keda.sh/v1alpha1", "ScaledObject", closed({
    "scaleTargetRef": closed({"name": STRING, "apiVersion": STRING, "kind": STRING, "envSourceContainerName": STRING},
                             ("name",)),
    "pollingInterval": {"type": "integer", "minimum": 1}, "cooldownPeriod": {"type": "integer", "minimum": 0},
    "initialCooldownPeriod": {"type": "integer", "minimum": 0}, "idleReplicaCount": {"type": "integer", "minimum": 0},
    "minReplicaCount": {"type": "integer", "minimum": 0}, "maxReplicaCount": {"type": "integer", "minimum": 1},
    "fallback": closed({"failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0}}, ("failureThreshold", "replicas")),
    # `behavior` is an autoscaling/v2 HPA behavior: the test checks it against the Kubernetes schema
    "advanced": closed({"restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": closed({"name": STRING, "behavior": {"type": "object"}})}),
    "triggers": {"type": "array", "minItems": 1, "items": TRIGGER},
}, ("scaleTargetRef", "triggers")))
TRIGGER_AUTHENTICATION = resource("keda.sh/v1alpha1", "TriggerAuthentication", closed({
    "secretTargetRef": {"type": "array", "minItems": 1, "items": closed(
        {"parameter": STRING, "name": STRING, "key": STRING}, ("parameter", "name", "key"))},
    "env": {"type": "array", "items": closed({"parameter": STRING, "name": STRING, "containerName": STRING},
                                             ("parameter", "name"))},
}))
REDIS_AUTH_PARAMETERS = {"password", "username", "host", "address", "port", "tls", "ca", "cert", "key"}

SCHEMAS: dict[str, Schema] = {
    "ServiceMonitor": SERVICE_MONITOR, "PodMonitor": POD_MONITOR, "PrometheusRule": PROMETHEUS_RULE,
    "ScaledObject": SCALED_OBJECT, "TriggerAuthentication": TRIGGER_AUTHENTICATION,
}
