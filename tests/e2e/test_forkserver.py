"""Workers forked from a fork server: preload, reload, crashes of every process involved."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from loadgen import Load

from conftest import APPS, alive, run_cli, try_get, wait_until

pytestmark = pytest.mark.timeout(90)

# A module-level marker set at import: which process imported the app, and a line per import.
APP = """
import os
IMPORTED_BY = os.getpid()
with open(os.environ["IMPORT_COUNTER"], "a") as counter:
    counter.write(f"{{IMPORTED_BY}}\\n")
VERSION = {version!r}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    answers = {{"/pid": os.getpid(), "/version": VERSION, "/imported-by": IMPORTED_BY}}
    body = str(answers.get(scope["path"], "hello")).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({{"type": "http.response.start", "status": 200, "headers": headers}})
    await send({{"type": "http.response.body", "body": body}})
"""
BROKEN = "\nraise RuntimeError('half-deployed release')\n"


def _write_app(tmp_path: Path, version: str, broken: bool = False) -> None:
    (tmp_path / "preapp.py").write_text(APP.format(version=version) + (BROKEN if broken else ""))


def _start(supervisor, tmp_path: Path, *args: str):
    env = {"IMPORT_COUNTER": str(tmp_path / "imports"), "PYTHONDONTWRITEBYTECODE": "1"}
    pid_file = tmp_path / "app.pid"
    server = supervisor(
        "preapp:app", "--preload", "--app-dir", str(tmp_path), "--pid-file", str(pid_file),
        *args, env=env,
    )  # fmt: skip
    return server, pid_file


def _imports(tmp_path: Path) -> list[int]:
    path = tmp_path / "imports"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _get(server, path: str) -> str | None:
    answer = try_get(server.port, path, timeout=1.0)
    return answer[1] if answer and answer[0] == 200 else None


def _gone(pids: set[int]) -> bool:
    return not any(map(alive, pids))


def test_preloaded_workers_are_forked_and_a_hup_serves_new_code_from_a_new_fork_server(
    supervisor, tmp_path
):
    _write_app(tmp_path, "v1")
    server, pid_file = _start(supervisor, tmp_path, "--workers", "3")
    server.wait_ready(3)
    before = server.serving_pids(3)
    assert before == server.worker_pids()
    (fork_server,) = server.fork_server_pids()
    # Imported once, by the fork server, for three workers: they are its forks, not fresh
    # interpreters, and each is the master's child (re-parented), not the fork server's.
    assert _imports(tmp_path) == [fork_server]
    assert _get(server, "/imported-by") == str(fork_server)
    assert {psutil.Process(pid).ppid() for pid in before} == {server.pid}
    status = json.loads(run_cli("status", "--json", "--pid-file", str(pid_file)).stdout)
    (shown,) = status["fork_servers"]
    assert (shown["pid"], shown["generation"], shown["preload"]) == (fork_server, 0, True)
    assert shown["forks"] == 3 and status["master"]["worker_start"] == "fork"
    # Its standby, forked before the app's import: the next generation's fork server.
    (standby,) = server.standby_pids()
    assert shown["standby_pid"] == standby and psutil.Process(standby).ppid() == server.pid
    assert f"standby {standby}" in run_cli("status", "--pid-file", str(pid_file)).stdout

    with Load(server.port, rate=150) as load:
        load.wait_for_requests(150)
        _write_app(tmp_path, "v2")
        server.signal(signal.SIGHUP)
        wait_until(lambda: "reload complete" in server.log(), 20, "the reload to complete")
        after = server.worker_pids()
        load.wait_for_requests(load.stats.total + 150)
        stats = load.stop()
    assert stats.failed == 0, (stats.failures, stats.examples)
    assert len(after) == 3 and not after & before
    assert {_get(server, "/version") for _ in range(6)} == {"v2"}
    (new_server,) = server.fork_server_pids()
    assert new_server == standby and _gone({fork_server})  # no interpreter started
    assert _imports(tmp_path) == [fork_server, new_server]  # once per code generation
    text = run_cli("status", "--pid-file", str(pid_file)).stdout
    assert f"fork server {new_server}  generation 1  ready" in text
    log = server.log()
    assert f"(pid {standby}, generation 1) booting from the standby" in log
    assert "retiring the fork server of generation 0" in log
    assert log.count("replaced (reload)") == 3
    (next_standby,) = wait_until(server.standby_pids, 10, "the new fork server's standby")

    everyone = server.worker_pids() | {new_server, next_standby}
    server.process.kill()
    server.process.wait(5)
    wait_until(lambda: _gone(everyone), 2.0, f"{everyone} to die with the master")


def test_a_killed_preload_fork_server_restarts_from_its_standby(supervisor, tmp_path):
    """Its workers keep serving; its standby (no app, the master's child) takes the spec,
    imports the app and forks the next replacement; a standby of its own follows."""
    _write_app(tmp_path, "v1")
    server, _ = _start(supervisor, tmp_path, "--workers", "2")
    server.wait_ready(2)
    workers = server.worker_pids()
    (fork_server,) = server.fork_server_pids()
    (standby,) = server.standby_pids()
    os.kill(fork_server, signal.SIGKILL)
    wait_until(lambda: server.fork_server_pids() == {standby}, 15, server.log)
    wait_until(lambda: "up, forking" in server.log().split("keep serving")[-1], 15, server.log)
    assert f"(pid {standby}, generation 0) booting from the standby" in server.log()
    assert server.worker_pids() == workers and _imports(tmp_path) == [fork_server, standby]
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    new = wait_until(lambda: server.worker_pids() - workers, 15, "a replacement")
    assert server.serving_pids(2) == (workers - {victim}) | new
    # The replacement holds the app its new fork server imported (old workers: the first).
    wait_until(lambda: _get(server, "/imported-by") == str(standby), 10, "the replacement")
    wait_until(lambda: server.standby_pids() - {standby}, 10, "a standby of its own")


def test_a_hup_without_a_standby_execs_a_fork_server(supervisor, tmp_path):
    """A standby that died (killed here) is not promoted: the reload starts a fork server
    by exec, as the first one was, and the new code serves."""
    _write_app(tmp_path, "v1")
    server, _ = _start(supervisor, tmp_path, "--workers", "1")
    server.wait_ready(1)
    (fork_server,) = server.fork_server_pids()
    (standby,) = server.standby_pids()
    os.kill(standby, signal.SIGKILL)
    wait_until(lambda: not alive(standby), 5, "the standby reaped")
    _write_app(tmp_path, "v2")
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload complete" in server.log(), 20, server.log)
    (new_server,) = server.fork_server_pids()
    assert new_server not in (fork_server, standby) and _get(server, "/version") == "v2"
    assert "booting from the standby" not in server.log()
    assert _imports(tmp_path) == [fork_server, new_server]


def test_killed_worker_fork_server_and_master(supervisor):
    """A worker: replaced. The fork server: workers keep serving, a new one starts and
    forks the next replacement. The master: workers and fork server die with it."""
    server = supervisor("testapp:app", "--workers", "2")
    server.wait_ready(2)
    before = server.worker_pids()
    (fork_server,) = server.fork_server_pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    new = wait_until(lambda: server.worker_pids() - before, 15, "a replacement")
    assert server.serving_pids(2) == (before - {victim}) | new
    assert f"(pid {victim}) died: killed by SIGKILL" in server.log()

    workers = server.worker_pids()
    os.kill(fork_server, signal.SIGKILL)
    replacement = wait_until(
        lambda: server.fork_server_pids() - {fork_server}, 15, "a new fork server"
    )
    assert server.worker_pids() == workers
    assert server.serving_pids(2) == workers  # nobody was restarted
    assert "its workers keep serving" in server.log()
    wait_until(lambda: "up, forking" in server.log().split("keep serving")[-1], 15, "it up")

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    new = wait_until(lambda: server.worker_pids() - workers, 15, "a replacement")
    assert server.serving_pids(2) == (workers - {victim}) | new
    assert (server.fork_server_pids(), server.process.poll()) == (replacement, None)

    everyone = server.worker_pids() | server.fork_server_pids()
    server.process.kill()
    server.process.wait(5)
    wait_until(lambda: _gone(everyone), 2.0, f"{everyone} to die with the master")


def test_the_first_fork_server_does_not_keep_the_masters_signal_handlers(supervisor):
    """It is forked from the master while the master holds (records) its signals: it must
    take a SIGTERM as an exec'd fork server does, ending, and the master starts another."""
    server = supervisor("testapp:app", "--workers", "2")
    server.wait_ready(2)
    workers = server.worker_pids()
    (first,) = server.fork_server_pids()
    os.kill(first, signal.SIGTERM)
    wait_until(lambda: server.fork_server_pids() - {first}, 15, "another fork server")
    assert not alive(first)
    assert f"(pid {first}, generation 0) died: killed by SIGTERM" in server.log()
    assert server.serving_pids(2) == workers and server.process.poll() is None


def test_preload_import_failure_exits_3_once(supervisor, tmp_path):
    _write_app(tmp_path, "v1", broken=True)
    server, _ = _start(supervisor, tmp_path, "--workers", "2")
    assert server.wait_exit(30) == 3
    log = server.log()
    assert log.count("failed to import the app") == 1
    assert log.count("RuntimeError: half-deployed release") == 2  # the error, the verdict
    assert "giving up: the app failed to import in the fork server" in log
    assert "worker 1" not in log


def test_preload_under_reload_waits_for_a_save_and_keeps_old_workers_serving(supervisor, tmp_path):
    _write_app(tmp_path, "v1", broken=True)
    server, _ = _start(
        supervisor, tmp_path, "--reload", "--reload-dir", str(tmp_path), "--reload-delay", "0.1"
    )
    wait_until(lambda: "waiting for a file change" in server.log(), 15, "it to wait")
    _write_app(tmp_path, "v1")
    wait_until(lambda: _get(server, "/version") == "v1", 15, "the fixed app to serve")
    serving = server.worker_pids()
    _write_app(tmp_path, "v2", broken=True)
    wait_until(lambda: "reload aborted" in server.log(), 15, "the broken save to be refused")
    assert _get(server, "/version") == "v1" and server.worker_pids() == serving
    _write_app(tmp_path, "v3")
    wait_until(lambda: _get(server, "/version") == "v3", 15, "the next save to serve")
    assert server.process.poll() is None


def test_first_workers_serve_before_the_master_loop_and_signals_wait_for_it(
    supervisor, tmp_path: Path
):
    """The first workers are asked for before the master imports the rest of itself, so
    they answer before its signal handlers are in place (here its arbiter's import is held
    until the workers serve): a HUP then is a reload once the master knows its workers,
    every one replaced, not the default action that would end it; a TERM then drains."""
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "hold").touch()
    env = {"PYTHONPATH": str(APPS / "slowimport"), "SLOW_MASTER_GATE": str(gate)}
    server = supervisor("testapp:app", "--workers", "2", env=env)
    answer = wait_until(lambda: try_get(server.port, "/pid", timeout=1.0), 15, "a first answer")
    # Once its first workers serve, the master imports its arbiter: held there.
    wait_until(lambda: list(gate.glob("importing-*")), 15, "the master's arbiter import")
    assert "master" not in server.log()  # nothing said yet: its loop has not started
    server.signal(signal.SIGHUP)
    (gate / "hold").unlink()
    wait_until(lambda: "reload complete" in server.log(), 15, lambda: server.log())
    assert int(answer[1]) not in server.worker_pids()
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0, server.log()


