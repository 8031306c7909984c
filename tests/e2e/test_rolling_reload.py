"""Rolling reload, recycling and scaling under keep-alive load, with zero failures."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from loadgen import Load

from conftest import APPS, get, try_get, wait_until

pytestmark = pytest.mark.timeout(90)
NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}  # each reload must compile the file it sees


def _no_failures(load: Load) -> None:
    stats = load.stop()
    assert stats.failed == 0, (stats.failures, stats.examples)
    assert stats.ok > 100


def _most_workers_during_a_reload(server) -> int:
    """SIGHUP, then the most worker processes seen at once until the reload completes."""
    server.signal(signal.SIGHUP)
    most, deadline = 0, time.monotonic() + 30
    while "reload complete" not in server.log():
        most = max(most, len(server.worker_pids()))
        assert time.monotonic() < deadline, "the reload did not complete"
        time.sleep(0.02)  # sampling the process count; the loop's end is the log line
    return most


def test_sighup_under_load_replaces_every_worker_with_zero_failures(supervisor):
    server = supervisor("testapp:app", "--workers", "2")
    server.wait_ready(2)
    before = server.worker_pids()
    fork_server = server.fork_server_pids()
    with Load(server.port, rate=150) as load:
        load.wait_for_requests(150)
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload complete" in server.log(), 20, "the reload to complete")
        after = server.worker_pids()
        served_before = load.stats.total
        load.wait_for_requests(served_before + 150)
        _no_failures(load)
    assert len(after) == 2 and not after & before
    # New workers took the traffic. (Which of them is the kernel's choice: accept wake-ups are
    # LIFO, so a handful of reconnecting keep-alive clients may all land on one worker.)
    assert set(load.stats.pids) & after
    assert server.log().count("replaced (reload)") == 2
    # No --preload: the fork server holds no app code and forks the new generation too.
    assert server.fork_server_pids() == fork_server and "forks generation 1 too" in server.log()


def _app_in(tmp_path: Path) -> Path:
    source = tmp_path / "liveapp.py"
    shutil.copy(APPS / "testapp.py", source)
    return source


def test_reload_with_broken_new_code_keeps_old_workers_serving(supervisor, tmp_path):
    source = _app_in(tmp_path)
    server = supervisor(
        "liveapp:app", "--workers", "2", "--app-dir", str(tmp_path), env=NO_BYTECODE
    )
    server.wait_ready(2)
    before = server.worker_pids()
    with Load(server.port, rate=150) as load:
        load.wait_for_requests(100)
        source.write_text(source.read_text() + "\nraise RuntimeError('half-deployed release')\n")
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload aborted" in server.log(), 20, "the reload to be aborted")
        load.wait_for_requests(load.stats.total + 150)
        _no_failures(load)
    assert server.worker_pids() == before
    log = server.log()
    assert "RuntimeError: half-deployed release" in log
    assert "the old workers keep serving" in log

    shutil.copy(APPS / "testapp.py", source)  # the fix is deployed: the next HUP works
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log(), 20, "the fixed reload")
    assert not server.worker_pids() & before


BROKEN_UNTIL_TOLD = """
import pathlib, time
here = pathlib.Path(__file__).parent
(here / "broken-importing").touch()
while not (here / "fail-now").exists():
    time.sleep(0.05)
