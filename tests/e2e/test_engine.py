"""The master, its workers, crashes, timeouts and the SIGTERM drain."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import APPS, alive, free_port, get, run_cli, try_get, wait_until

pytestmark = pytest.mark.timeout(60)
# The core tests run in both ways of starting workers: forked (the default) and exec'd.
START_MODES = pytest.mark.parametrize(
    "start", [(), ("--worker-start", "exec")], ids=["fork", "exec"]
)


@START_MODES
def test_workers_serve_from_distinct_processes(supervisor, start):
    server = supervisor("testapp:app", "--workers", "3", *start)
    pids = server.serving_pids(3)
    assert pids == server.worker_pids()
    assert server.pid not in pids


@START_MODES
def test_killed_worker_is_replaced(supervisor, start):
    """How fast is bench's `crash` scenario; here: a new process takes the slot and serves."""
    server = supervisor("testapp:app", "--workers", "2", *start)
    server.wait_ready(2)
    before = server.worker_pids()
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    server.serving_pids(1)  # the survivor keeps serving meanwhile
    new = wait_until(lambda: server.worker_pids() - before, 15, "a replacement process")
    (replacement,) = new

    def replacement_serves() -> bool:
        answer = try_get(server.port, "/pid", timeout=1.0)
        return bool(answer) and int(answer[1]) == replacement

    wait_until(replacement_serves, 15, "replacement serving")
    assert server.process.poll() is None
    assert server.worker_pids() == (before - {victim}) | {replacement}
    log = server.log()
    assert f"(pid {victim}) died: killed by SIGKILL" in log
    assert log.index("died: killed by SIGKILL") < log.index(f"(pid {replacement}) booting")


def _start_slow_requests(port: int, count: int, seconds: float) -> tuple[list, list]:
    results: list = []
    threads = []

    def one() -> None:
        try:
            results.append(get(port, f"/sleep?s={seconds}", timeout=seconds + 10)[0])
        except OSError as exc:
            results.append(exc)

    for _ in range(count):
        thread = threading.Thread(target=one)
        thread.start()
        threads.append(thread)
    return results, threads


_probe_ids = iter(range(1_000_000))


def _probe(port: int) -> tuple[str, str]:
    """What a new client sees ('ok', 'refused', 'reset', ...), and the X-Load-Id it sent.

    A reset is fine only for a connection the kernel had queued on the listener when its
    last copy closed: the app never saw that request, so a client may retry it as safely
    as a refused one. `_unseen_resets` tells the two apart with testapp's started file.
    """
    load_id = f"probe-{next(_probe_ids)}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/pid", headers={"X-Load-Id": load_id})
        status = conn.getresponse().status
        return ("ok" if status == 200 else f"http {status}"), load_id
    except ConnectionRefusedError:
        return "refused", load_id
    except (ConnectionResetError, BrokenPipeError):
        return "reset", load_id
    except http.client.RemoteDisconnected:
        return "eof", load_id
    except TimeoutError:
        return "timeout", load_id
    finally:
        conn.close()


def _probe_until_exit(server) -> list[tuple[str, str]]:
    """What new clients see, sampled every 20 ms until the master has exited."""
    probes = []
    while server.process.poll() is None:
        probes.append(_probe(server.port))
        time.sleep(0.02)  # a sampling interval; the loop's end is the exit
    return probes


def _outcomes(probes: list[tuple[str, str]], started: Path) -> set[str]:
    """The probes' outcomes, a reset the app never saw counted as the refusal it is."""
    seen = set(started.read_text().split()) if started.exists() else set()
    return {
        "refused" if outcome == "reset" and load_id not in seen else outcome
        for outcome, load_id in probes
    }


@pytest.fixture
def inflight(tmp_path: Path) -> Path:
    """Where testapp's /sleep marks each request it has started: in flight for sure."""
    path = tmp_path / "inflight"
    path.mkdir()
    return path


@pytest.mark.parametrize("engine", ["asgi-supervise", "gunicorn"])
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    supervisor, inflight: Path, tmp_path: Path, engine: str
):
    started = tmp_path / "started"
    server = supervisor(
        "testapp:app", "--workers", "2", "--engine", engine,
        env={"TESTAPP_INFLIGHT_DIR": str(inflight), "TESTAPP_STARTED_FILE": str(started)},
    )  # fmt: skip
    server.wait_ready(2)
    workers = server.worker_pids()
    results, threads = _start_slow_requests(server.port, 10, 2.0)
    wait_until(lambda: len(list(inflight.iterdir())) == 10, 15, "10 requests in flight")

    server.signal(signal.SIGTERM)
    probes = _probe_until_exit(server)
    for thread in threads:
        thread.join(10)

    assert results == [200] * 10
    assert server.wait_exit() == 0
    assert _outcomes(probes, started) <= {"ok", "refused"}, probes
    assert "refused" in _outcomes(probes, started)  # turned away while requests finished
    assert not any(map(alive, workers))
    assert _probe(server.port)[0] == "refused"


