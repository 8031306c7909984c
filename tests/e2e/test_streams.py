"""Long-lived responses on drain: SSE streams end cleanly, WebSockets get 1012, the app's
lifespan shutdown runs, and a graceful timeout ends the app, not the process.

A FastAPI app (tests/apps/streams.py) with real clients over loopback
(tests/streamclient.py): each stream records how it ended, and the tests assert on that,
never on how fast (timing goals are bench/streams_drain.py's).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from loadgen import Load
from streamclient import StreamClients

from conftest import Supervisor, get, wait_until

BOOT = 90  # FastAPI workers on 2 shared cores: generous
END = 60  # deadline for every stream to have ended: generous, assertions are on outcomes


@pytest.fixture
def clients():
    opened: list[StreamClients] = []

    def make(port: int) -> StreamClients:
        c = StreamClients(port)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


def start(supervisor, tmp_path: Path, *args: str, workers: int = 2, mode: str = "") -> Supervisor:
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    env = {"STREAMS_MARKER_DIR": str(markers), "STREAMS_MODE": mode}
    server = supervisor("streams:app", "--workers", str(workers), *args, env=env)
    server.wait_ready(workers, timeout=BOOT)
    return server


def shutdown_markers(tmp_path: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in (tmp_path / "markers").glob("shutdown-*")}


def open_all(c: StreamClients, server: Supervisor, sse: int, ws: int) -> None:
    for i in range(sse):
        c.open_sse("/sse" if i % 2 else "/sse-starlette")
    for _ in range(ws):
        c.open_ws()
    wait_until(
        lambda: c.open_count() == sse + ws,
        BOOT,
        lambda: f"{sse + ws} streams open ({c.outcomes()})\n{server.log()}",
    )


def test_sigterm_ends_every_stream_cleanly_and_runs_the_lifespan_shutdown(
    supervisor, tmp_path, clients
):
    server = start(supervisor, tmp_path)
    workers = server.worker_pids()
    c = clients(server.port)
    open_all(c, server, sse=50, ws=50)

    slow: list[tuple[int, str]] = []
    request = threading.Thread(target=lambda: slow.append(get(server.port, "/slow?seconds=3", 60)))
    request.start()
    wait_until(
        lambda: list((tmp_path / "markers").glob("slow-*")), BOOT, "the slow request in flight"
    )

    server.signal(signal.SIGTERM)
    wait_until(c.ended, END, lambda: f"every stream ended ({c.outcomes()})\n{server.log()}")
    request.join(END)
    code = server.wait_exit(END)
    log = server.log()

    assert c.outcomes("sse") == {"clean": 50}, [s.detail for s in c.streams if s.detail][:5]
    assert c.outcomes("ws") == {"1012": 50}
    assert slow and slow[0][0] == 200, slow  # not streaming: left to finish
    assert shutdown_markers(tmp_path) == workers, log
    assert code == 0, log
    assert "stream(s) ended" in log
    assert "SIGKILL" not in log and "aborting" not in log, log


def test_an_app_ignoring_disconnect_is_cancelled_at_the_graceful_timeout(
    supervisor, tmp_path, clients
):
    server = start(
        supervisor, tmp_path, "--graceful-timeout", "2", "--shutdown-timeout", "10", mode="ignore"
    )
    workers = server.worker_pids()
    c = clients(server.port)
    for _ in range(4):
        c.open_sse("/ignore/")
    c.open_sse("/sse")
    wait_until(lambda: c.open_count() == 5, BOOT, lambda: f"streams open\n{server.log()}")

    server.signal(signal.SIGTERM)
    code = server.wait_exit(END)
    log = server.log()

    assert code == 1, log  # requests were cut
    assert "request(s) cut at the graceful timeout" in log, log
    assert shutdown_markers(tmp_path) == workers, log  # the lifespan shutdown still ran
    assert "aborting" not in log and "SIGKILL" not in log and "SIGABRT" not in log, log
    wait_until(c.ended, END, lambda: f"every stream ended ({c.outcomes()})")
    assert c.outcomes()["clean"] == 1  # the stream that listens ended well; the others cut


def test_a_shutdown_that_blocks_the_loop_is_aborted_with_its_stack(supervisor, tmp_path):
    server = start(
        supervisor, tmp_path, "--graceful-timeout", "1", "--shutdown-timeout", "1", mode="block"
    )
    server.signal(signal.SIGTERM)
    code = server.wait_exit(END)
    log = server.log()

    assert code == 1, log
    assert "still running" in log and "aborting; its stack follows" in log, log
    assert "time.sleep(3600)" in log or "streams.py" in log, log  # faulthandler's stack
    assert "killed by SIGABRT" in log or "killed by SIGKILL" in log, log
    assert not shutdown_markers(tmp_path)


def test_a_lifespan_shutdown_that_hangs_is_bounded_by_the_shutdown_timeout(supervisor, tmp_path):
    server = start(
        supervisor, tmp_path, "--graceful-timeout", "1", "--shutdown-timeout", "1", mode="hang"
    )
    server.signal(signal.SIGTERM)
    code = server.wait_exit(END)
    log = server.log()

    assert code == 1, log
    assert "application shutdown still running after 1s" in log, log
    assert "lifespan shutdown: timeout" in log, log
    assert "aborting" not in log and "SIGABRT" not in log, log


def test_websockets_opened_one_after_another_spread_over_the_workers(supervisor, tmp_path, clients):
    server = start(supervisor, tmp_path, workers=4)
    c = clients(server.port)
    for n in range(1, 101):
        c.open_ws()
        wait_until(
            lambda n=n: c.open_count() == n,
            30,
            lambda n=n: f"websocket {n} open ({c.outcomes()})\n{server.log()}",
        )
    per_worker = c.per_worker()
    assert len(per_worker) == 4, per_worker
    assert all(15 <= count <= 35 for count in per_worker.values()), per_worker


def test_sighup_with_open_streams_replaces_every_worker_and_ends_them_cleanly(
    supervisor, tmp_path, clients
):
    server = start(
        supervisor, tmp_path, "--profile", "streaming", "--host", "127.0.0.1", "--no-metrics"
    )
    old = server.worker_pids()
    c = clients(server.port)
    streams = [c.open_reconnecting_sse("/sse" if i % 2 else "/sse-starlette") for i in range(50)]
    wait_until(lambda: c.open_count() == 50, BOOT, lambda: f"streams open\n{server.log()}")

    with Load(server.port, rate=100, max_seconds=240) as load:
        load.wait_for_requests(50, timeout=30)
        server.signal(signal.SIGHUP)
        wait_until(
            lambda: "reload complete" in server.log(), 200, lambda: f"the reload\n{server.log()}"
        )
        new = server.worker_pids()
        wait_until(
            lambda: c.open_count() == 50 and all(s.pid in new for s in streams),
            END,
            lambda: f"every stream back, on a new worker ({c.per_worker()}, new {new})",
        )
        stats = load.stop()

    assert not (old & new), (old, new)
    ended = [outcome for s in streams for _, outcome in s.history]
    served_by_old = {pid for s in streams for pid, _ in s.history}
    assert ended and set(ended) == {"clean"}, ended
    assert served_by_old <= old | new
    assert all(s.history and s.history[0][0] in old for s in streams)  # every old one ended
    assert stats.failed == 0, stats.examples
    assert stats.ok > 0
