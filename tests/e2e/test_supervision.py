"""Supervision under chaos: workers killed from outside, orphans, fds, stale pid files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import APPS, alive, free_port, get, try_get, wait_until

pytestmark = pytest.mark.timeout(60)

RESPAWN_NOW = "died: killed by SIGKILL (out of memory?); respawning now"


def serving_pid(port: int) -> int | None:
    answer = try_get(port, "/pid", timeout=1.0)
    return int(answer[1]) if answer and answer[0] == 200 else None


def test_worker_killed_after_serving_is_respawned_at_once_every_time(supervisor):
    """Three SIGKILLs in a row, each after a request: no backoff grows (a crash loop's
    would from the second: 0.5 s, then 1 s), each replacement serves again."""
    server = supervisor("testapp:app", "--workers", "1")
    server.wait_ready(1)
    for kill in range(1, 4):
        (victim,) = server.serving_pids(1)  # it served a request
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda victim=victim: serving_pid(server.port) not in (None, victim),
            20,
            lambda kill=kill: f"a replacement serving after kill {kill}\n{server.log()}",
        )
    log = server.log()
    assert log.count(RESPAWN_NOW) == 3, log
    assert server.process.poll() is None


def test_a_worker_that_served_is_no_crash_loop_even_with_others_serving(supervisor):
    """Slot 1 killed again and again after serving while slot 2 serves: still no backoff."""
    mport = free_port()
    server = supervisor("testapp:app", "--workers", "2", "--metrics", "--metrics-port", str(mport))
    server.wait_ready(2)

    def slot_one() -> dict | None:
        workers = json.loads(get(mport, "/status")[1])["workers"]
        return next((w for w in workers if w["slot"] == 1 and w["state"] == "ready"), None)

    victims = []
    for _ in range(3):  # a crash loop's backoff would show from the second
        victim = wait_until(
            lambda: (w := slot_one()) and w["pid"] not in victims and w["pid"],
            20,
            lambda: f"a new worker ready in slot 1\n{server.log()}",
        )
        wait_until(
            lambda victim=victim: serving_pid(server.port) == victim,
            20,
            f"worker {victim} answering a request",
        )
        wait_until(  # the master heard of it (heartbeats come once a second)
            lambda victim=victim: (w := slot_one()) and w["pid"] == victim and w["requests"],
            10,
            f"the master counting worker {victim}'s request",
        )
        os.kill(victim, signal.SIGKILL)
        victims.append(victim)
    wait_until(
        lambda: (w := slot_one()) and w["pid"] not in victims,
        20,
        lambda: f"slot 1 refilled\n{server.log()}",
    )
    log = server.log()
    assert log.count(RESPAWN_NOW) == 3, log
    assert " respawning in " not in log


def _booting_killer(server, markers: Path, killed: set[int]):
    """SIGKILL `count` workers of `server` caught in their (held) import, one by one."""

    def kill_booting(count: int) -> None:
        for _ in range(count):

            def booting() -> int | None:
                workers = server.worker_pids()
                for marker in markers.glob("booting-*"):
                    pid = int(marker.name.split("-", 1)[1])
                    if pid not in killed and pid in workers:
                        return pid
                return None

            pid = wait_until(booting, 20, lambda: f"a worker booting\n{server.log()}")
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)

    return kill_booting


def test_workers_killed_while_booting_are_no_boot_failure(supervisor, tmp_path: Path):
    markers = tmp_path / "boot"
    markers.mkdir()
    hold = markers / "hold"
    hold.touch()
    server = supervisor(
        "slowboot:app", "--workers", "1", "--boot-failure-limit", "1",
        env={"SLOWBOOT_DIR": str(markers)},
    )  # fmt: skip
    killed: set[int] = set()
    kill_booting = _booting_killer(server, markers, killed)
    kill_booting(2)  # before the app ever booted: more than --boot-failure-limit
    hold.unlink()
    (first,) = server.serving_pids(1)
    killed.add(first)
    # Now the app is known to boot: kill the serving worker, then its replacements as they boot.
    hold.touch()
    os.kill(first, signal.SIGKILL)
    kill_booting(2)
    hold.unlink()
    wait_until(
        lambda: serving_pid(server.port) not in (None, *killed),
        20,
        lambda: f"a worker serving again\n{server.log()}",
    )
    log = server.log()
    assert server.process.poll() is None, log
    assert "giving up" not in log and "failed to start" not in log
    assert log.count("while booting (not counted as a failure to start)") == 4


def test_replacement_killed_while_booting_does_not_abort_the_reload(supervisor, tmp_path: Path):
    markers = tmp_path / "boot"
    markers.mkdir()
    hold = markers / "hold"
    server = supervisor("slowboot:app", "--workers", "1", env={"SLOWBOOT_DIR": str(markers)})
    (old,) = server.serving_pids(1)
    hold.touch()
    server.signal(signal.SIGHUP)
    _booting_killer(server, markers, {old})(2)  # one failure to start would abort the reload
    assert serving_pid(server.port) == old  # the old worker serves meanwhile
    hold.unlink()
    wait_until(lambda: "reload complete" in server.log(), 30, lambda: server.log())
    log = server.log()
    assert "reload aborted" not in log and "failed to start" not in log
    assert log.count("starting another replacement for pid") == 2
    assert serving_pid(server.port) not in (None, old)


def test_app_children_do_not_inherit_the_listener(supervisor, tmp_path: Path):
    """An app's background process outlives a clean stop, yet the port is free."""
    child_pid_file = tmp_path / "child.pid"
    port = free_port()
    server = supervisor(
        "spawner:app", "--workers", "1", env={"SPAWNER_PIDFILE": str(child_pid_file)}, port=port
    )
    server.wait_ready(1)
    assert server.get("/spawn") == (200, "spawned")
    child = int(wait_until(lambda: child_pid_file.read_text().strip(), 10, "the child's pid"))
    try:
        # `$!` is known before the background shell has exec'd sleep: look once it has.
        wait_until(lambda: psutil.Process(child).name() == "sleep", 10, "the child's exec")
        fds = []
        for fd in os.listdir(f"/proc/{child}/fd"):
            with contextlib.suppress(FileNotFoundError):
                fds.append(os.readlink(f"/proc/{child}/fd/{fd}"))
        assert not [fd for fd in fds if fd.startswith("socket:")], fds
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        assert alive(child)  # what the app started is the app's business
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        again = supervisor("testapp:app", "--workers", "1", port=port)
        again.wait_ready(1)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(child)
            if proc.name() == "sleep":
                proc.kill()
                proc.wait(5)


