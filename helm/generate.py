"""Write the chart's generated files from the product itself, so they cannot drift:

- ``asgi-supervise/files/profiles.json``: each built-in profile's effective settings
  (what ``asgi-supervise config --json --profile NAME`` says), which the templates read to
  derive the drain delay and terminationGracePeriodSeconds the pod will really use.
- ``asgi-supervise/values.schema.json``: the values schema. Every level is closed
  (``additionalProperties: false``); the ``config`` map accepts exactly the settings the
  chart has no first-class value for, typed as the settings model types them.

usage: python helm/generate.py [--check]    (--check: exit 1 if a file is out of date)
CI runs the check (tests/e2e/test_helm_chart.py); run this after changing a setting or a
profile.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from asgi_supervise import profiles
from asgi_supervise.config import sources
from asgi_supervise.config.settings import FIELDS, Settings

CHART = Path(__file__).parent / "asgi-supervise"

# Settings the chart writes itself, from first-class values (one way to set each), or that
# must hold in a pod whatever the values say (the ports the probes use). The `config` map
# cannot name them.
CHART_OWNED = {
    "app": "app",
    "host": "(the chart: 0.0.0.0, reachable by the Service)",
    "port": "ports.http",
    "uds": "(the chart binds ports.http)",
    "fd": "(the chart binds ports.http)",
    "metrics": "(the chart: on, for the probes)",
    "metrics_host": "(the chart: 0.0.0.0, reachable by the kubelet)",
    "metrics_port": "ports.metrics",
    "workers": "workers",
    "drain_delay": "drain.delaySeconds",
    "graceful_timeout": "drain.gracefulTimeoutSeconds",
    "log_format": "logFormat",
    "forwarded_allow_ips": "forwardedAllowIps",
    "max_requests": "recycling.maxRequests",
    "max_requests_jitter": "recycling.maxRequestsJitter",
    "max_worker_lifetime": "recycling.maxWorkerLifetimeSeconds",
    "max_worker_lifetime_jitter": "recycling.maxWorkerLifetimeJitterSeconds",
    "max_worker_memory": "recycling.maxWorkerMemoryMiB",
    "replicas": "(the chart: autoscaling.maxReplicas or replicaCount)",
    "db_max_connections": "database.maxConnections",
    "db_reserved_connections": "database.reservedConnections",
    "db_pool_size": "database.poolSize",
}
# What the templates need from each profile.
PROFILE_KEYS = ("drain_delay", "graceful_timeout", "workers", "log_format", "reload")


def profile_settings() -> dict[str, dict[str, Any]]:
    out = {}
    with tempfile.TemporaryDirectory() as empty:  # no asgi-supervise.toml, no environment
        for name in profiles.names():
            loaded = sources.load({}, profile=name, environ={}, cwd=Path(empty))
            values = loaded.settings.model_dump(mode="json")
            out[name] = {key: values[key] for key in PROFILE_KEYS}
    return out


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def config_schema() -> dict[str, Any]:
    """The `config` map: every other setting, kebab-case as in asgi-supervise.toml."""
    model = Settings.model_json_schema()["properties"]
    props = {}
    for name in FIELDS:
        if name in CHART_OWNED:
            continue
        spec = copy.deepcopy(model[name])
        description = spec.get("description", "")
        for key in ("aliases", "default", "group", "secret", "title", "description"):
            spec.pop(key, None)
        if {"type": "null"} not in spec.get("anyOf", []):  # null: leave it to the profile
            spec = {"anyOf": [spec, {"type": "null"}]}
        spec["description"] = description
        props[_kebab(name)] = spec
    return {
        "type": "object",
        "description": "Any other asgi-supervise setting, kebab-case as in asgi-supervise.toml; "
        "null leaves the profile's value. Settings with a first-class value are not "
        "accepted here: " + ", ".join(f"{_kebab(k)} -> {v}" for k, v in CHART_OWNED.items()),
        "additionalProperties": False,
        "properties": props,
    }


def obj(props: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STR = {"type": "string"}
BOOL = {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
SECONDS = {"type": "number", "minimum": 0}
POSITIVE = {"type": "integer", "minimum": 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9.]+[a-zA-Z]*$"}, {"type": "number"}]}
# Kubernetes objects passed through as they are (kubernetes-validate checks them rendered).
K8S_LIST = {"type": "array", "items": {"type": "object"}}
K8S_OBJECT = {"type": "object"}


def probe(description: str) -> dict[str, Any]:
    return obj(
        {
            "periodSeconds": POSITIVE,
            "timeoutSeconds": POSITIVE,
            "failureThreshold": POSITIVE,
        },
        required=("periodSeconds", "timeoutSeconds", "failureThreshold"),
        description=description,
    )


def values_schema() -> dict[str, Any]:
    resources_side = obj({"cpu": QUANTITY, "memory": QUANTITY, "ephemeral-storage": QUANTITY})
    return obj(
        {
            "nameOverride": STR,
            "fullnameOverride": STR,
            "image": obj(
                {
                    "repository": {"type": "string", "minLength": 1},
                    "tag": {"type": "string", "description": "empty: the chart's appVersion"},
                    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                },
                required=("repository",),
            ),
            "imagePullSecrets": {
                "type": "array",
                "items": obj({"name": {"type": "string", "minLength": 1}}, required=("name",)),
            },
            "app": {
                "type": "string",
                "minLength": 1,
                "pattern": r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*(\(.*\))?$",
                "description": "The ASGI app, module:attribute",
            },
            "profile": {"enum": profiles.names()},
            "replicaCount": {"type": "integer", "minimum": 0},
            "workers": {
                "anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}],
                "description": "a number, or auto: sized from the container's CPU and memory "
                "limits and the database budget",
            },
            "ports": obj({"http": PORT, "metrics": PORT}, required=("http", "metrics")),
            "drain": obj(
                {
                    "delaySeconds": nullable(SECONDS),
                    "gracefulTimeoutSeconds": nullable(SECONDS),
                    "endpointPropagationSeconds": SECONDS,
                    "shutdownBoundSeconds": SECONDS,
                    "marginSeconds": SECONDS,
                },
                required=("endpointPropagationSeconds", "shutdownBoundSeconds", "marginSeconds"),
            ),
            "terminationGracePeriodSeconds": nullable({"type": "integer", "minimum": 1}),
            "recycling": obj(
                {
                    "maxRequests": nullable(POSITIVE),
                    "maxRequestsJitter": nullable({"type": "integer", "minimum": 0}),
                    "maxWorkerLifetimeSeconds": nullable({"type": "number", "exclusiveMinimum": 0}),
                    "maxWorkerLifetimeJitterSeconds": nullable(SECONDS),
                    "maxWorkerMemoryMiB": nullable(POSITIVE),
                }
            ),
            "logFormat": nullable({"enum": ["text", "json"]}),
            "forwardedAllowIps": nullable({"type": "array", "items": {"type": "string"}}),
            "database": obj(
                {
                    "maxConnections": nullable(POSITIVE),
                    "reservedConnections": nullable({"type": "integer", "minimum": 0}),
                    "poolSize": nullable(POSITIVE),
                }
            ),
            "config": config_schema(),
            "extraEnv": {
                "type": "array",
                "items": obj(
                    {"name": {"type": "string", "minLength": 1}, "value": STR, "valueFrom": K8S_OBJECT},
                    required=("name",),
                ),
            },
            "envFrom": K8S_LIST,
            "resources": obj({"requests": resources_side, "limits": resources_side}),
            "tmpSizeLimit": QUANTITY,
            "readOnlyRootFilesystem": BOOL,
            "podSecurityContext": K8S_OBJECT,
            "probes": obj(
                {
                    "startup": probe("/readyz until the first workers are ready"),
                    "readiness": probe("/readyz: 503 from the first moment of a drain"),
                    "liveness": probe("/livez: the master's event loop answers"),
                },
                required=("startup", "readiness", "liveness"),
            ),
            "service": obj(
                {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "port": PORT,
                    "metricsPort": PORT,
                    "annotations": STRING_MAP,
                },
                required=("type", "port", "metricsPort"),
            ),
            "serviceAccount": obj(
                {
                    "create": BOOL,
                    "name": STR,
                    "annotations": STRING_MAP,
                    "automountToken": BOOL,
                }
            ),
            "podAnnotations": STRING_MAP,
            "podLabels": STRING_MAP,
            "prometheusScrapeAnnotations": BOOL,
            "autoscaling": obj(
                {
                    "enabled": BOOL,
                    "minReplicas": POSITIVE,
                    "maxReplicas": POSITIVE,
                    "targetCPUUtilizationPercentage": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 100,
                    },
                }
            ),
            "podDisruptionBudget": obj(
                {
                    "enabled": BOOL,
                    "minAvailable": nullable({"anyOf": [POSITIVE, {"type": "string"}]}),
                    "maxUnavailable": nullable({"anyOf": [POSITIVE, {"type": "string"}]}),
                }
            ),
            "serviceMonitor": obj(
                {
                    "enabled": BOOL,
                    "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                    "scrapeTimeout": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                    "labels": STRING_MAP,
                }
            ),
            "prometheusRule": obj({"enabled": BOOL, "labels": STRING_MAP}),
            "grafanaDashboard": obj({"enabled": BOOL, "labels": STRING_MAP}),
            "topologySpread": obj(
                {
                    "enabled": BOOL,
                    "maxSkew": POSITIVE,
                    "topologyKey": {"type": "string", "minLength": 1},
                    "whenUnsatisfiable": {"enum": ["DoNotSchedule", "ScheduleAnyway"]},
                }
            ),
            "ingress": obj(
                {
                    "enabled": BOOL,
                    "className": STR,
                    "annotations": STRING_MAP,
                    "host": STR,
                    "path": {"type": "string", "pattern": "^/"},
                    "tlsSecretName": STR,
                }
            ),
            "nodeSelector": STRING_MAP,
            "tolerations": K8S_LIST,
            "affinity": K8S_OBJECT,
        },
        required=("image", "app", "profile", "workers", "ports", "drain", "probes", "service"),
        **{"$schema": "http://json-schema.org/draft-07/schema#"},
    )


def outputs() -> dict[Path, str]:
    return {
        CHART / "files" / "profiles.json": json.dumps(profile_settings(), indent=2) + "\n",
        CHART / "values.schema.json": json.dumps(values_schema(), indent=2) + "\n",
    }


def main(argv: list[str]) -> int:
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        if "--check" in argv:
            stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run python helm/generate.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
