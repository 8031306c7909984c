"""Metrics and health endpoints, served by the master on their own port."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from asgi_supervise.sizing.budgets import memory_limit
from asgi_supervise.sizing.host import read_host
from asgi_supervise.worker.meter import COMPILED
from conftest import free_port, get, try_get, wait_until

pytestmark = pytest.mark.timeout(90)


def _metrics_args(port: int, *extra: str) -> tuple[str, ...]:
    return ("--metrics", "--metrics-port", str(port), *extra)


def scrape(port: int) -> str:
    status, body = get(port, "/metrics")
    assert status == 200
    return body


def value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


REQUESTS = "http_server_request_duration_seconds_count"


def _put(port: int, pids: set[int] | None = None) -> int:
    """PUT /pid: only the requests a test counts carry this method label.

    Readiness probes and scrapes are GETs, so they never blur an exact total.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("PUT", "/pid")
        response = conn.getresponse()
        body = response.read()
    except OSError:
        return 0
    finally:
        conn.close()
    if pids is not None and body.isdigit():
        pids.add(int(body))
    return response.status


def readyz_and_app_until_exit(server, mport: int) -> tuple[list[int], list[int]]:
    """The statuses of /readyz and of the app, sampled every 50 ms until the master exits."""
    readyz, app = [], []
    while server.process.poll() is None:
        answer = try_get(mport, "/readyz", timeout=1)
        if answer:
            readyz.append(answer[0])
        served = try_get(server.port, "/pid", timeout=1)
        if served:
            app.append(served[0])
        time.sleep(0.05)  # a sampling interval; the loop's end is the exit
    return readyz, app