def test_drain_delay_keeps_serving_new_requests(supervisor, tmp_path: Path):
    """Without the delay new connections are refused at once (the test above); with it,
    they are served after SIGTERM, and the listener closes only once the delay is over."""
    started = tmp_path / "started"
    server = supervisor(
        "testapp:app", "--workers", "2", "--drain-delay", "5",
        env={"TESTAPP_STARTED_FILE": str(started)},
    )  # fmt: skip
    server.wait_ready(2)
    server.signal(signal.SIGTERM)
    wait_until(lambda: "serving 5.0s more" in server.log(), 15, "the drain delay to begin")
    for _ in range(10):
        assert server.get("/pid")[0] == 200
    assert server.process.poll() is None
    probes = _probe_until_exit(server)
    assert server.wait_exit() == 0
    assert _outcomes(probes, started) <= {"ok", "refused"}, probes
    assert _probe(server.port)[0] == "refused"
    log = server.log()
    assert log.index("serving 5.0s more") < log.index("stopping: shutdown")


def test_graceful_timeout_cancels_busy_requests_and_exits_unclean(supervisor, inflight: Path):
    """A request shorter than the graceful timeout completes; a longer one is cut by the
    worker itself (no signal needed), and the master exits 1."""
    server = supervisor(
        "testapp:app", "--graceful-timeout", "4", env={"TESTAPP_INFLIGHT_DIR": str(inflight)}
    )
    server.wait_ready(1)
    short, short_threads = _start_slow_requests(server.port, 1, 0.5)
    long, long_threads = _start_slow_requests(server.port, 1, 30.0)
    wait_until(lambda: len(list(inflight.iterdir())) == 2, 15, "both requests in flight")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(25) == 1
    for thread in short_threads + long_threads:
        thread.join(5)
    assert short == [200]  # the grace period let it finish ...
    assert long and long[0] != 200  # ... and its end cut this one, 26 s early
    log = server.log()
    assert "graceful timeout (4s): cancelling 1 request(s)" in log  # the worker, by itself
    assert "1 request(s) cut at the graceful timeout" in log
    assert "aborting" not in log  # no signal was needed
    assert "master stopped uncleanly" in log


def test_blocked_event_loop_is_detected_and_worker_replaced(supervisor):
    server = supervisor("testapp:app", "--worker-timeout", "1.5")
    server.wait_ready(1)
    (first,) = server.worker_pids()
    threading.Thread(target=try_get, args=(server.port, "/block?s=30", 40), daemon=True).start()
    wait_until(lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie",
               10, "the blocked worker to be killed")  # fmt: skip
    replacement = server.serving_pids(1)
    assert first not in replacement
    log = server.log()
    assert f"worker 1 (pid {first}) event loop silent for" in log
    assert "(worker-timeout 1.5s): killing" in log
    stack = log.split("event loop silent for", 1)[1]
    assert "testapp.py" in stack  # faulthandler showed where the loop was stuck


@pytest.mark.parametrize(
    ("app", "error"),
    [
        ("broken_import:app", "No module named 'this_module_does_not_exist'"),
        ("lifespan_fail:app", "database unreachable: db:5432"),
        ("dynamic_names:missing", "has no attribute 'missing'"),  # past the master's check
    ],
)
@START_MODES
def test_app_that_cannot_start_exits_with_code_3_and_one_error(supervisor, app, error, start):
    server = supervisor(app, "--workers", "2", *start)
    assert server.wait_exit(30) == 3
    log = server.log()
    assert log.count(error) <= 3  # once in full, once in the final line (+ traceback text)
    assert 3 <= log.count("failed to start (") <= 4  # bounded attempts, 3 by default
    (verdict,) = [line for line in log.splitlines() if "giving up: " in line]
    assert error in verdict
    assert "Traceback" not in log.split("failed to start (2/3)")[-1]


@START_MODES
def test_master_sigkill_leaves_no_worker_alive(supervisor, start):
    server = supervisor("testapp:app", "--workers", "2", *start)
    server.wait_ready(2)
    workers = server.worker_pids()
    server.process.kill()
    server.process.wait(5)

    def all_gone() -> bool:
        return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                       for pid in workers)  # fmt: skip

    wait_until(all_gone, 10, f"workers {workers} to die with their master")


