"""The alert rules and the Grafana dashboard in deploy/, against promtool and a real
Prometheus server scraping a real asgi-supervise.

The live test starts Prometheus on loopback (1 s scrape and rule evaluation, a temporary
data dir) with the shipped rules, every `for:` set to 0s and the crash-loop window cut to
10 s, then drives traffic, kills a worker, reloads; checks that every query of every
dashboard panel returns data through Prometheus' HTTP API; deploys an app that cannot
boot (crash-loop alert fires), drains (not-ready alert fires), restarts (both resolve).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, try_get, wait_until

pytestmark = pytest.mark.timeout(120)

RULES = REPO / "deploy" / "prometheus" / "asgi-supervise-rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "asgi-supervise-rules.test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "asgi-supervise.json"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
JOB = "asgi"
RATE_INTERVAL = "5s"  # $__rate_interval at a 1 s scrape interval


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_rules_pass_promtool_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_rules_unit_tests_fire_and_stay_silent():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
              if "alert" in r}  # fmt: skip
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts == tested, f"alerts without unit tests: {alerts - tested}"


def test_every_alert_has_a_runbook():
    operations = (REPO / "docs" / "operations.md").read_text()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            annotations = rule["annotations"]
            assert annotations["summary"] and annotations["description"], rule["alert"]
            anchor = annotations["runbook_url"].split("#")[1]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert']}" in operations, rule["alert"]


# --- the dashboard ---------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], substitute(target["expr"])))
    return queries


def substitute(expr: str) -> str:
    values = {
        "job": JOB,
        "instance": ".*",
        "route": ".*",  # the All value
        "__rate_interval": RATE_INTERVAL,
    }
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert not re.search(r"\$[a-z_]", expr), expr
    return expr


def test_dashboard_is_complete():
    """Every panel has queries, every variable is used, nothing refers to a datasource
    by a uid of one Grafana installation."""
    board = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance", "route"} <= names
    text = DASHBOARD.read_text()
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    for name in names - {"datasource"}:
        assert f"${name}" in text.replace(f'"name": "{name}"', "")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for title, expr in dashboard_queries():  # substitution leaves no variable behind
        assert expr, title


# --- a real Prometheus ----------------------------------------------------------------


class Prometheus:
    def __init__(self, tmp_path: Path, target_port: int):
        self.port = free_port()
        rules = tmp_path / "rules.yaml"
        rules.write_text(fast_rules())
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [
                        {
                            "job_name": JOB,
                            "scrape_timeout": "1s",
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                        }
                    ],
                }
            )
        )
        self.log_path = tmp_path / "prometheus.log"
        assert PROMETHEUS is not None
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS, f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h", "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.port}/-/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
        return False

    def alerts(self, name: str) -> set[str]:
        """The states of alert `name` now: {"firing"}, {"pending"}, or empty (resolved)."""
        return {
            a["state"] for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name
        }

    def has_data(self, expr: str, start: float) -> bool:
        """A range query, as Grafana sends it: some series with some number in it."""
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{time.time():.3f}", step="1"
        )
        return any(
            not math.isnan(float(value))
            for series in data["result"]
            for _, value in series["values"]
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def fast_rules() -> str:
    """The shipped rules, made to act within a short test: no `for:` wait, and the
    crash-loop window 10 s instead of 10 minutes."""
    groups = yaml.safe_load(RULES.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
            if rule.get("alert") == "AsgiSuperviseCrashLoop":
                assert "[10m]" in rule["expr"]
                rule["expr"] = rule["expr"].replace("[10m]", "[10s]")
    return yaml.safe_dump(groups)


@pytest.fixture
def prometheus(tmp_path: Path):
    started: list[Prometheus] = []

    def start(target_port: int) -> Prometheus:
        server = Prometheus(tmp_path, target_port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Traffic:
    """Clients on every route, one long request always in flight, one WebSocket open."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.mixed, daemon=True),
            threading.Thread(target=self.in_flight, daemon=True),
            threading.Thread(target=self.websocket, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def mixed(self) -> None:
        paths = ["/items/1", "/items/2", "/fail", "/missing", "/slow?s=0.05", "/pid"]
        for n in range(100_000):  # bounded; the test stops it far earlier
            if self.stop.is_set():
                return
            # The test SIGKILLs a worker: a response it was writing ends short.
            with contextlib.suppress(http.client.HTTPException):
                try_get(self.port, paths[n % len(paths)])
            self.stop.wait(0.01)

    def in_flight(self) -> None:
        for _ in range(1000):
            if self.stop.is_set():
                return
            try_get(self.port, "/slow?s=1", timeout=5)

    def websocket(self) -> None:
        from websockets.sync.client import connect

        for _ in range(100):
            if self.stop.is_set():
                return
            url = f"ws://127.0.0.1:{self.port}/ws"
            with contextlib.suppress(Exception), connect(url, open_timeout=5) as ws:
                while not self.stop.wait(0.5):
                    ws.send("ping")
                    ws.recv(timeout=5)
            self.stop.wait(0.2)

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def reloading(metrics_port: int) -> bool:
    answer = try_get(metrics_port, "/status")
    return answer is None or json.loads(answer[1])["master"]["reloading"]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: prometheus)")
