"""Metrics building blocks: compaction of real prometheus_client files (the app's own
metrics), and the master's metrics and exposition. Request metrics: test_meter.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram, Summary, values
from prometheus_client.parser import text_string_to_metric_families

from asgi_supervise.observe.metrics import SupervisorMetrics, render
from asgi_supervise.observe.multiproc import MultiprocDir

# --- the multiprocess directory ----------------------------------------------------------


@pytest.fixture
def directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MultiprocDir]:
    made = MultiprocDir.create(str(tmp_path / "multiproc"))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", made.path)
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)  # restored afterwards
    yield made
    values.close_all_multiprocess_files()


def work_as(pid: int, requests: int, latencies: list[float], live: float = 1.0) -> None:
    """What a worker's prometheus_client writes, under a pid we choose.

    prometheus_client's own tests fake pids the same way: the value class decides the file.
    """
    values.ValueClass = values.MultiProcessValue(lambda: pid)
    counter = Counter("app_requests", "Requests.", ["path"], registry=None)
    histogram = Histogram("app_latency_seconds", "Latency.", registry=None, buckets=(0.1, 1))
    summary = Summary("app_payload_bytes", "Payloads.", registry=None)
    counter.labels("/").inc(requests)
    for latency in latencies:
        histogram.observe(latency)
        summary.observe(100)
    Gauge("app_live", "Live.", registry=None, multiprocess_mode="livesum").set(live)
    Gauge("app_all", "All.", registry=None).set(live)
    Gauge("app_max", "Max.", registry=None, multiprocess_mode="max").set(live)


def sample(directory: MultiprocDir, name: str, labels: dict[str, str] | None = None) -> Any:
    return directory.collect_registry().get_sample_value(name, labels or {})


def db_files(directory: MultiprocDir) -> list[str]:
    return sorted(n for n in os.listdir(directory.path) if n.endswith(".db"))


def pid_files(directory: MultiprocDir) -> list[str]:
    return [n for n in db_files(directory) if "archived" not in n]


def test_compaction_keeps_exact_totals_and_removes_the_dead(directory: MultiprocDir) -> None:
    latencies = {101: [0.05, 0.5], 102: [2.0], 103: [0.05, 0.05, 5.0]}
    for pid, observed in latencies.items():
        work_as(pid, requests=pid - 100, latencies=observed)
    before = directory.collect_registry()

    for pid in latencies:
        directory.worker_exited(pid)

    assert pid_files(directory) == []
    assert db_files(directory) == [
        "counter_archived.db", "histogram_archived.db", "summary_archived.db",
    ]  # fmt: skip
    after = directory.collect_registry()
    for name, labels, want in [
        ("app_requests_total", {"path": "/"}, 1 + 2 + 3),
        ("app_latency_seconds_bucket", {"le": "0.1"}, 3),
        ("app_latency_seconds_bucket", {"le": "1.0"}, 4),
        ("app_latency_seconds_bucket", {"le": "+Inf"}, 6),
        ("app_latency_seconds_count", {}, 6),
        ("app_latency_seconds_sum", {}, 0.05 + 0.5 + 2.0 + 0.05 + 0.05 + 5.0),
        ("app_payload_bytes_count", {}, 6),
        ("app_payload_bytes_sum", {}, 600),
    ]:
        assert after.get_sample_value(name, labels) == pytest.approx(want), name
        assert before.get_sample_value(name, labels) == pytest.approx(want), name
    for gauge in ("app_live", "app_all", "app_max"):
        assert not [s for m in after.collect() if m.name == gauge for s in m.samples]


def test_gauges_of_live_workers_stay(directory: MultiprocDir) -> None:
    work_as(201, requests=1, latencies=[], live=3)
    work_as(202, requests=1, latencies=[], live=4)
    directory.worker_exited(201)
    assert sample(directory, "app_live") == 4
    assert sample(directory, "app_all", {"pid": "202"}) == 4
    assert sample(directory, "app_all", {"pid": "201"}) is None
    left = pid_files(directory)
    assert {"gauge_all_202.db", "gauge_livesum_202.db", "gauge_max_202.db"} <= set(left)
    assert all(name.endswith("_202.db") for name in left)


def test_churn_keeps_files_bounded_and_totals_monotonic(directory: MultiprocDir) -> None:
    live: list[int] = []
    expected, last = 0, 0.0
    for pid in range(1000, 1052):  # 2 live workers, 50 recycles
        work_as(pid, requests=pid % 7 + 1, latencies=[0.2])
        expected += pid % 7 + 1
        live.append(pid)
        if len(live) > 2:
            directory.worker_exited(live.pop(0))
        total = sample(directory, "app_requests_total", {"path": "/"})
        assert total == expected
        assert total >= last
        last = total
        per_live_worker = 6  # counter, histogram, summary, three gauge modes
        assert len(db_files(directory)) <= per_live_worker * len(live) + 3
    assert sample(directory, "app_latency_seconds_count") == 52


def test_a_reused_pid_starts_from_zero_and_adds_up(directory: MultiprocDir) -> None:
    work_as(301, requests=5, latencies=[0.5])
    directory.worker_exited(301)
    work_as(301, requests=2, latencies=[0.5])  # the kernel gave the pid out again
    assert sample(directory, "app_requests_total", {"path": "/"}) == 7
    directory.worker_exited(301)
    assert sample(directory, "app_requests_total", {"path": "/"}) == 7
    assert sample(directory, "app_latency_seconds_count") == 2


def test_real_worker_processes(directory: MultiprocDir) -> None:
    script = textwrap.dedent("""
        from prometheus_client import Counter, Histogram
        c = Counter("jobs", "Jobs.")
        h = Histogram("job_seconds", "Job time.", buckets=(0.1, 1))
        for _ in range(250):
            c.inc()
            h.observe(0.5)
    """)
    env = {**os.environ, **directory.environ()}
    for _ in range(3):
        subprocess.run([sys.executable, "-c", script], env=env, check=True)
    pids = sorted({int(n.split("_")[1][:-3]) for n in pid_files(directory)})
    assert len(pids) == 3
    for pid in pids:
        directory.worker_exited(pid)
    assert pid_files(directory) == []
    assert sample(directory, "jobs_total") == 750
    assert sample(directory, "job_seconds_bucket", {"le": "1.0"}) == 750
    assert sample(directory, "job_seconds_sum") == 375


def test_unreadable_files_neither_break_scrapes_nor_stay(directory: MultiprocDir) -> None:
    work_as(401, requests=3, latencies=[])
    Path(directory.path, "counter_402.db").write_bytes(b"")  # created, never written
    assert sample(directory, "app_requests_total", {"path": "/"}) == 3
    directory.worker_exited(402)
    assert not Path(directory.path, "counter_402.db").exists()
    assert sample(directory, "app_requests_total", {"path": "/"}) == 3


# --- supervisor metrics and exposition -----------------------------------------------------


def families(body: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(family: Any, suffix: str = "", **labels: str) -> float:
    for s in family.samples:
        if s.name == family.name + suffix and s.labels == labels:
            return s.value
    raise AssertionError(f"no sample {family.name}{suffix} {labels}")


def test_supervisor_metrics() -> None:
    supervisor = SupervisorMetrics()
    supervisor.worker_started()
    supervisor.worker_ready(0.3)
    supervisor.worker_exited("crash")
    supervisor.worker_exited("memory")
    supervisor.worker_exited("scale")
    supervisor.worker_exited("shutdown")
    supervisor.set_worker_states({"ready": 2, "draining": 1})
    supervisor.observe_reload(4.2, "completed")
    supervisor.observe_drain(0.7)
    supervisor.sample_worker(1, rss_bytes=50e6, cpu_percent=150.0, requests=42)
    supervisor.sample_worker(2, rss_bytes=60e6, cpu_percent=0.0, requests=7)
    supervisor.forget_slot(2)
    supervisor.set_draining(True)
    supervisor.set_plan(
        {
            "workers": 2,
            "limited_by": "memory",
            "budgets": [
                {"name": "cpu", "allows": 4, "detail": ""},
                {"name": "memory", "allows": 2, "detail": ""},
                {"name": "database", "allows": None, "detail": ""},
            ],
        }
    )
    body, content_type = render(None, None, supervisor)
    assert content_type.startswith("text/plain")
    got = families(body)
    restarts = got["asgi_supervise_worker_restarts"]
    assert value(restarts, "_total", reason="crash") == 1
    assert value(restarts, "_total", reason="scale") == 1
    assert value(restarts, "_total", reason="timeout") == 0  # present before the first one
    assert "shutdown" not in {s.labels.get("reason") for s in restarts.samples}
    assert value(got["asgi_supervise_worker_starts"], "_total") == 1
    assert value(got["asgi_supervise_workers"], state="booting") == 0
    assert value(got["asgi_supervise_workers"], state="ready") == 2
    assert value(got["asgi_supervise_worker_boot_seconds"], "_bucket", le="0.5") == 1
    assert value(got["asgi_supervise_reload_duration_seconds"], "_sum") == 4.2
    assert value(got["asgi_supervise_reloads"], "_total", outcome="completed") == 1
    assert value(got["asgi_supervise_worker_drain_seconds"], "_count") == 1
    assert value(got["asgi_supervise_worker_cpu_ratio"], slot="1") == 1.5
    assert value(got["asgi_supervise_worker_requests"], slot="1") == 42
    assert len(got["asgi_supervise_worker_resident_memory_bytes"].samples) == 1
    assert value(got["asgi_supervise_draining"]) == 1
    assert value(got["asgi_supervise_planned_workers"]) == 2
    assert value(got["asgi_supervise_plan_budget"], budget="database") == float("inf")
    assert value(got["asgi_supervise_plan_limited_by"], budget="memory") == 1
    assert "process_resident_memory_bytes" in got  # the master's own


def test_ready_and_memory_limit_gauges() -> None:
    """`ready` is the probe's verdict asked at each scrape; `memory_limit_bytes` is the
    plan's limit, and no series at all (not +Inf, not 0) when the plan found none."""
    supervisor = SupervisorMetrics()
    plan = {"workers": 1, "limited_by": "cpu", "budgets": [], "memory_limit": None}
    supervisor.set_plan(plan)
    got = families(render(None, None, supervisor)[0])
    assert "asgi_supervise_ready" not in got  # before the health server gives the verdict
    assert "asgi_supervise_memory_limit_bytes" not in got
    verdict = [True]
    supervisor.set_readiness(lambda: verdict[0])
    supervisor.set_plan({**plan, "memory_limit": 512 * 1024 * 1024})
    got = families(render(None, None, supervisor)[0])
    assert value(got["asgi_supervise_ready"]) == 1
    assert value(got["asgi_supervise_memory_limit_bytes"]) == 512 * 1024 * 1024
    verdict[0] = False
    assert value(families(render(None, None, supervisor)[0])["asgi_supervise_ready"]) == 0


def test_fork_server_metrics_only_in_fork_mode() -> None:
    supervisor = SupervisorMetrics()
    assert "asgi_supervise_fork_server" not in render(None, None, supervisor)[0].decode()
    supervisor.set_fork_server({"generation": 3, "starts": 2, "rss": 50e6, "pss": 12e6})
    got = families(render(None, None, supervisor)[0])
    assert value(got["asgi_supervise_fork_server_generation"]) == 3
    assert value(got["asgi_supervise_fork_server_starts"], "_total") == 2
    assert value(got["asgi_supervise_fork_server_memory_bytes"], kind="pss") == 12e6


def test_render_joins_both_sources_and_negotiates(directory: MultiprocDir) -> None:
    work_as(601, requests=3, latencies=[0.5])
    directory.worker_exited(601)
    work_as(602, requests=1, latencies=[])
    supervisor = SupervisorMetrics()

    body, content_type = render("text/plain", directory, supervisor)
    got = families(body)
    assert value(got["app_requests"], "_total", path="/") == 4
    assert "asgi_supervise_workers" in got

    accept = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    body, content_type = render(accept, directory, supervisor)
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b"app_requests_total" in body