@pytest.mark.parametrize("start", ["fork", "exec"])
def test_worker_orphaned_while_importing_dies_at_once(supervisor, tmp_path: Path, start):
    """The master is SIGKILLed while a worker (exec), or the fork server, is still importing
    uvicorn (held, as on a loaded machine): it goes with it instead of finishing first."""
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "hold").touch()
    env = {"PYTHONPATH": str(APPS / "slowimport"), "SLOW_IMPORT_GATE": str(gate)}
    server = supervisor("testapp:app", "--workers", "1", "--worker-start", start, env=env)
    marker = wait_until(lambda: list(gate.glob("importing-*")), 20, "a worker importing")
    worker = int(marker[0].name.split("-", 1)[1])
    assert worker in (server.worker_pids() if start == "exec" else server.fork_server_pids())
    server.process.kill()
    server.process.wait(5)
    wait_until(lambda: not alive(worker), 10, f"worker {worker} to die with its master")


@pytest.mark.parametrize("owner", ["this test", "a younger process"])
def test_pid_file_of_an_unrelated_live_process_is_taken_over(supervisor, tmp_path, owner):
    path = tmp_path / "app.pid"
    sleeper = None
    if owner == "this test":
        path.write_text(f"{os.getpid()}\n")
    else:
        sleeper = subprocess.Popen(["sleep", "30"])
        path.write_text(f"{sleeper.pid}\n")
        written = time.time() - 3600  # the file predates the process: its pid was reused
        os.utime(path, (written, written))
    try:
        server = supervisor("testapp:app", "--pid-file", str(path))
        server.wait_ready(1)
        assert path.read_text() == f"{server.pid}\n"
        assert "stale" in server.log() and "taking it over" in server.log()
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        assert not path.exists()
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait(5)


def test_a_worker_whose_channel_the_master_closes_drains_and_exits():
    """The master drops a worker it asked for and never claimed by closing its channel
    (`ForkServer.drop_requests`): a live master's closed channel means not wanted, so the
    worker drains and exits 0 (a dead master's PDEATHSIG ends it anyway). Here this test
    is the master of one exec'd worker."""
    from asgi_supervise.config.settings import Settings
    from asgi_supervise.protocol import encode

    listener = socket.create_server(("127.0.0.1", free_port()))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [listener.fileno(), theirs.fileno()]
    worker = subprocess.Popen(
        [sys.executable, "-m", "asgi_supervise.worker",
         "--control-fd", str(theirs.fileno()), "--socket-fds", str(listener.fileno())],
        cwd=APPS, pass_fds=fds,
    )  # fmt: skip
    try:
        theirs.close()
        port = listener.getsockname()[1]
        listener.close()  # the worker holds its own copy
        settings = Settings(app="testapp:app", log_level="warning")
        ours.sendall(
            encode({"master_pid": os.getpid(), "settings": settings.model_dump(mode="json")})
        )
        wait_until(lambda: try_get(port, "/pid", timeout=1.0), 15, "the worker serving")
        assert worker.poll() is None
        ours.close()
        wait_until(lambda: worker.poll() is not None, 15, "the worker to exit")
        assert worker.returncode == 0
    finally:
        ours.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_master_started_without_stdin_and_stdout_serves_and_stops_cleanly(tmp_path: Path):
    """Started as some daemons are, with descriptors 0 and 1 closed: the first sockets
    must not take their numbers (a worker's loop aborts closing a descriptor below 3)."""
    port = free_port()
    log_path = tmp_path / "closed-stdio.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
    command = f'exec "$0" -m asgi_supervise testapp:app --workers 1 --port {port} <&- >&-'
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["sh", "-c", command, sys.executable], cwd=APPS, env=env, stderr=log
        )
    try:
        wait_until(lambda: try_get(port, "/pid"), 20, lambda: log_path.read_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, log_path.read_text()
        text = log_path.read_text()
        assert "exited with code 0" in text and "Assertion" not in text, text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
