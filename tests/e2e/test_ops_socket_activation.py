"""systemd socket activation: the master serves on the sockets LISTEN_FDS passes.

The test plays systemd: it holds the listening socket, and a small launcher puts it at
fd 3 and sets LISTEN_FDS=1 and LISTEN_PID to its own pid before it execs the master (the
pid stays the same across exec, as with systemd's own fork-then-exec).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import psutil
import pytest

from conftest import APPS, Supervisor, free_port, is_fork_server, wait_until

pytestmark = pytest.mark.timeout(90)

LAUNCH = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="http")
os.execv(sys.executable, [sys.executable, "-m", "asgi_supervise", *sys.argv[2:]])
"""


class Activated(Supervisor):
    """A master started with the test's socket at fd 3, as systemd starts it; the rest
    (log, wait_ready, stop) is `conftest.Supervisor`'s."""

    def __init__(self, tmp_path: Path, sock: socket.socket, name: str, *args: str):
        self.port = sock.getsockname()[1]
        self.args = list(args)
        self.log_path = tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-c", LAUNCH, str(sock.fileno()), *args]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=APPS, env=env,
                pass_fds=(sock.fileno(),),
            )  # fmt: skip
        self.ps = psutil.Process(self.process.pid)


@pytest.fixture
def held_socket():
    """The listening socket, held by the test for the whole test: systemd's part."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    yield sock
    sock.close()


@pytest.fixture
def activate(tmp_path: Path, held_socket: socket.socket):
    started: list[Activated] = []

    def start(*args: str) -> Activated:
        master = Activated(tmp_path, held_socket, f"master-{len(started)}", *args)
        started.append(master)
        return master

    yield start
    for master in started:
        master.stop()


def ask(port: int, path: str = "/pid", timeout: float = 30.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_master_serves_on_the_socket_systemd_passes(activate, held_socket):
    port = held_socket.getsockname()[1]
    # --fd 99 would fail (no such descriptor): the passed socket wins over the flags.
    master = activate("testapp:app", "--workers", "2", "--fd", "99")
    master.wait_ready(2)
    assert f"serving http://127.0.0.1:{port} with 2 workers" in master.log()
    assert ask(port, "/")[0] == 200
    children = psutil.Process(master.process.pid).children()
    assert len([p for p in children if not is_fork_server(p)]) == 2
    # The variables are the master's alone: the app sees none, nor does what it starts.
    # (/proc/PID/environ of a forked one still shows the block the master was exec'd
    # with: the kernel keeps it, whatever the process unsets.)
    activation = {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
    for _ in range(8):
        assert not activation & set(ask(port, "/env")[1].split())
    master.process.send_signal(signal.SIGTERM)
    assert master.process.wait(20) == 0, master.log()


def test_sockets_of_another_process_are_ignored(tmp_path, held_socket):
    """LISTEN_PID names another process (here the test's): inherited, not meant for us.
    The master binds --port as usual, and its workers do not see the variables either."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
    env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "inherited.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "asgi_supervise", "testapp:app", "--port", str(port)],
            cwd=APPS, env=env, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(held_socket.fileno(),),
        )  # fmt: skip
    try:
        wait_until(
            lambda: " ready in " in log_path.read_text(),
            20,
            lambda: f"ready\n{log_path.read_text()}",
        )
        assert f"serving http://127.0.0.1:{port} " in log_path.read_text()
        assert ask(port, "/")[0] == 200
        for _ in range(8):  # neither worker sees them, nor what it starts
            assert "LISTEN_FDS" not in ask(port, "/env")[1].split()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def test_restart_with_the_socket_held_refuses_no_connection(activate, held_socket):
    """Between the old master's exit and the new one's first accept, connections wait in
    the held socket's backlog: every client that connects during the restart is answered."""
    port = held_socket.getsockname()[1]
    first = activate("testapp:app", "--workers", "2")
    first.wait_ready(2)

    phase = ["old"]  # which master was (or was not) running when a client connected
    results: Counter[tuple[str, str]] = Counter()
    started: Counter[str] = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(5000):  # bounded, whatever happens
            if stop.is_set():
                return
            when = phase[0]
            try:
                status, _ = ask(port)
                outcome = str(status)
            except OSError as exc:
                outcome = type(exc).__name__
            with lock:
                results[when, outcome] += 1

    def gap_client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.connect()  # completes in the kernel: the socket still listens
            with lock:
                started["none"] += 1
            conn.request("GET", "/pid", headers={"Connection": "close"})
            outcome = str(conn.getresponse().status)
        except OSError as exc:
            outcome = type(exc).__name__
        finally:
            conn.close()
        with lock:
            results["none", outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(results.values()) >= 20, 20, "traffic on the old master")
        phase[0] = "draining"
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(30) == 0, first.log()
        phase[0] = "none"  # nothing accepts now: only the held socket's backlog
        # Clients that connect while no master runs wait in the backlog; they must not fail.
        gap = [threading.Thread(target=gap_client) for _ in range(3)]
        for thread in gap:
            thread.start()
        threads += gap
        wait_until(lambda: started["none"] >= 3, 10, lambda: f"connected in the gap {results}")
        second = activate("testapp:app", "--workers", "2")
        second.wait_ready(1)
        phase[0] = "new"
        wait_until(lambda: results["new", "200"] >= 20, 30, lambda: f"traffic {results}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    failures = {key: n for key, n in results.items() if key[1] != "200"}
    assert not failures, f"{failures} of {dict(results)}"
    assert results["none", "200"] > 0, dict(results)  # connected with no master at all
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(20) == 0, second.log()


def test_a_passed_descriptor_that_is_not_a_listening_socket_is_a_usage_error(tmp_path):
    read, write = os.pipe()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
        result = subprocess.run(
            [sys.executable, "-c", LAUNCH, str(read), "testapp:app"],
            cwd=APPS, env=env, pass_fds=(read,), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        os.close(read)
        os.close(write)
    assert result.returncode == 2, result.stderr
    assert "socket activation passed fd 3 (LISTEN_FDS=1), but" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