def test_a_second_sigterm_stops_a_start_that_hangs(supervisor, tmp_path: Path):
    """Signals wait for the master's loop, but a second SIGTERM does not: a start that
    hangs (here the arbiter's import, held) ends at once, and its workers with it."""
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "hold").touch()
    env = {"PYTHONPATH": str(APPS / "slowimport"), "SLOW_MASTER_GATE": str(gate)}
    server = supervisor("testapp:app", "--workers", "2", env=env)
    try:
        wait_until(lambda: try_get(server.port, "/pid", timeout=1.0), 15, "a first answer")
        everyone = server.worker_pids() | server.fork_server_pids()

        def stopped() -> bool:  # again until it ends: two sent at once arrive as one
            server.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(0.2)
            return server.process.poll() is not None

        wait_until(stopped, 10, "the master to stop")
        assert server.process.returncode == -signal.SIGTERM  # the gate still holds its start
        wait_until(lambda: _gone(everyone), 5, f"{everyone} to die with the master")
    finally:
        (gate / "hold").unlink()


def test_more_first_workers_than_the_channel_queues(supervisor):
    """A local socket queues only a few messages (net.unix.max_dgram_qlen, 10 by default):
    the first workers asked for beyond that are forked once the master's loop runs. The
    fork server forks a queued batch without waiting for each middle process, and reaps
    them all once none is queued: no zombie is left."""
    server = supervisor("testapp:app", "--workers", "12")
    server.wait_ready(12)
    assert len(server.worker_pids()) == 12
    (fork_server,) = server.fork_server_pids()

    def middles() -> list[psutil.Process]:
        return psutil.Process(fork_server).children()

    wait_until(lambda: not middles(), 10, lambda: f"middle processes left: {middles()}")


def test_descriptors_the_master_was_started_with_stay_the_masters(supervisor):
    """A descriptor the master inherits (here a pipe's write end, as a script that waits for
    EOF leaves it; systemd's sockets are others) is not held by the fork server forked
    from it, nor by the workers: the reader sees EOF once the master is gone, whatever they
    are still doing."""
    read_end, write_end = os.pipe()
    try:
        server = supervisor("testapp:app", "--workers", "2", pass_fds=(write_end,))
        os.close(write_end)
        server.wait_ready(2)
        pipe = os.fstat(read_end).st_ino
        others = server.fork_server_pids() | server.worker_pids()
        assert len(others) == 3
        for pid in others:
            held = []
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            assert f"pipe:[{pipe}]" not in held, (pid, held)
        assert f"pipe:[{pipe}]" in os.readlink(f"/proc/{server.pid}/fd/{write_end}")
    finally:
        os.close(read_end)
