"""Metrics building blocks: compaction of real prometheus_client files, the request
middleware called through the ASGI interface, and the master's own metrics."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, values
from prometheus_client.parser import text_string_to_metric_families

from asgi_supervise.metrics import UNMATCHED, RequestMetrics, SupervisorMetrics, render
from asgi_supervise.multiproc import MultiprocDir

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


def pid_files(directory: MultiprocDir) -> list[str]:
    return sorted(n for n in os.listdir(directory.path) if "archived" not in n)


def test_compaction_keeps_exact_totals_and_removes_the_dead(directory: MultiprocDir) -> None:
    latencies = {101: [0.05, 0.5], 102: [2.0], 103: [0.05, 0.05, 5.0]}
    for pid, observed in latencies.items():
        work_as(pid, requests=pid - 100, latencies=observed)
    before = directory.collect_registry()

    for pid in latencies:
        directory.worker_exited(pid)

    assert pid_files(directory) == []
    assert sorted(os.listdir(directory.path)) == [
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
        assert len(os.listdir(directory.path)) <= per_live_worker * len(live) + 3
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


def test_create_wipes_and_only_removes_what_it_made(tmp_path: Path) -> None:
    given = tmp_path / "given"
    given.mkdir()
    (given / "counter_1.db").write_bytes(b"stale")
    (given / "notes.txt").write_text("keep")
    directory = MultiprocDir.create(str(given))
    assert os.listdir(given) == ["notes.txt"]
    directory.cleanup()
    assert given.is_dir()

    made = MultiprocDir.create(None)
    assert stat.S_IMODE(os.stat(made.path).st_mode) == 0o700
    assert os.path.basename(made.path).startswith("asgi-supervise-metrics-")
    assert made.environ() == {"PROMETHEUS_MULTIPROC_DIR": made.path}
    made.cleanup()
    assert not os.path.exists(made.path)

    fresh = MultiprocDir.create(str(tmp_path / "new" / "dir"))
    assert stat.S_IMODE(os.stat(fresh.path).st_mode) == 0o700
    fresh.cleanup()
    assert not os.path.exists(fresh.path)


# --- request metrics -----------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)  # single-process mode
    return CollectorRegistry()


class Exchange:
    """Drive one ASGI call the way a server does: scope, receive, send."""

    def __init__(self, app: Any, scope: dict[str, Any], incoming: list[Any] | None = None):
        self.app, self.scope = app, scope
        self.incoming: asyncio.Queue[Any] = asyncio.Queue()
        for message in incoming or [{"type": "http.request", "body": b""}]:
            self.incoming.put_nowait(message)
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> Any:
        return await self.incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def run(self) -> None:
        await self.app(self.scope, self.receive, self.send)


def http(path: str = "/", method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": []}


async def hello(scope: Any, receive: Any, send: Any) -> None:
    if scope["path"].startswith("/items/"):
        scope["route"] = SimpleNamespace(path="/items/{id}")  # what a Starlette router does
    elif scope["path"].startswith("/typed/"):
        scope["route"] = SimpleNamespace(path="/typed/{id:int}", path_format="/typed/{id}")
    elif scope["path"] == "/raw-routed":
        scope["http_route"] = "/raw-routed"
    elif scope["path"] == "/boom":
        raise RuntimeError("boom")
    status = 404 if scope["path"].startswith("/missing") else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"hello", "more_body": True})
    await send({"type": "http.response.body", "body": b", world"})


def serve(metrics: RequestMetrics, *scopes: dict[str, Any]) -> None:
    async def main() -> None:
        for scope in scopes:
            await Exchange(metrics, scope).run()

    asyncio.run(main())


def duration_count(registry: CollectorRegistry, method: str, route: str, status: str) -> Any:
    labels = {"http_request_method": method, "http_route": route}
    return registry.get_sample_value(
        "http_server_request_duration_seconds_count",
        {**labels, "http_response_status_code": status},
    )


def test_route_label_is_the_template(registry: CollectorRegistry) -> None:
    metrics = RequestMetrics(hello, registry)
    serve(metrics, http("/items/1"), http("/items/2"), http("/typed/3"), http("/raw-routed"))
    metrics.flush()
    assert duration_count(registry, "GET", "/items/{id}", "200") == 2
    assert duration_count(registry, "GET", "/typed/{id}", "200") == 1
    assert duration_count(registry, "GET", "/raw-routed", "200") == 1
    assert duration_count(registry, "GET", "/items/1", "200") is None


def test_unmatched_paths_share_one_label(registry: CollectorRegistry) -> None:
    metrics = RequestMetrics(hello, registry)
    serve(metrics, *(http(f"/missing/{n}") for n in range(20)), http("/"))
    metrics.flush()
    assert duration_count(registry, "GET", UNMATCHED, "404") == 20
    assert duration_count(registry, "GET", UNMATCHED, "200") == 1
    routes = {
        s.labels["http_route"]
        for m in registry.collect()
        if m.name == "http_server_request_duration_seconds"
        for s in m.samples
    }
    assert routes == {UNMATCHED}


def test_sizes_methods_and_buckets(registry: CollectorRegistry) -> None:
    metrics = RequestMetrics(hello, registry)
    serve(metrics, http("/items/1", "POST"), http("/items/1", "BREW"))
    metrics.flush()
    assert duration_count(registry, "POST", "/items/{id}", "200") == 1
    assert duration_count(registry, "_OTHER", "/items/{id}", "200") == 1
    labels = {"http_request_method": "POST", "http_route": "/items/{id}"}
    labels["http_response_status_code"] = "200"
    size = registry.get_sample_value("http_server_response_body_size_bytes_sum", labels)
    assert size == len(b"hello, world")
    fast = registry.get_sample_value(
        "http_server_request_duration_seconds_bucket", {**labels, "le": "0.005"}
    )
    assert fast == 1


def test_flush_moves_each_observation_once(registry: CollectorRegistry) -> None:
    metrics = RequestMetrics(hello, registry)
    serve(metrics, http("/items/1"))
    assert duration_count(registry, "GET", "/items/{id}", "200") is None  # not flushed yet
    metrics.flush()
    metrics.flush()
    serve(metrics, http("/items/1"))
    metrics.flush()
    assert duration_count(registry, "GET", "/items/{id}", "200") == 2


def test_an_app_error_counts_as_500_and_propagates(registry: CollectorRegistry) -> None:
    metrics = RequestMetrics(hello, registry)
    with pytest.raises(RuntimeError):
        serve(metrics, http("/boom"))
    metrics.flush()
    assert duration_count(registry, "GET", UNMATCHED, "500") == 1
    assert registry.get_sample_value(
        "http_server_active_requests", {"http_request_method": "GET"}
    ) == 0  # fmt: skip


def test_active_requests_while_in_flight(registry: CollectorRegistry) -> None:
    release = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await hello(scope, receive, send)

    metrics = RequestMetrics(slow, registry)
    active = {"http_request_method": "GET"}

    async def main() -> None:
        request = asyncio.create_task(Exchange(metrics, http()).run())
        await asyncio.sleep(0)
        metrics.flush()
        assert registry.get_sample_value("http_server_active_requests", active) == 1
        release.set()
        await request
        metrics.flush()
        assert registry.get_sample_value("http_server_active_requests", active) == 0

    asyncio.run(main())


def test_websocket_connections(registry: CollectorRegistry) -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await receive()
        await send({"type": "websocket.close", "code": 1000})

    metrics = RequestMetrics(echo, registry)
    scope = {"type": "websocket", "path": "/ws", "headers": []}

    async def main() -> None:
        exchange = Exchange(metrics, scope, [{"type": "websocket.connect"}])
        task = asyncio.create_task(exchange.run())
        await asyncio.sleep(0)
        metrics.flush()
        assert registry.get_sample_value("websocket_server_active_connections") == 1
        exchange.incoming.put_nowait({"type": "websocket.receive", "text": "hi"})
        await task

    asyncio.run(main())
    metrics.flush()
    assert registry.get_sample_value("websocket_server_active_connections") == 0
    assert registry.get_sample_value("websocket_server_connections_total") == 1


def test_lifespan_passes_through_untouched(registry: CollectorRegistry) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Any:
        return {}

    async def send(message: Any) -> None:
        return None

    scope = {"type": "lifespan"}
    asyncio.run(RequestMetrics(app, registry)(scope, receive, send))
    assert seen == [(scope, receive, send)]


def test_request_metrics_in_multiprocess_mode(directory: MultiprocDir) -> None:
    """The worker's path end to end: flush into mmap files, then compaction keeps them."""
    for pid in (501, 502):
        values.ValueClass = values.MultiProcessValue(lambda pid=pid: pid)
        metrics = RequestMetrics(hello)
        serve(metrics, http("/items/1"), http("/items/2"))
        metrics.flush()
    directory.worker_exited(501)
    registry = directory.collect_registry()
    assert duration_count(registry, "GET", "/items/{id}", "200") == 4
    active = {"http_request_method": "GET"}
    assert registry.get_sample_value("http_server_active_requests", active) == 0


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
    supervisor.worker_started(1)
    supervisor.worker_ready(1, 0.3)
    supervisor.worker_exited(1, "crash")
    supervisor.worker_exited(1, "memory")
    supervisor.worker_exited(1, "scale")
    supervisor.worker_exited(1, "shutdown")
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