raise RuntimeError("half-deployed release")
"""


def test_a_fix_deployed_while_the_broken_code_starts_is_rolled_out(supervisor, tmp_path):
    """SIGHUP with broken code, then the fix and a second SIGHUP while the broken worker is
    still starting: its failure must not abort the newer reload."""
    source = _app_in(tmp_path)
    good = source.read_text()
    server = supervisor("liveapp:app", "--app-dir", str(tmp_path), env=NO_BYTECODE)
    server.wait_ready(1)
    before = server.worker_pids()
    source.write_text(good + BROKEN_UNTIL_TOLD)
    server.signal(signal.SIGHUP)
    importing = tmp_path / "broken-importing"
    wait_until(importing.exists, 15, "the new worker importing the broken code")
    source.write_text(good)
    server.signal(signal.SIGHUP)
    wait_until(lambda: "restarted from the current state" in server.log(), 15, "the second HUP")
    (tmp_path / "fail-now").touch()  # now the first replacement fails
    wait_until(lambda: "half-deployed release" in server.log(), 15, "the broken worker's error")
    wait_until(lambda: "reload complete" in server.log(), 30, lambda: f"the fix\n{server.log()}")
    assert "reload aborted" not in server.log()
    assert server.get("/pid")[0] == 200
    assert not server.worker_pids() & before


def test_max_requests_recycles_under_load_with_zero_failures(supervisor):
    server = supervisor("testapp:app", "--workers", "2", "--max-requests", "50")
    server.wait_ready(2)
    with Load(server.port, rate=150) as load:
        wait_until(lambda: server.log().count("replaced (max-requests)") >= 4, 30, "4 recycles")
        # Which worker a reconnecting client lands on is the kernel's choice: a replacement
        # may serve nothing before the next one, so wait until 5 have served, not assume it.
        wait_until(lambda: len(load.stats.pids) >= 5, 20, "5 workers to have served")
        _no_failures(load)
    assert len(load.stats.pids) >= 5
    # Never more than workers + surge at once; back to 2 once the last replacement settles.
    wait_until(lambda: len(server.worker_pids()) == 2, 10, "2 workers after recycling")


def test_worker_over_memory_limit_is_recycled(supervisor):
    server = supervisor("testapp:app", "--max-worker-memory", "150")
    server.wait_ready(1)
    (first,) = server.worker_pids()
    assert server.get("/grow?mb=200", timeout=60)[0] == 200  # 200 MB of urandom: slow when busy
    wait_until(lambda: "replaced (memory)" in server.log(), 15, "the memory recycle")
    log = server.log()
    assert f"worker 1 (pid {first}) due for recycling: memory" in log
    assert first not in server.worker_pids()
    assert try_get(server.port, "/pid")


def test_ttin_then_ttou_scale_with_zero_failures(supervisor):
    server = supervisor("testapp:app", "--workers", "2")
    server.wait_ready(2)
    with Load(server.port, rate=150) as load:
        load.wait_for_requests(100)
        server.signal(signal.SIGTTIN)
        wait_until(lambda: server.log().count(" ready in ") >= 3, 10, "a third worker")
        wait_until(lambda: len(server.worker_pids()) == 3, 10, "3 workers")
        load.wait_for_requests(load.stats.total + 100)
        server.signal(signal.SIGTTOU)
        wait_until(lambda: "scale-down" in server.log(), 10, "the scale-down")
        wait_until(lambda: len(server.worker_pids()) == 2, 10, "back to 2 workers")
        load.wait_for_requests(load.stats.total + 100)
        _no_failures(load)


def test_old_workers_still_draining_count_against_the_surge(supervisor):
    """2 workers, --reload-surge 1: never more than 3 processes, though the old worker of
    slot 1 is held draining by an idle keep-alive connection after its replacement is up."""
    server = supervisor("testapp:app", "--workers", "2", "--timeout-keep-alive", "2")
    server.wait_ready(2)
    first = int(re.search(r"worker 1 \(pid (\d+)\) ready", server.log()).group(1))
    connections = []

    def connected_to_slot_1() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/pid")
        connections.append(conn)
        return int(conn.getresponse().read()) == first

    try:
        wait_until(connected_to_slot_1, 10, "a keep-alive connection to slot 1", interval=0.01)
        most = _most_workers_during_a_reload(server)
    finally:
        for conn in connections:
            conn.close()
    assert most == 3  # replacement first: a new worker beside both old ones, and no more
    log = server.log()
    second_booting = re.compile(r"worker 2 \(pid \d+\) booting").search(log, log.index("SIGHUP"))
    assert log.index(f"(pid {first}) exited") < second_booting.start()  # it waited for the exit


def test_a_reload_drains_first_when_the_database_share_holds_no_more_pools(supervisor):
    """2 workers x 10 connections of 20: a replacement beside its old worker would open a
    third pool. Each old worker drains first instead, so no more than 2 workers (and 20
    connections) exist at any time, and the other slot serves throughout."""
    db = ("--db-max-connections", "20", "--db-pool-size", "10")
    server = supervisor("testapp:app", "--workers", "2", *db)
    server.wait_ready(2)
    before = server.worker_pids()
    with Load(server.port, rate=150) as load:
        load.wait_for_requests(100)
        most = _most_workers_during_a_reload(server)
        load.wait_for_requests(load.stats.total + 100)
        _no_failures(load)
    assert most == 2  # replacement first would have shown 3
    assert not server.worker_pids() & before
    log = server.log()
    full = "no database connections (2 x 10 of 20 held) for a replacement beside it"
    assert log.count(full) == 2, log


def test_ten_hups_in_five_seconds_end_with_n_workers(supervisor):
    server = supervisor("testapp:app", "--workers", "2")
    server.wait_ready(2)
    before = server.worker_pids()
    with Load(server.port, rate=150) as load:
        load.wait_for_requests(100)
        for _ in range(10):
            server.signal(signal.SIGHUP)
            time.sleep(0.5)  # the scenario itself: a HUP every half second
        wait_until(lambda: server.log().count("reload complete") >= 1, 30, "the reloads to settle")
        wait_until(
            lambda: len(server.worker_pids()) == 2,
            10,
            lambda: f"exactly 2 workers, not {server.worker_pids()}\n{server.log()}",
        )
        load.wait_for_requests(load.stats.total + 150)
        _no_failures(load)
    after = server.worker_pids()
    assert len(after) == 2 and not after & before


# What a client may see of a drain: a new connection refused once the listeners are closed,
# or reset if the kernel had queued it on a listener when the listener's last copy closed
# (the kernel resets what is queued on a listening socket as it closes). Both reach no app,
# before any byte of a response: a client retries them safely, as it would a refused one.
NEVER_SERVED = {"refused", "reset"}


def test_sigterm_during_a_reload_drains_everything_cleanly(supervisor, tmp_path):
    """Every request the app started is answered in full; the only failures are requests
    the app never saw, refused or reset before any byte of a response."""
    started_file = tmp_path / "started"
    server = supervisor(
        "testapp:app", "--workers", "2", env={"TESTAPP_STARTED_FILE": str(started_file)}
    )
    server.wait_ready(2)
    with Load(server.port, rate=150, tagged=True) as load:
        load.wait_for_requests(100)
        server.signal(signal.SIGHUP)
        wait_until(lambda: "rolling reload" in server.log(), 15, "the reload to start")
        wait_until(lambda: " booting" in server.log().split("rolling reload", 1)[1], 15, "a spawn")
        server.signal(signal.SIGTERM)
        assert server.wait_exit(20) == 0
        served = load.stats.ok
        load.wait_for_requests(load.stats.total + 20)  # clients that find nothing listening
        stats = load.stop()
    assert "master stopped cleanly" in server.log()
    started = set(started_file.read_text().split())
    outcomes = stats.by_id
    answered = {rid for rid, (outcome, _, _) in outcomes.items() if outcome == "ok"}
    assert served > 100 and len(answered) == stats.ok
    cut = {rid: outcomes.get(rid) for rid in started - answered}
    assert not cut, f"requests the app started got no full response: {cut}"
    assert answered <= started  # the app saw every request it answered: the ids mean something
    failed = {rid: o for rid, o in outcomes.items() if o[0] != "ok"}
    wrong = {rid: o for rid, o in failed.items() if o[0] not in NEVER_SERVED or o[1] or o[2]}
    assert not wrong, (f"failures other than a new connection refused or reset before any "
                       f"response: {wrong}", stats.examples)  # fmt: skip
    assert stats.failures["refused"] >= 20  # after the exit, every connection is refused


SLOW_START_APP = """
import asyncio, os, pathlib