def test_requests_over_three_workers_sum_exactly(supervisor):
    mport = free_port()
    server = supervisor("testapp:app", "--workers", "3", *_metrics_args(mport))
    server.wait_ready(3)
    pids: set[int] = set()
    answers: list[int] = []

    def send(n: int) -> None:
        for _ in range(n):
            answers.append(_put(server.port, pids))

    threads = [threading.Thread(target=send, args=(50,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == [200] * 300
    assert len(pids) >= 2  # the load really was spread over workers
    put = {"http_request_method": "PUT"}
    wait_until(lambda: value(scrape(mport), REQUESTS, **put) == 300, 5, "the count to be 300")


@pytest.mark.timeout(240)  # 12 worker boots on a 2-core machine that may be busy
def test_counters_survive_recycling_and_files_stay_bounded(supervisor, tmp_path: Path):
    """Ours (shipped to the master) and the app's own (multiprocess files, compacted)."""
    mport = free_port()
    mpdir = tmp_path / "metrics"
    server = supervisor(
        "countingapp:app", "--workers", "2", "--max-requests", "5", "--reload-surge", "2",
        *_metrics_args(mport, "--multiproc-dir", str(mpdir)),
    )  # fmt: skip
    server.wait_ready(2)
    put = {"http_request_method": "PUT"}
    seen, sent = 0.0, 0
    # A count, not a rate: how fast workers are replaced is bench's business. 12 recycles
    # leave 14 workers' files without compaction, well over the bound asserted below.
    for _ in range(2000):  # 10,000 requests at most: 5 per worker, 2 workers, 12 recycles
        if server.log().count("replaced (max-requests)") >= 12:
            break
        for _ in range(5):
            sent += _put(server.port) == 200
        total = value(scrape(mport), REQUESTS, **put)
        assert total >= seen, "a counter went backwards"
        seen = total
    else:
        raise AssertionError(f"12 recycles did not happen in {sent} requests\n{server.log()}")
    files = list(mpdir.glob("*/*.db"))  # in the master's private directory
    assert len(files) <= 8, sorted(f.name for f in files)  # live workers + the archive
    wait_until(lambda: value(scrape(mport), REQUESTS, **put) == sent, 10, f"{sent} counted")
    assert value(scrape(mport), "app_handled_total", method="PUT") == sent
    restarts = value(scrape(mport), "asgi_supervise_worker_restarts_total", reason="requests")
    assert restarts >= 12


def test_readyz_turns_503_during_drain_delay_while_app_serves(supervisor):
    mport = free_port()
    server = supervisor("testapp:app", "--drain-delay", "3", *_metrics_args(mport))
    server.wait_ready(1)
    wait_until(lambda: (try_get(mport, "/readyz") or (0,))[0] == 200, 15, "readyz 200")
    assert json.loads(get(mport, "/readyz")[1]) == {"ready": True}
    server.signal(signal.SIGTERM)
    wait_until(lambda: (try_get(mport, "/readyz") or (0,))[0] == 503, 5, "readyz 503")
    readyz, app = readyz_and_app_until_exit(server, mport)
    assert server.wait_exit() == 0
    assert readyz and set(readyz) == {503}  # never 200 again once draining
    assert len(app) >= 10 and set(app) == {200}  # the app kept serving meanwhile


def test_ready_gauge_is_the_readyz_verdict_and_the_memory_limit_the_plans(supervisor):
    """With --min-ready 2, one ready worker is not ready: `asgi_supervise_ready` says so
    where the worker states alone would not; a drain turns it 0 too."""
    mport = free_port()
    args = ("--workers", "2", "--min-ready", "2", "--drain-delay", "1")
    server = supervisor("testapp:app", *args, *_metrics_args(mport))
    server.wait_ready(2)

    def ready_now() -> tuple[int, float, float, float]:
        text = scrape(mport)  # one scrape: the gauges at one moment
        gauges = (value(text, "asgi_supervise_ready"), value(text, "asgi_supervise_draining"))
        states = value(text, "asgi_supervise_workers", state="ready")
        return (try_get(mport, "/readyz") or (0,))[0], *gauges, states

    wait_until(lambda: ready_now() == (200, 1, 0, 2), 10, lambda: f"ready {ready_now()}")
    text = scrape(mport)
    plan = json.loads(get(mport, "/status")[1])["plan"]
    limit, _ = memory_limit(read_host())
    assert limit and plan["memory_limit"] == limit
    assert value(text, "asgi_supervise_memory_limit_bytes") == limit
    server.signal(signal.SIGTTOU)  # one worker left, below --min-ready
    wait_until(lambda: ready_now() == (503, 0, 0, 1), 15, lambda: f"1 of 2 {ready_now()}")
    server.signal(signal.SIGTTIN)
    wait_until(lambda: ready_now() == (200, 1, 0, 2), 15, lambda: f"ready again {ready_now()}")
    server.signal(signal.SIGTERM)
    wait_until(lambda: ready_now()[:3] == (503, 0, 1), 5, lambda: f"draining {ready_now()}")
    assert server.wait_exit() == 0


def test_killed_worker_counts_a_crash_restart(supervisor):
    mport = free_port()
    server = supervisor("testapp:app", "--workers", "2", *_metrics_args(mport))
    server.wait_ready(2)
    reason = {"reason": "crash"}
    assert value(scrape(mport), "asgi_supervise_worker_restarts_total", **reason) == 0
    put = {"http_request_method": "PUT"}
    assert [_put(server.port) for _ in range(40)] == [200] * 40
    wait_until(lambda: value(scrape(mport), REQUESTS, **put) == 40, 5, "40 delivered")
    os.kill(sorted(server.worker_pids())[0], signal.SIGKILL)
    wait_until(
        lambda: value(scrape(mport), "asgi_supervise_worker_restarts_total", **reason) == 1,
        5,
        "the crash to be counted",
    )
    assert value(scrape(mport), REQUESTS, **put) == 40  # what it delivered outlives it
    server.serving_pids(2)
    assert [_put(server.port) for _ in range(20)] == [200] * 20
    wait_until(lambda: value(scrape(mport), REQUESTS, **put) == 60, 5, "60 counted")
    status = json.loads(get(mport, "/status")[1])
    assert [w["state"] for w in status["workers"]].count("ready") >= 1
    meter = "Meter" if COMPILED else "PythonMeter"
    assert {w["request_meter"] for w in status["workers"] if w["state"] == "ready"} == {meter}
    assert status["plan"]["workers"] == 2


def _listening_ports(pid: int) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_metrics_binds_loopback_by_default_and_is_off_in_dev(supervisor, tmp_path: Path):
    mport = free_port()
    server = supervisor("testapp:app", *_metrics_args(mport))
    server.wait_ready(1)
    assert ("127.0.0.1", mport) in _listening_ports(server.pid)

    dev = supervisor("testapp:app", "--profile", "dev")
    dev.wait_ready(1)
    assert _listening_ports(dev.pid) == {("127.0.0.1", dev.port)}
    assert "metrics and health on" not in dev.log()


def test_route_label_is_the_template_not_the_path(supervisor):
    mport = free_port()
    server = supervisor("routed:app", *_metrics_args(mport))
    server.wait_ready(1)
    for n in range(20):
        assert get(server.port, f"/items/{n}")[0] == 200
    assert get(server.port, "/nowhere")[0] == 404
    wait_until(
        lambda: value(scrape(mport), REQUESTS, http_route="/items/{id}") == 20, 5, "20 items"
    )
    text = scrape(mport)
    assert value(text, REQUESTS, http_route="unmatched") == 1
    assert "/items/7" not in text  # raw paths never become label values


def test_metrics_port_in_use_is_a_usage_error(supervisor):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        server = supervisor("testapp:app", *_metrics_args(holder.getsockname()[1]))
        assert server.wait_exit(15) == 2
    finally:
        holder.close()
    assert "cannot serve metrics and health on" in server.log()
    assert "booting" not in server.log()


def test_reload_is_counted_by_outcome_and_replacements_by_reason(supervisor):
    mport = free_port()
    server = supervisor("testapp:app", "--workers", "2", *_metrics_args(mport))
    server.wait_ready(2)
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log(), 15, "the reload")

    def counted() -> bool:
        text = scrape(mport)
        return (
            value(text, "asgi_supervise_reloads_total", outcome="completed") == 1
            and value(text, "asgi_supervise_worker_restarts_total", reason="reload") == 2
        )

    wait_until(counted, 5, lambda: "reload metrics\n" + scrape(mport))
    assert value(scrape(mport), "asgi_supervise_reload_duration_seconds_count") == 1
    # Each replaced worker's own drain, stop request to exit, once per worker.
    assert value(scrape(mport), "asgi_supervise_worker_drain_seconds_count") == 2
