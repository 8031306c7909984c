"""Write the chart's generated files from the product itself, so they cannot drift:

- ``asgi-supervise/files/profiles.json``: each built-in profile's effective drain
  settings (what ``asgi-supervise config --json --profile NAME`` says) and the product's
  fixed drain overhead (its kill grace and margins), which the templates read to derive
  the drain delay and terminationGracePeriodSeconds the pod will really use.
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
    # Ranked above the chart's own config file, its bind and workers would override
    # ports.http (which the probes use) and workers: a chart sets those values itself.
    "gunicorn_config": "(not in the chart: it would override ports.http and workers)",
}
# What the templates need from each profile (shutdown_timeout: where the product has it).
PROFILE_KEYS = ("drain_delay", "graceful_timeout", "shutdown_timeout", "workers", "log_format")


def drain_overhead() -> float:
    """Seconds a drain may take beyond drain delay + graceful timeout + shutdown timeout:
    the product's own constants, so the chart's grace period cannot drift from them."""
    try:  # the full account: cancel wait, exit margin, kill grace
        from asgi_supervise import drain  # type: ignore[attr-defined]

        return drain.CANCEL_WAIT + drain.EXIT_MARGIN + drain.KILL_GRACE
    except ImportError:  # the graceful timeout, then SIGKILL after the kill grace
        from asgi_supervise.master.policy import KILL_GRACE

        return KILL_GRACE


def profile_settings() -> dict[str, Any]:
    out = {}
    with tempfile.TemporaryDirectory() as empty:  # no asgi-supervise.toml, no environment
        for name in profiles.names():
            loaded = sources.load({}, profile=name, environ={}, cwd=Path(empty))
            values = loaded.settings.model_dump(mode="json")
            out[name] = {key: values[key] for key in PROFILE_KEYS if key in values}
    return {"drain_overhead_s": drain_overhead(), "profiles": out}


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
        meta_keys = ("aliases", "bind_aliases", "default", "group", "secret", "title")
        for key in (*meta_keys, "description"):
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
K8S_VERSION = "1.35.0"  # whose object schemas the values that are Kubernetes objects use
_k8s_defs: dict[str, Any] = {}


def k8s(kind: str) -> dict[str, Any]:
    """A Kubernetes object (io.k8s.api.core.v1.Toleration), closed as Kubernetes closes it:
    its definition and every one it refers to, from kubernetes-validate's strict schemas,
    go into the values schema's $defs (descriptions dropped)."""
    import kubernetes_validate

    if not _k8s_defs:
        folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
        strict = folder / f"v{K8S_VERSION}-local-strict" / "_definitions.json"
        _k8s_defs["all"] = json.loads(strict.read_text())["$defs"]
        _k8s_defs["used"] = {}

    def copy_def(name: str) -> None:
        if name in _k8s_defs["used"]:
            return
        _k8s_defs["used"][name] = None  # placeholder: refers to itself at times
        _k8s_defs["used"][name] = walk(_k8s_defs["all"][name])

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "description" and isinstance(value, str):
                    continue
                if key == "$ref":
                    target = value.rsplit("/", 1)[1]
                    copy_def(target)
                    value = f"#/$defs/{target}"
                out[key] = walk(value) if key != "$ref" else value
            return out
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    copy_def(kind)
    return {"$ref": f"#/$defs/{kind}"}


def k8s_list(kind: str) -> dict[str, Any]:
    return {"type": "array", "items": k8s(kind)}


CORE = "io.k8s.api.core.v1."


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
    schema = obj(
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
                    "marginSeconds": SECONDS,
                },
                required=("endpointPropagationSeconds", "marginSeconds"),
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
                    {
                        "name": {"type": "string", "minLength": 1},
                        "value": STR,
                        "valueFrom": k8s(CORE + "EnvVarSource"),
                    },
                    required=("name",),
                ),
            },
            "envFrom": k8s_list(CORE + "EnvFromSource"),
            "resources": obj({"requests": resources_side, "limits": resources_side}),
            "tmpSizeLimit": QUANTITY,
            "readOnlyRootFilesystem": BOOL,
            "podSecurityContext": k8s(CORE + "PodSecurityContext"),
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
            "tolerations": k8s_list(CORE + "Toleration"),
            "affinity": k8s(CORE + "Affinity"),
        },
        required=("image", "app", "profile", "workers", "ports", "drain", "probes", "service"),
        **{"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )
    schema["$defs"] = dict(sorted(_k8s_defs["used"].items()))
    return schema


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
