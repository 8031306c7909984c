"""`--engine gunicorn`: gunicorn's arbiter supervising asgi-supervise's workers.

The engine tests that apply to gunicorn's arbiter, run against it: workers serve and are
counted exactly, a killed one is replaced and counted, readiness fails first through the
drain delay (the SIGTERM drain itself is tests/e2e/test_engine.py's, on both engines), a
broken app stops the master, a SIGKILLed master leaves no
worker, and a HUP under keep-alive load fails no request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
from loadgen import Load
from test_engine import _start_slow_requests
from test_metrics_endpoint import REQUESTS, _put, readyz_and_app_until_exit, scrape, value

from conftest import alive, free_port, get, run_cli, try_get, wait_until

pytestmark = pytest.mark.timeout(90)
GUNICORN = ("--engine", "gunicorn")
RESTARTS = "asgi_supervise_worker_restarts_total"


def test_three_workers_serve_are_counted_exactly_and_a_killed_one_is_replaced(supervisor):
    mport = free_port()
    server = supervisor(
        "testapp:app", *GUNICORN, "--workers", "3", "--metrics", "--metrics-port", str(mport)
    )
    server.wait_ready(3)
    pids = server.serving_pids(3)
    assert pids == server.worker_pids() and server.pid not in pids
    assert "engine: gunicorn" in server.log()

    answers = [_put(server.port) for _ in range(300)]
    assert answers == [200] * 300
    put = {"http_request_method": "PUT"}
    wait_until(lambda: value(scrape(mport), REQUESTS, **put) == 300, 5, "the count to be 300")
    status = json.loads(get(mport, "/status")[1])
    assert status["master"]["engine"] == "gunicorn"
    assert [w["state"] for w in status["workers"]] == ["ready"] * 3
    assert sum(w["requests"] for w in status["workers"]) >= 300

    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    crash = {"reason": "crash"}
    wait_until(lambda: value(scrape(mport), RESTARTS, **crash) == 1, 10, "the crash counted")
    new = wait_until(lambda: server.worker_pids() - pids, 15, "a replacement process")
    assert len(new) == 1 and victim not in server.worker_pids()
    server.wait_ready(4)  # the replacement reported ready too
    assert value(scrape(mport), REQUESTS, **put) == 300  # what the dead one sent outlives it
    assert value(scrape(mport), "asgi_supervise_workers", state="ready") == 3


def test_readyz_is_503_through_the_drain_delay_while_the_app_serves(supervisor, tmp_path: Path):
    """Then the drain: a request longer than the graceful timeout is cut, and the exit
    code says so (1), as on the native engine."""
    mport = free_port()
    inflight = tmp_path / "inflight"
    inflight.mkdir()
    server = supervisor(
        "testapp:app", *GUNICORN, "--drain-delay", "3", "--graceful-timeout", "2",
        "--metrics", "--metrics-port", str(mport), "--reload-surge", "2",
        env={"TESTAPP_INFLIGHT_DIR": str(inflight)},
    )  # fmt: skip
    server.wait_ready(1)
    long, threads = _start_slow_requests(server.port, 1, 30.0)
    wait_until(lambda: len(list(inflight.iterdir())) == 1, 15, "the long request in flight")
    # A setting only the native master applies is named, not dropped silently.
    assert (
        "engine gunicorn does not apply --reload-surge='2' (command line): a HUP starts"
        in server.log()
    )
    wait_until(lambda: (try_get(mport, "/readyz") or (0,))[0] == 200, 15, "readyz 200")
    server.signal(signal.SIGTERM)
    wait_until(lambda: (try_get(mport, "/readyz") or (0,))[0] == 503, 5, "readyz 503")
    readyz, app = readyz_and_app_until_exit(server, mport)
    assert server.wait_exit() == 1
    assert readyz and set(readyz) == {503}
    assert len(app) >= 10 and set(app) == {200}
    threads[0].join(10)
    assert long and long[0] != 200  # cut by the worker at its graceful timeout
    log = server.log()
    assert log.index("serving 3.0s more") < log.index("drain delay over")
    assert "graceful timeout (2s): cancelling 1 request(s)" in log
    assert "master stopped uncleanly" in log


def test_app_that_cannot_start_stops_the_master_with_code_3(supervisor):
    server = supervisor("broken_import:app", *GUNICORN, "--workers", "2")
    assert server.wait_exit(30) == 3
    log = server.log()
    error = "No module named 'this_module_does_not_exist'"
    assert log.count("failed to start:") == 1  # once in full ...
    (verdict,) = [line for line in log.splitlines() if "giving up: " in line]
    assert error in verdict  # ... and once in the last line
    assert log.count("Booting worker with pid") <= 2  # no respawn: no crash loop


def test_master_sigkill_leaves_no_workeralive(supervisor):
    server = supervisor("testapp:app", *GUNICORN, "--workers", "2")
    server.wait_ready(2)
    workers = server.worker_pids()
    server.process.kill()
    server.process.wait(5)
    wait_until(lambda: not any(map(alive, workers)), 10, f"workers {workers} to die")


def test_sighup_under_keepalive_load_fails_no_request(supervisor, tmp_path: Path):
    mport = free_port()
    pid_file = tmp_path / "master.pid"
    server = supervisor(
        "testapp:app", *GUNICORN, "--workers", "2", "--metrics", "--metrics-port", str(mport),
        "--pid-file", str(pid_file),
    )  # fmt: skip
    server.wait_ready(2)
    before = server.worker_pids()
    with Load(server.port, rate=150) as load:
        load.wait_for_requests(150)
        server.signal(signal.SIGHUP)
        reloaded = {"reason": "reload"}
        wait_until(lambda: value(scrape(mport), RESTARTS, **reloaded) == 2, 30, "2 replaced")
        after = server.worker_pids()
        load.wait_for_requests(load.stats.total + 150)
        stats = load.stop()
    assert stats.failed == 0, (stats.failures, stats.examples)
    assert stats.ok > 300
    assert len(after) == 2 and not after & before
    assert set(stats.pids) & after  # the new workers took the traffic
    # Workers forked from the master end where they are: the old ones' exits left the
    # master's pid file alone (it goes when the master does).
    assert pid_file.read_text().strip() == str(server.pid)
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not pid_file.exists()


def test_dev_reload_is_refused_with_one_line():
    result = run_cli("testapp:app", *GUNICORN, "--reload")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "asgi-supervise: --reload=True (command line): not with --engine gunicorn (gunicorn "
        "restarts every worker at once on a change); use the native engine for development"
    ]


def test_workers_recycle_themselves_by_memory_and_by_age(supervisor):
    """gunicorn's arbiter recycles only by request count: the worker measures its own RSS
    and age, drains, and gunicorn forks its successor."""
    mport = free_port()
    server = supervisor(
        "testapp:app", *GUNICORN, "--max-worker-memory", "150", "--max-worker-lifetime", "8",
        "--metrics", "--metrics-port", str(mport),
    )  # fmt: skip
    server.wait_ready(1)
    (first,) = server.worker_pids()
    assert server.get("/grow?mb=200", timeout=60)[0] == 200
    memory = {"reason": "memory"}
    wait_until(lambda: value(scrape(mport), RESTARTS, **memory) == 1, 20, "the memory recycle")
    assert f"[{first}] INFO    due for recycling: memory (RSS" in server.log()
    (second,) = server.serving_pids(1)
    assert second != first
    lifetime = {"reason": "lifetime"}
    wait_until(lambda: value(scrape(mport), RESTARTS, **lifetime) >= 1, 20, "the age recycle")
    assert second not in server.worker_pids()
    assert value(scrape(mport), RESTARTS, reason="crash") == 0


def test_sighup_rereads_the_config_and_an_invalid_one_reloads_nothing(supervisor, tmp_path):
    conf = tmp_path / "conf.toml"
    conf.write_text('workers = 2\nengine = "gunicorn"\n')
    server = supervisor("testapp:app", "--config", str(conf))
    server.wait_ready(2)
    before = server.worker_pids()
    conf.write_text('workers = 3\nengine = "gunicorn"\nbacklog = 100\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: len(server.worker_pids() - before) == 3, 20, "3 new workers")
    wait_until(lambda: not server.worker_pids() & before, 20, "the old workers gone")
    server.wait_ready(5)
    log = server.log()
    assert "SIGHUP: config applied: workers 2 -> 3 (file:" in log
    assert "SIGHUP: not applied without a restart (running values kept): backlog 2048 -> 100" in log
    assert server.get("/pid")[0] == 200  # still on the port it bound

    now = server.worker_pids()
    conf.write_text('workers = "many"\nengine = "gunicorn"\n')
    server.signal(signal.SIGHUP)
    wait_until(lambda: "the new config is invalid" in server.log(), 10, "the refusal")
    assert server.worker_pids() == now  # nothing reloaded
    (line,) = [x for x in server.log().splitlines() if "the new config is invalid" in x]
    assert "workers" in line and "many" in line


def test_systemd_hears_ready_once_the_workers_are(supervisor, tmp_path: Path):
    """Not gunicorn's READY=1 at boot: once every worker is ready, again after a HUP."""
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(10)
    try:
        server = supervisor(
            "testapp:app", *GUNICORN, "--workers", "2", env={"NOTIFY_SOCKET": address}
        )
        assert listener.recv(4096).decode().startswith("READY=1\nSTATUS=serving with 2 workers")
        assert server.log().count(" ready in ") == 2  # only once both workers are ready
        server.signal(signal.SIGHUP)
        assert listener.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert listener.recv(4096).decode().startswith("READY=1")
        assert server.log().count(" ready in ") == 4
        server.signal(signal.SIGTERM)
        assert listener.recv(4096).decode().startswith("STOPPING=1")
        assert server.wait_exit() == 0
    finally:
        listener.close()