SLOW = pathlib.Path(__file__).with_name("slow").exists()  # the replacements start slowly


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(30 if SLOW else 0)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = str(os.getpid()).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""


def test_sigterm_while_a_replacement_starts_refuses_new_connections(supervisor, tmp_path):
    """The drain closes the listener at once, even in a worker whose lifespan is starting."""
    (tmp_path / "slowstart.py").write_text(SLOW_START_APP)
    server = supervisor("slowstart:app", "--app-dir", str(tmp_path))
    server.wait_ready(1)
    (old,) = server.worker_pids()
    (tmp_path / "slow").touch()
    server.signal(signal.SIGHUP)

    def replacement_starting() -> bool:
        log = server.log()
        return (
            "rolling reload" in log
            and "Waiting for application startup" in log.split("rolling reload", 1)[1]
        )

    wait_until(replacement_starting, 15, "the replacement's lifespan startup")
    server.signal(signal.SIGTERM)
    wait_until(lambda: f"(pid {old}) exited" in server.log(), 15, "the old worker to exit")
    assert server.process.poll() is None  # the replacement is still starting: 30 s
    try:
        with pytest.raises(ConnectionRefusedError):
            get(server.port, "/pid", timeout=2)
    finally:
        server.signal(signal.SIGQUIT)  # stop now: nothing to wait for
        server.wait_exit(15)