def test_dashboard_and_alerts_on_a_real_prometheus(supervisor, prometheus, tmp_path):
    metrics_port = free_port()
    broken = tmp_path / "broken-flag"
    args = (
        "opsapp:app", "--workers", "2", "--metrics", "--metrics-port", str(metrics_port),
        "--drain-delay", "3", "--graceful-timeout", "5", "--restart-backoff-max", "1",
    )  # fmt: skip
    env = {"OPSAPP_BROKEN_FLAG": str(broken)}
    prom = prometheus(metrics_port)  # its first scrapes fail until the master is up
    master = supervisor(*args, env=env)
    master.wait_ready(2)
    start = time.time()
    traffic = Traffic(master.port)
    try:
        wait_until(prom.ready, 30, lambda: f"Prometheus ready\n{prom.log()}")
        # Scraped a few times first, so the events below are changes Prometheus sees.
        scraped = f'count_over_time(up{{job="{JOB}"}}[1m]) >= 2'
        wait_until(lambda: prom.api("query", query=scraped)["result"], 20, "2 scrapes")
        # A worker dies (crash restart, a boot), then a rolling reload (drains, a reload).
        os.kill(min(master.worker_pids()), signal.SIGKILL)
        wait_until(lambda: master.log().count(" ready in ") >= 3, 20, master.log)
        master.signal(signal.SIGHUP)
        wait_until(lambda: "reload complete" in master.log(), 30, master.log)

        # Every panel query returns data, as Grafana would ask for it.
        for title, expr in dashboard_queries():
            wait_until(
                lambda expr=expr: prom.has_data(expr, start), 20,
                lambda title=title, expr=expr: f"data for panel {title!r}: {expr}",
                interval=0.5,
            )  # fmt: skip

        # Deploy code that cannot boot: each reload's new worker fails.
        assert prom.alerts("AsgiSuperviseCrashLoop") == set()
        broken.touch()

        def reload_until_firing() -> bool:
            master.signal(signal.SIGHUP)
            return prom.alerts("AsgiSuperviseCrashLoop") == {"firing"}

        wait_until(reload_until_firing, 40, lambda: f"crash loop alert\n{master.log()}", 1.0)
        broken.unlink()
        # Our last SIGHUP may still be booting old (broken) code: a SIGHUP now would be
        # folded into that reload and dropped with it when it aborts. Wait for it to end.
        wait_until(lambda: not reloading(metrics_port), 30, "the failed reload to end")
        master.signal(signal.SIGHUP)
        wait_until(lambda: master.log().count("reload complete") >= 2, 30, master.log)
        wait_until(lambda: prom.alerts("AsgiSuperviseNotReady") == set(), 20, "ready")

        # Drain: not ready (draining, then down) until a new master serves again.
        master.signal(signal.SIGTERM)
        wait_until(lambda: prom.alerts("AsgiSuperviseNotReady") == {"firing"}, 20, "not ready")
        master.wait_exit(30)
        traffic.end()
        again = supervisor(*args, env=env)
        again.wait_ready(1)
        wait_until(lambda: prom.alerts("AsgiSuperviseNotReady") == set(), 20, "ready again")
        wait_until(lambda: prom.alerts("AsgiSuperviseCrashLoop") == set(), 30, "crash loop over")
    finally:
        traffic.end()
