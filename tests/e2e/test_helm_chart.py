"""The Helm chart, as a user meets it: `helm lint --strict`, `helm template`, the manifests
validated against Kubernetes' own schemas (kubernetes-validate --strict), and the rendered
config file read by the real `asgi-supervise config`.

No API server exists on this machine (docs/kubernetes.md says what that leaves untested).
helm is the upstream binary (.ci/get_helm.py fetches it when it is not on PATH).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from asgi_supervise.master.policy import KILL_GRACE
from conftest import REPO, run_cli

CHART = REPO / "helm" / "asgi-supervise"
K8S = "1.35.0"  # the Kubernetes version the manifests are validated against
CONFIG_PATH = "/etc/asgi-supervise/asgi-supervise.toml"
PROFILES = ("container", "dev", "prod", "streaming")

# Each is rendered, linted and validated; the defaults are the empty set.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    **{f"profile-{p}": {"profile": p} for p in PROFILES},
    "custom-ports": {"ports": {"http": 8080, "metrics": 9100}, "service": {"metricsPort": 9100}},
    "monitoring-on": {
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 7},
        "podDisruptionBudget": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
        "topologySpread": {"enabled": True},
        "ingress": {"enabled": True, "host": "app.example.com", "tlsSecretName": "app-tls"},
    },
    "custom-config": {
        "workers": 3,
        "drain": {"delaySeconds": 8, "gracefulTimeoutSeconds": 40},
        "recycling": {"maxRequests": 5000, "maxRequestsJitter": 500, "maxWorkerMemoryMiB": 800},
        "logFormat": "text",
        "forwardedAllowIps": ["10.0.0.0/8", "192.168.0.0/16"],
        "database": {"maxConnections": 200, "reservedConnections": 20, "poolSize": 5},
        "config": {"limit-concurrency": 500, "timeout-keep-alive": 10, "log-level": "warning"},
        "extraEnv": [
            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}}}
        ],
        "envFrom": [{"configMapRef": {"name": "app-settings"}}],
    },
    "read-only-off": {"readOnlyRootFilesystem": False},
}


HELM_ENV: dict[str, str] = {}


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    binary = os.environ.get("HELM") or shutil.which("helm")
    if not binary:
        fetched = subprocess.run(
            [sys.executable, str(REPO / ".ci" / "get_helm.py")],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        binary = fetched.stdout.strip().splitlines()[-1]
    home = tmp_path_factory.mktemp("helm-home")  # no cache or config from the user's home
    HELM_ENV.update(
        os.environ,
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )
    return [binary]


def run_helm(helm: list[str], tmp_path: Path, values: dict[str, Any], *args: str):
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))  # JSON is YAML
    return subprocess.run(
        [*helm, *args, str(CHART), "-f", str(values_file)],
        capture_output=True, text=True, timeout=60, env=HELM_ENV,
    )  # fmt: skip


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(helm: list[str], tmp_path: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The parsed manifests; each value set is rendered once per session (a fresh copy)."""
    key = json.dumps(values, sort_keys=True)
    if key not in _rendered:
        done = run_helm(
            helm, tmp_path, values, "template", "rel", "--namespace", "prod", "--kube-version", K8S
        )
        assert done.returncode == 0, done.stderr
        _rendered[key] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return copy.deepcopy(_rendered[key])


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def config_file(docs: list[dict[str, Any]]) -> str:
    return one([d for d in docs if "asgi-supervise.toml" in d.get("data", {})], "ConfigMap")[
        "data"
    ]["asgi-supervise.toml"]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def effective_config(tmp_path: Path, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """`asgi-supervise config --json` on the rendered file: what the pod's master runs with."""
    path = tmp_path / "asgi-supervise.toml"
    path.write_text(config_file(docs))
    args = container(docs)["args"]
    assert args[:3] == ["run", "--config", CONFIG_PATH], args
    done = run_cli("config", "--json", "--config", str(path), env={"TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def effective_settings(tmp_path: Path, docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: v["value"] for k, v in effective_config(tmp_path, docs)["settings"].items()}


def worst_case_drain(document: dict[str, Any]) -> float:
    """SIGTERM to exit at worst, as the product counts it (`config --json` states it once
    the drain account exists; before, the graceful timeout then the kill grace)."""
    if "drain" in document:
        return document["drain"]["worst_case_s"]
    s = {k: v["value"] for k, v in document["settings"].items()}
    return s["drain_delay"] + s["graceful_timeout"] + KILL_GRACE


def test_generated_files_are_up_to_date():
    """files/profiles.json and values.schema.json come from the profiles and the settings."""
    done = subprocess.run(
        [sys.executable, str(REPO / "helm" / "generate.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_render_and_validate(helm, tmp_path, name):
    import kubernetes_validate

    lint = run_helm(helm, tmp_path, VALUE_SETS[name], "lint", "--strict", "--kube-version", K8S)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm, tmp_path, VALUE_SETS[name])
    errors = []
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # Prometheus operator CRDs: not in Kubernetes' schemas; their shape below.
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", what
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{what}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert errors == []
    for doc in docs:  # standard labels everywhere
        labels = doc["metadata"]["labels"]
        assert labels["helm.sh/chart"].startswith("asgi-supervise-"), doc["kind"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", doc["kind"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_ports_agree_everywhere(helm, tmp_path, name):
    """Process ports = containerPorts = probe ports = Service targetPorts = scrape port."""
    docs = render(helm, tmp_path, VALUE_SETS[name])
    settings = effective_settings(tmp_path, docs)
    expect = VALUE_SETS[name].get("ports", {"http": 8000, "metrics": 9808})
    assert (settings["port"], settings["metrics_port"]) == (expect["http"], expect["metrics"])
    # Reachable from the Service and the kubelet, whatever the profile says.
    assert (settings["host"], settings["metrics"], settings["metrics_host"]) == (
        "0.0.0.0", True, "0.0.0.0",
    )  # fmt: skip
    c = container(docs)
    by_name = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert by_name == {"http": settings["port"], "metrics": settings["metrics_port"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert by_name.get(port, port) == settings["metrics_port"], probe
    service = one(docs, "Service")
    targets = {
        p["name"]: by_name.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]
    }
    assert targets == {"http": settings["port"], "metrics": settings["metrics_port"]}
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings["metrics_port"])
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


@pytest.mark.parametrize("profile", PROFILES)
def test_grace_period_covers_the_worst_case_drain(helm, tmp_path, profile):
    """Per profile, against what `asgi-supervise config --profile X` says the profile is:
    the profile's numbers are not copied into the chart by hand."""
    docs = render(helm, tmp_path, {"profile": profile})
    document = effective_config(tmp_path, docs)
    settings = {k: v["value"] for k, v in document["settings"].items()}
    done = run_cli("config", "--json", "--profile", profile, env={"TMPDIR": str(tmp_path)})
    profile_says = {k: v["value"] for k, v in json.loads(done.stdout)["settings"].items()}
    assert settings["graceful_timeout"] == profile_says["graceful_timeout"]
    assert settings["drain_delay"] >= profile_says["drain_delay"]
    readiness = container(docs)["readinessProbe"]
    # A draining pod answers 503 at once; the probe pulls it within period x threshold,
    # and endpoint removal then needs to propagate (values.yaml: 2 s) before the drain
    # delay ends and the workers stop accepting.
    assert settings["drain_delay"] >= readiness["periodSeconds"] * readiness["failureThreshold"] + 2
    # out within one period once draining, yet a slow answer (seconds) is no failure
    assert readiness["failureThreshold"] == 1 and readiness["timeoutSeconds"] >= 5
    worst = worst_case_drain(document)
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= worst + 5, (grace, worst)  # drain.marginSeconds on top


def test_drain_overrides_move_the_grace_period(helm, tmp_path):
    docs = render(helm, tmp_path, VALUE_SETS["custom-config"])
    document = effective_config(tmp_path, docs)
    settings = {k: v["value"] for k, v in document["settings"].items()}
    assert (settings["drain_delay"], settings["graceful_timeout"]) == (8, 40)
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == math.ceil(worst_case_drain(document) + 5)  # the margin, no more


def test_every_value_reaches_the_process(helm, tmp_path):
    values = VALUE_SETS["custom-config"]
    docs = render(helm, tmp_path, values)
    s = effective_settings(tmp_path, docs)
    assert s["app"] == "examples.hello:app"
    assert s["workers"] == 3
    assert (s["max_requests"], s["max_requests_jitter"], s["max_worker_memory"]) == (5000, 500, 800)
    assert s["log_format"] == "text"
    assert s["forwarded_allow_ips"] == ["10.0.0.0/8", "192.168.0.0/16"]
    assert (s["db_max_connections"], s["db_reserved_connections"], s["db_pool_size"]) == (
        200,
        20,
        5,
    )
    assert (s["limit_concurrency"], s["timeout_keep_alive"], s["log_level"]) == (500, 10, "warning")
    c = container(docs)
    assert {
        "name": "DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}},
    } in c["env"]
    assert c["envFrom"] == [{"configMapRef": {"name": "app-settings"}}]
    assert {"name": "TMPDIR", "value": "/tmp"} in c["env"]


@pytest.mark.parametrize(
    ("values", "replicas"),
    [
        ({"replicaCount": 3}, 3),
        ({"replicaCount": 3, "autoscaling": {"enabled": True, "maxReplicas": 12}}, 12),
    ],
)
def test_db_budget_replicas_follow_the_hpa(helm, tmp_path, values, replicas):
    docs = render(helm, tmp_path, values)
    assert effective_settings(tmp_path, docs)["replicas"] == replicas
    hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    deployment = one(docs, "Deployment")
    if values.get("autoscaling"):
        assert hpa[0]["spec"]["maxReplicas"] == replicas
        assert "replicas" not in deployment["spec"]  # the HPA owns it
    else:
        assert hpa == []
        assert deployment["spec"]["replicas"] == replicas


def test_restricted_pod_security_by_default(helm, tmp_path):
    docs = render(helm, tmp_path, {})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    c = pod["containers"][0]["securityContext"]
    assert c["allowPrivilegeEscalation"] is False
    assert c["capabilities"]["drop"] == ["ALL"]
    assert c["readOnlyRootFilesystem"] is True
    assert c["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert (
        container(docs)["image"]
        == "asgi-supervise:" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    )
    off = render(helm, tmp_path, VALUE_SETS["read-only-off"])
    assert container(off)["securityContext"]["readOnlyRootFilesystem"] is False


def test_optional_objects_are_off_by_default(helm, tmp_path):
    kinds = sorted(d["kind"] for d in render(helm, tmp_path, {}))
    assert kinds == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    kinds = sorted(d["kind"] for d in render(helm, tmp_path, VALUE_SETS["monitoring-on"]))
    assert kinds == [
        "ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress",
        "PodDisruptionBudget", "PrometheusRule", "Service", "ServiceAccount", "ServiceMonitor",
    ]  # fmt: skip


def test_monitoring_objects_carry_the_ops_pack(helm, tmp_path):
    docs = render(helm, tmp_path, VALUE_SETS["monitoring-on"])
    rule = one(docs, "PrometheusRule")
    shipped = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    assert all(r.get("expr") for g in rule["spec"]["groups"] for r in g["rules"])
    dashboards = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(dashboards[0]["data"]["asgi-supervise.json"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == one(docs, "Service")["spec"]["selector"]


@pytest.mark.parametrize(
    ("chart_file", "ops_pack"),
    [
        ("files/prometheus-rules.yaml", "deploy/prometheus/asgi-supervise-rules.yaml"),
        ("files/grafana-dashboard.json", "deploy/grafana/asgi-supervise.json"),
    ],
)
def test_chart_files_are_the_ops_pack(chart_file, ops_pack):
    """The chart cannot read outside itself: it ships copies, which must not drift."""
    source = REPO / ops_pack
    assert (CHART / chart_file).read_bytes() == source.read_bytes(), (
        f"cp {ops_pack} {CHART / chart_file}"
    )


# Each must fail helm template (and so install/upgrade) with a message naming the value;
# schema violations fail helm lint too. Checks that need the profile's numbers are `fail`
# calls in the templates, which helm 4's lint only logs (as "funcMap fail", exit 0).
TEMPLATE_CHECKS = (
    "grace override too short",
    "drain delay under the probe's",
    "extraEnv overriding a port",
    "HPA max below min",
)
BAD_VALUES = {
    "unknown key": ({"bogus": 1}, "additional properties 'bogus' not allowed"),
    "unknown nested key": ({"ports": {"htp": 1}}, "'htp' not allowed"),
    "empty app": ({"app": ""}, "at '/app'"),
    "app without attribute": ({"app": "myapp"}, "at '/app'"),
    "negative port": ({"ports": {"http": -1}}, "at '/ports/http': minimum"),
    "port as text": ({"ports": {"metrics": "metrics"}}, "at '/ports/metrics': got string"),
    "workers zero": ({"workers": 0}, "at '/workers'"),
    "unknown profile": ({"profile": "production"}, "at '/profile'"),
    "replicaCount as text": ({"replicaCount": "2"}, "at '/replicaCount': got string"),
    "unknown setting in config": (
        {"config": {"limit-concurency": 5}},
        "'limit-concurency' not allowed",
    ),
    "chart-owned setting in config": ({"config": {"port": 5}}, "'port' not allowed"),
    "config value of the wrong type": (
        {"config": {"limit-concurrency": "many"}},
        "at '/config/limit-concurrency'",
    ),
    "grace override too short": (
        {"terminationGracePeriodSeconds": 30, "profile": "prod"},  # prod needs 49
        "terminationGracePeriodSeconds (30) is too short",
    ),
    "drain delay under the probe's": (
        {"drain": {"delaySeconds": 1}},
        "drain.delaySeconds (1) is too short",
    ),
    "extraEnv overriding a port": (
        {"extraEnv": [{"name": "ASGI_SUPERVISE_PORT", "value": "1"}]},
        "extraEnv[0].name: ASGI_SUPERVISE_PORT",
    ),
    "HPA max below min": (
        {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
        "autoscaling.maxReplicas (2) is below",
    ),
    "typo in a Kubernetes object": (
        {"podSecurityContext": {"runAsUserr": 1}},
        "at '/podSecurityContext': additional properties 'runAsUserr' not allowed",
    ),
    "toleration of the wrong type": ({"tolerations": [{"key": 1}]}, "at '/tolerations/0/key'"),
    "probe without a period": ({"probes": {"readiness": {"periodSeconds": None}}}, "periodSeconds"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_rejected_naming_the_value(helm, tmp_path, case):
    values, message = BAD_VALUES[case]
    commands = [["template", "rel"]]
    if case not in TEMPLATE_CHECKS:
        commands.append(["lint", "--strict"])
    for command in commands:
        done = run_helm(helm, tmp_path, values, *command)
        assert done.returncode != 0, f"helm {command[0]} accepted {values}"
        assert message in done.stdout + done.stderr, done.stdout + done.stderr