def test_port_in_use_is_a_one_line_usage_error():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = run_cli("testapp:app", "--port", str(port))
    finally:
        holder.close()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"asgi-supervise: --port='{port}' (command line): cannot bind 127.0.0.1:{port}: "
        "address already in use"
    ]


def test_refused_connection_is_econnrefused():
    """Sanity check of the probe the drain test relies on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(OSError) as info:
        get(port, "/")
    assert info.value.errno == errno.ECONNREFUSED


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=10).returncode == 0  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="cannot create a PID namespace here")
def test_master_as_pid_1_honours_sigterm_and_reaps_orphans(tmp_path: Path):
    port = free_port()
    log_path = tmp_path / "pid1.log"
    with log_path.open("wb") as log:
        outer = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc",
             sys.executable, "-m", "asgi_supervise", "testapp:app", "--port", str(port)],
            cwd=APPS, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        master = wait_until(lambda: psutil.Process(outer.pid).children(), 10, "the master")[0]
        wait_until(lambda: try_get(port, "/pid"), 15, "the worker serving")
        # It really is PID 1 in there (the first workers may serve before it says so).
        wait_until(lambda: "master 1 serving" in log_path.read_text(), 10, "the master's line")

        for _ in range(3):  # each leaves a `sleep` re-parented to the master
            assert get(port, "/orphan")[0] == 200

        def children() -> list[tuple[str, str]]:
            """(name, status) of each child; one reaped between the listing and the look
            is gone, so skipped."""
            seen = []
            for child in master.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    seen.append((child.name(), child.status()))
            return seen

        def orphans_gone() -> bool:
            return all(n != "sleep" and s != psutil.STATUS_ZOMBIE for n, s in children())

        wait_until(orphans_gone, 15, "orphans reaped")
        assert get(port, "/pid")[0] == 200  # an orphan's exit was not taken for a worker's
        assert "died" not in log_path.read_text()

        master.send_signal(signal.SIGTERM)
        assert outer.wait(15) == 0
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait(5)
    assert "master stopped cleanly" in log_path.read_text()


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("testapp", "not in the form module:attribute (e.g. main:app)"),
        ("testapp:", "not in the form module:attribute (e.g. main:app)"),
        ("no_such_module:app", "no module named 'no_such_module' (looked in . and sys.path)"),
        ("testapp.sub:app", "'testapp' is a module, not a package"),
        ("my-app:app", "'my-app' is not a valid module path"),
        ("testapp:missing", "module 'testapp' has no attribute 'missing'"),
    ],
)
def test_bad_app_path_is_caught_before_spawning(app, message):
    result = run_cli(app, "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"asgi-supervise: APP='{app}' (command line): {message}"
    ]
    assert "booting" not in result.stderr


def test_unix_socket(supervisor, tmp_path: Path):
    path = tmp_path / "app.sock"
    server = supervisor("testapp:app", "--uds", str(path))
    wait_until(lambda: "ready in" in server.log(), 15, "the worker ready")
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        client.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"200 OK" in client.recv(4096)
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not path.exists()  # the master removes the socket file it created


def test_inherited_listening_fd(supervisor):
    """--fd: a socket opened by systemd or a wrapper before we start."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    server = supervisor("testapp:app", "--fd", str(fd), pass_fds=(fd,))
    listener.close()  # the supervisor holds its own copy now
    wait_until(lambda: try_get(port, "/pid"), 15, lambda: f"serving on fd {fd}\n{server.log()}")
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_systemd_notify_ready_reloading_stopping(supervisor, tmp_path: Path):
    """Type=notify-reload: systemd hears when we serve, reload and drain, over its socket."""
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(10)
    try:
        server = supervisor("testapp:app", "--workers", "2", env={"NOTIFY_SOCKET": address})
        ready = listener.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving with 2 workers")
        assert server.log().count(" ready in ") == 2  # only once both workers are ready
        server.signal(signal.SIGHUP)
        assert listener.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert listener.recv(4096).decode().startswith("READY=1")
        server.signal(signal.SIGTERM)
        assert listener.recv(4096).decode().startswith("STOPPING=1")
        assert server.wait_exit() == 0
    finally:
        listener.close()


def test_pid_file_names_the_master_and_goes_away(supervisor, tmp_path: Path):
    path = tmp_path / "app.pid"
    server = supervisor("testapp:app", "--pid-file", str(path))
    server.wait_ready(1)
    assert path.read_text() == f"{server.pid}\n"
    second = run_cli("testapp:app", "--pid-file", str(path), "--port", str(free_port()))
    assert second.returncode == 2
    assert f"process {server.pid} is running and owns it" in second.stderr
    os.kill(int(path.read_text()), signal.SIGTERM)  # what an operator's script does
    assert server.wait_exit() == 0
    assert not path.exists()