def test_sigusr1_reopens_log_files_after_rotation(supervisor, tmp_path):
    log_file = tmp_path / "app.log"
    server = supervisor("testapp:app", "--log-file", str(log_file))
    wait_until(lambda: log_file.exists() and " ready in " in log_file.read_text(), 15, "ready")
    (worker,) = server.worker_pids()
    rotated = tmp_path / "app.log.1"
    log_file.rename(rotated)  # what logrotate does before it signals
    server.signal(signal.SIGUSR1)
    wait_until(lambda: log_file.exists() and "log files reopened" in log_file.read_text(), 15,
               "the master to write to the new file")  # fmt: skip

    def worker_reopened() -> bool:
        try_get(server.port, "/pid")  # an access line from the worker
        return log_file.exists() and f"[{worker}]" in log_file.read_text()

    wait_until(worker_reopened, 15, "the worker to write to the new file")
    assert "log files reopened" not in rotated.read_text()
    # Its replacement is forked from the fork server, which set up logging before the
    # rotation and was not told to reopen: it writes to the new file too.
    os.kill(worker, signal.SIGKILL)

    def replacement_writes() -> bool:
        try_get(server.port, "/pid")
        new = server.worker_pids() - {worker}
        return bool(new) and f"[{min(new)}]" in log_file.read_text()

    wait_until(replacement_writes, 15, "the replacement to write to the new file")
    assert f"[{min(server.worker_pids())}]" not in rotated.read_text()


def test_a_drain_starts_when_asked_and_ends_with_its_last_connection(supervisor):
    """Not at a tick: here workers tick, and look at their connections while draining,
    once an hour (tests/apps/longtick), and every timeout of a drain is an hour too. The
    reload completes only if the old worker is woken by its SIGTERM, then by a request
    ending (its response says `Connection: close`), then by its last connection, idle,
    closed by the client."""
    env = {"PYTHONPATH": str(APPS / "longtick")}
    timeouts = ("timeout-keep-alive", "graceful-timeout", "stream-drain-grace", "worker-timeout")
    hour = [f"--{name}=3600" for name in timeouts]
    server = supervisor("testapp:app", *hour, env=env)
    server.wait_ready(1)
    conn, idle = (http.client.HTTPConnection("127.0.0.1", server.port, timeout=5) for _ in "ab")
    for each in (conn, idle):
        each.request("GET", "/pid")
        old_pid = int(each.getresponse().read())
    server.signal(signal.SIGHUP)
    wait_until(lambda: f"(pid {old_pid}) stopping: reload" in server.log(), 15, server.log)
    answers = []

    def answered_with_close() -> bool:  # the signal may not have reached it yet
        conn.request("GET", "/pid")
        response = conn.getresponse()
        answers.append(int(response.read()))
        return response.getheader("connection") == "close"

    wait_until(answered_with_close, 10, "a response saying Connection: close", interval=0.05)
    conn.close()
    assert set(answers) == {old_pid}
    assert "reload complete" not in server.log()  # the idle connection holds the drain
    idle.close()
    wait_until(lambda: "reload complete" in server.log(), 20, server.log)
    assert f"(pid {old_pid}) exited with code 0" in server.log()


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_idle_keepalive_connection_is_asked_to_close_not_cut(supervisor, protocol):
    """The race uvicorn loses: an idle keep-alive connection closed while a client sends.

    While its worker drains, a connection that was idle gets its next request answered,
    with `Connection: close`; then the client reconnects elsewhere. With either parser.
    """
    patient = ["--idle-drain-grace", "60", "--timeout-keep-alive", "60"]  # a slow HUP, too
    server = supervisor("testapp:app", "--http", protocol, *patient)
    server.wait_ready(1)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/pid")
    first = conn.getresponse()
    old_pid = int(first.read())
    assert first.getheader("connection") is None  # kept alive
    server.signal(signal.SIGHUP)
    wait_until(lambda: f"(pid {old_pid}) stopping: reload" in server.log(), 10, "the drain")

    answers = []

    def answered_with_close() -> bool:
        conn.request("GET", "/pid")  # raises if the server cut the connection
        response = conn.getresponse()
        answers.append((response.status, int(response.read())))
        return response.getheader("connection") == "close"

    wait_until(answered_with_close, 4, "a response saying Connection: close", interval=0.05)
    conn.close()
    assert answers[-1] == (200, old_pid)  # the draining worker answered it
    assert all(status == 200 for status, _ in answers)


def test_an_idle_keepalive_connection_is_closed_after_the_idle_drain_grace(supervisor):
    """A connection nobody uses does not hold a draining worker (and a reload's next
    replacement) for the keep-alive or graceful timeout, here an hour: once idle for
    --idle-drain-grace since its last response, the worker closes it and exits."""
    hour = ["--timeout-keep-alive", "3600", "--graceful-timeout", "3600"]
    server = supervisor("testapp:app", "--idle-drain-grace", "0.5", *hour)
    server.wait_ready(1)
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    idle.request("GET", "/pid")
    response = idle.getresponse()
    response.read()
    assert response.getheader("connection") is None  # kept alive
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log(), 20, server.log)
    assert idle.sock.recv(4096) == b""  # closed by the server between requests, no reset
    idle.close()
