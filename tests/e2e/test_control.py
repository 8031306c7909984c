"""`asgi-supervise status | reload | scale | stop` against a real master over its control socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from loadgen import Load

from conftest import APPS, run_cli, try_get, wait_until

pytestmark = pytest.mark.timeout(90)
AS_NOBODY = """
import os, sys
from asgi_supervise import cli, ctl
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(cli.main(sys.argv[1:]))
"""
NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}  # the reload must compile the file it sees


def _start(supervisor, tmp_path: Path, *args: str, **options):
    pid_file = tmp_path / "app.pid"
    server = supervisor(*args, "--pid-file", str(pid_file), **options)
    return server, pid_file, tmp_path / "app.sock"


def _ctl(pid_file: Path, *args: str, timeout: float = 60):
    return run_cli(*args, "--pid-file", str(pid_file), timeout=timeout)


def _status(pid_file: Path) -> dict:
    done = _ctl(pid_file, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _worker_pids(pid_file: Path) -> set[int]:
    return {w["pid"] for w in _status(pid_file)["workers"] if not w["stopping"]}


def test_status_shows_every_worker_in_text_and_json(supervisor, tmp_path):
    server, pid_file, sock = _start(supervisor, tmp_path, "testapp:app", "--workers", "3")
    server.wait_ready(3)
    serving = server.serving_pids(3)

    data = _status(pid_file)
    assert data["master"]["pid"] == server.pid
    assert data["master"]["control_socket"] == str(sock)
    assert {w["pid"] for w in data["workers"]} == serving
    assert sorted(w["slot"] for w in data["workers"]) == [1, 2, 3]
    assert all(w["state"] == "ready" and w["restarts"] == 0 for w in data["workers"])

    text = _ctl(pid_file, "status")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("SLOT"))
    assert "RESTARTS" in lines[header] and "RSS" in lines[header]
    rows = lines[header + 1 : header + 4]
    assert {int(row.split()[1]) for row in rows} == serving
    assert all(row.split()[2] == "ready" for row in rows)
    assert any(line.startswith("plan: 3 workers") for line in lines)
    assert "last reload: none" in lines

    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert sock.stat().st_uid == os.getuid()
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not sock.exists()
    gone = _ctl(pid_file, "status")
    assert gone.returncode == 4 and "no such control socket" in gone.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_another_user_is_refused(supervisor, tmp_path):
    shared = Path(tempfile.mkdtemp(prefix="asgi-ctl-"))  # traversable by anyone: the
    try:  # socket's own mode must refuse
        shared.chmod(0o755)
        sock = shared / "ctl.sock"
        server = supervisor("testapp:app", "--control-socket", str(sock))
        server.wait_ready(1)
        assert run_cli("status", "--socket", str(sock)).returncode == 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
        # The interpreter lives under /root: the child drops to nobody once it has started,
        # then runs the same CLI code.
        other = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, "status", "--socket", str(sock)],
            cwd=APPS,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert other.returncode == 1, other.stderr
        assert "permission denied" in other.stderr and "root" in other.stderr
        assert "SLOT" not in other.stdout
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        assert not sock.exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_reload_under_load_waits_and_replaces_every_worker(supervisor, tmp_path):
    server, pid_file, _ = _start(supervisor, tmp_path, "testapp:app", "--workers", "2")
    server.wait_ready(2)
    before = _worker_pids(pid_file)
    with Load(server.port, rate=150) as load:
        load.wait_for_requests(150)
        done = _ctl(pid_file, "reload")
        served = load.stats.total
        load.wait_for_requests(served + 150)
        stats = load.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reload completed: every worker replaced in" in done.stdout
    assert stats.failed == 0, (stats.failures, stats.examples)
    after = _worker_pids(pid_file)
    assert len(after) == 2 and not after & before
    data = _status(pid_file)
    assert data["master"]["last_reload"]["outcome"] == "completed"
    assert {w["generation"] for w in data["workers"]} == {1}


def test_reload_with_broken_code_fails_and_old_workers_serve(supervisor, tmp_path):
    source = tmp_path / "liveapp.py"
    shutil.copy(APPS / "testapp.py", source)
    server, pid_file, _ = _start(
        supervisor, tmp_path, "liveapp:app", "--workers", "2", "--app-dir", str(tmp_path),
        env=NO_BYTECODE,
    )  # fmt: skip
    server.wait_ready(2)
    before = _worker_pids(pid_file)
    source.write_text(source.read_text() + "\nraise RuntimeError('half-deployed release')\n")
    with Load(server.port, rate=150) as load:
        load.wait_for_requests(50)
        done = _ctl(pid_file, "reload")
        stats = load.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "reload aborted" in done.stdout
    assert "RuntimeError: half-deployed release" in done.stdout
    assert stats.failed == 0, (stats.failures, stats.examples)
    assert _worker_pids(pid_file) == before
    assert server.serving_pids(2) == before
    last = _status(pid_file)["master"]["last_reload"]
    assert last["outcome"] == "aborted" and "half-deployed release" in last["error"]


def test_scale_up_and_down_warns_above_the_plan(supervisor, tmp_path):
    server, pid_file, _ = _start(
        supervisor, tmp_path, "testapp:app", "--workers", "3",
        "--db-max-connections", "30", "--db-pool-size", "10",
    )  # fmt: skip
    server.wait_ready(3)

    up = _ctl(pid_file, "scale", "4")
    assert up.returncode == 0, up.stderr
    assert "scaled to 4 workers" in up.stdout
    assert "the db budget allows 3: 4 workers x 10 connections" in up.stderr
    wait_until(lambda: len(_worker_pids(pid_file)) == 4, 20, lambda: f"4 workers\n{server.log()}")
    server.serving_pids(4)

    down = _ctl(pid_file, "scale", "-1")
    assert down.returncode == 0, down.stderr
    assert "scaled to 3 workers" in down.stdout and "warning" not in down.stderr
    wait_until(lambda: len(server.worker_pids()) == 3, 20, lambda: f"3 workers\n{server.log()}")
    assert sorted(w["slot"] for w in _status(pid_file)["workers"]) == [1, 2, 3]

    server.signal(signal.SIGTTIN)  # the signal warns the same way
    wait_until(
        lambda: "above the sizing plan (3): the db budget allows 3" in server.log(),
        10,
        lambda: f"the SIGTTIN warning\n{server.log()}",
    )
    wait_until(lambda: len(server.worker_pids()) == 4, 20, lambda: f"4 workers\n{server.log()}")

    for refused in ("0", "-4"):
        done = _ctl(pid_file, "scale", refused)
        assert done.returncode == 1 and "refused: at least 1" in done.stderr, done.stderr
    assert _status(pid_file)["master"]["workers_target"] == 4


def test_stop_drains_and_returns_once_the_master_exited(supervisor, tmp_path):
    server, pid_file, sock = _start(supervisor, tmp_path, "testapp:app", "--workers", "2")
    server.wait_ready(2)
    done = _ctl(pid_file, "stop")
    assert done.returncode == 0, done.stderr
    assert f"master {server.pid} stopped" in done.stdout
    assert server.process.poll() is not None or server.wait_exit(5) == 0
    assert server.wait_exit() == 0
    assert "master stopped cleanly" in server.log()
    assert not sock.exists() and not pid_file.exists()


def test_stop_now_cuts_a_request_in_flight(supervisor, tmp_path):
    inflight = tmp_path / "inflight"
    inflight.mkdir()
    server, pid_file, sock = _start(
        supervisor, tmp_path, "testapp:app", env={"TESTAPP_INFLIGHT_DIR": str(inflight)}
    )
    server.wait_ready(1)
    answers: list = []
    client = threading.Thread(
        target=lambda: answers.append(try_get(server.port, "/sleep?s=10", timeout=30))
    )
    client.start()
    wait_until(lambda: any(inflight.iterdir()), 10, "the slow request in flight")
    done = _ctl(pid_file, "stop", "--now")
    client.join(30)
    assert done.returncode == 0, done.stderr
    assert server.wait_exit() == 1  # stopped now: unclean by design
    # Cut, not waited for: a reset, or uvicorn's 500 for a cancelled request.
    assert len(answers) == 1 and answers[0] != (200, "slept"), answers
    assert "stopping now" in server.log()
    assert not sock.exists()


def test_status_watch_redraws_until_interrupted(supervisor, tmp_path):
    server, pid_file, _ = _start(supervisor, tmp_path, "testapp:app")
    server.wait_ready(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
    watch = subprocess.Popen(
        [sys.executable, "-m", "asgi_supervise", "status", "--watch", "0.1",
         "--pid-file", str(pid_file)],
        stdout=subprocess.PIPE, text=True, cwd=APPS, env=env,
    )  # fmt: skip
    try:
        tables = 0
        while tables < 3:  # pytest-timeout bounds this if no table comes
            line = watch.stdout.readline()
            assert line, "status --watch ended"
            tables += line.startswith("SLOT")
    finally:
        watch.send_signal(signal.SIGINT)
        # Read to the end while it exits: its last tables must not fill the pipe and
        # block its final flush.
        watch.communicate(timeout=30)
    assert watch.returncode == 0


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A short XDG_RUNTIME_DIR: a socket path must fit AF_UNIX's 108 bytes, which a
    pytest-xdist tmp_path with the socket's name below it does not always."""
    path = Path(tempfile.mkdtemp(prefix="xdg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_one_master_is_found_without_a_path_and_stale_sockets_go(supervisor, runtime_dir):
    runtime = runtime_dir
    (runtime / "asgi-supervise").mkdir(parents=True, mode=0o700)
    stale = runtime / "asgi-supervise" / "master-999999999.sock"  # above any pid_max
    with socket.socket(socket.AF_UNIX) as killed:
        killed.bind(str(stale))
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    server = supervisor("testapp:app", env=env)
    server.wait_ready(1)
    assert not stale.exists()
    done = run_cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    expected = runtime / "asgi-supervise" / f"master-{server.pid}.sock"
    assert json.loads(done.stdout)["master"]["control_socket"] == str(expected)
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not expected.exists()
    none = run_cli("status", env=env)
    assert none.returncode == 4 and "no running master found" in none.stderr
