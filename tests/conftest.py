"""Real processes over loopback: start the CLI, poll with deadlines, and leave nothing behind."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

APPS = Path(__file__).parent / "apps"
E2E = Path(__file__).parent / "e2e"
REPO = Path(__file__).parent.parent
# `loadgen`, the load generator the benchmarks use, is the tests' too (`from loadgen import Load`).
sys.path.append(str(REPO / "bench"))
# Every process a test starts inherits this per-test token (run_cli and Supervisor copy
# os.environ; workers inherit the master's), so the leak check recognises that test's
# masters, workers and orphans, and never touches anyone else's servers on the machine.
FORKSERVER_MODULE = "asgi_supervise.worker.forkserver"
MASTER_UP = re.compile(r"master \d+ serving")  # its loop runs: its signal handlers are in
FORKSERVER = "asgi-forkserver"  # a fork server's name (comm), once it has set it
FORKED_WORKER = "asgi-worker"  # a forked worker's name; it has its fork server's cmdline
STANDBY = "asgi-standby"  # a --preload fork server's standby (the next one), likewise
CONFIG_READER = "asgi-config"  # the master's child reading its settings for a reload
OWNER = "SUPERVISE_TEST_OWNER"  # not ASGI_SUPERVISE_*: the CLI would reject it


def c_compiler() -> str | None:
    """The compiler pip would build the request meter with, if this machine has it."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return compiler if shutil.which(compiler) else None


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.02,
):
    """Poll until `predicate()` is truthy; fail the test with `what` at the deadline.

    `what` may be a callable, evaluated only on failure: a server log read then shows what
    happened, not the empty log of when the wait began.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def _port_block() -> range:
    """This test process's own ports: below the kernel's ephemeral range, one block per worker.

    A port the kernel picks for `bind(0)` comes from the ephemeral range, where every
    client connection of every parallel test also takes its source port: between the
    probe closing and the server binding, a client may take it ("address already in use").
    Below that range nothing is handed out implicitly, and each pytest-xdist worker (gw0,
    gw1, ...) counts through a block no other worker touches.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(low, 12_000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw7").removeprefix("gw")
    index = int(worker) % 8 if worker.isdigit() else 7
    size = (top - 4_000) // 8
    start = 4_000 + index * size
    return range(start, start + size)


_PORTS = _port_block()
_next_port = _PORTS.start + os.getpid() % len(_PORTS)


def toml_value(value: Any) -> str:
    """Enough TOML for the config tests: JSON spells str, int, float, bool and lists alike."""
    return json.dumps(value)


def write_table(path: Path, values: dict[str, Any], header: str = "") -> None:
    lines = [header] if header else []
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def free_port() -> int:
    """A port no one holds now and this test run has not handed out before."""
    global _next_port
    for _ in range(len(_PORTS)):
        port, _next_port = _next_port, _next_port + 1
        if _next_port >= _PORTS.stop:
            _next_port = _PORTS.start
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


def get(port: int, path: str, timeout: float = 5.0, host: str = "127.0.0.1") -> tuple[int, str]:
    """One request on a new connection; connection errors propagate to the caller."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def try_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str] | None:
    try:
        return get(port, path, timeout)
    except OSError:
        return None


def run_cli(*args: str, cwd: Path = APPS, env: dict[str, str] | None = None, timeout: float = 30):
    """Run the CLI to completion (for commands and errors that exit by themselves)."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
    run_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "asgi_supervise", *args],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def config_json(
    *args: str, cwd: Path, env: dict[str, str] | None = None, runner: Callable[..., Any] = run_cli
) -> dict[str, Any]:
    """`config --json` through `runner` (the binary, or `run_main` in-process)."""
    result = runner("config", "--json", *args, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def setting(data: dict[str, Any], name: str) -> tuple[Any, str]:
    """A setting's value and source in `config --json`'s answer."""
    entry = data["settings"][name]
    return entry["value"], entry["source"]


def plan_text(*args: str, cwd: Path, runner: Callable[..., Any] = run_cli) -> str:
    """`plan` through `runner`: it must succeed silently on stderr."""
    result = runner("plan", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == ""
    return result.stdout


def run_main(*args: str, cwd: Path = APPS, env: dict[str, str] | None = None):
    """`run_cli` in this process: the CLI's `main` with `args`, in `cwd`, with the
    environment run_cli would give the binary; its exit code and output, as run_cli returns
    them. For what only the settings decide (config, plan, usage errors): a process adds
    nothing there but a second of start-up. Never for a command that could start a master."""
    from asgi_supervise.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        for name in [n for n in os.environ if n.startswith("ASGI_SUPERVISE_")]:
            del os.environ[name]
        os.environ.update(env or {})
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(list(args), int(code or 0), out.getvalue(), err.getvalue())


def in_cgroups(cgroups: tuple[Path, ...], *python_args: str) -> list[str]:
    """A Python command line; with `cgroups` (their cgroup.procs files) a small launcher
    joins them first and then execs it, so the pid and everything it starts are inside."""
    if not cgroups:
        return [sys.executable, *python_args]
    return [sys.executable, "-c", JOIN_CGROUPS, *map(str, cgroups), "--", *python_args]


JOIN_CGROUPS = """
import os, sys
end = sys.argv.index("--")
for procs in sys.argv[1:end]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
os.execv(sys.executable, [sys.executable, *sys.argv[end + 1:]])
"""


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for its parent."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_fork_server(process: psutil.Process) -> bool:
    """By its name, or while an exec'd one has not named itself yet, its command line (the
    first one, forked from the master, names itself as it starts)."""
    name = process.name()
    if name in (FORKED_WORKER, STANDBY):
        return False
    return name == FORKSERVER or FORKSERVER_MODULE in process.cmdline()


def role(process: psutil.Process, forks_workers: bool = False) -> str:
    """worker, fork server, standby, config reader, or unnamed: forked ones share their
    parent's command line, and their names tell them apart. A fresh fork of the master
    (the config reader, the first fork server) has its name too until it runs its first
    line, which under load can be milliseconds: "unnamed", unless the master forks its
    workers itself (`forks_workers`: the gunicorn engine)."""
    if is_fork_server(process):
        return "fork server"
    name = process.name()
    known = {STANDBY: "standby", CONFIG_READER: "config reader"}
    if name in known:
        return known[name]
    parent = process.parent()
    if forks_workers or parent is None:
        return "worker"
    if (name, process.cmdline()) == (parent.name(), parent.cmdline()):
        return "unnamed"
    return "worker"


class Supervisor:
    """An `asgi-supervise` master started as users start it, with its output in a file."""

    def __init__(
        self,
        tmp_path: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = APPS,
        pass_fds: tuple[int, ...] = (),
        cgroups: tuple[Path, ...] = (),
        port: int | None = None,
    ):
        self.port = port or free_port()
        self.log_path = tmp_path / f"supervisor-{self.port}.log"
        self.args = args
        # The tests' own settings only: nothing leaks in from the developer's shell.
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_SUPERVISE_")}
        run_env.update(PYTHONUNBUFFERED="1", **(env or {}))
        # An address of its own, or one from a gunicorn config file.
        given = {"--uds", "--fd", "-b", "--bind", "--gunicorn-config"} & set(args)
        bind = [] if given else ["--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                in_cgroups(cgroups, "-m", "asgi_supervise", *args, *bind),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=run_env,
                pass_fds=pass_fds,
            )
        self.ps = psutil.Process(self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
        return get(self.port, path, timeout)

    def worker_pids(self) -> set[int]:
        return self._children("worker")

    def fork_server_pids(self) -> set[int]:
        return self._children("fork server")

    def standby_pids(self) -> set[int]:
        return self._children("standby")

    def _children(self, which: str) -> set[int]:
        """Live children in a role: the workers, the fork servers (booting ones too, not
        named yet: `is_fork_server`), or the standbys."""
        try:
            children = self.ps.children()
        except psutil.NoSuchProcess:
            return set()
        pids = set()
        gunicorn = "(engine: gunicorn" in self.log()  # said before its first fork
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE and role(child, gunicorn) == which:
                    pids.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def serving_pids(self, want: int, timeout: float = 15.0) -> set[int]:
        """Distinct worker pids seen answering /pid, on new connections, until `want`; and
        the master's loop running (the first workers can serve before it: a signal sent
        then waits for it, and the test would see a reload of a master still starting)."""
        seen: set[int] = set()

        def enough() -> bool:
            answer = try_get(self.port, "/pid", timeout=1.0)
            if answer and answer[0] == 200:
                seen.add(int(answer[1]))
            return len(seen) >= want

        wait_until(enough, timeout, lambda: f"{want} workers serving (saw {seen})\n{self.log()}")
        wait_until(
            lambda: MASTER_UP.search(self.log()),
            timeout,
            lambda: f"the master's loop running\n{self.log()}",
        )
        return seen

    def wait_ready(self, workers: int = 1, timeout: float = 15.0) -> None:
        """Every worker reported ready (the master logs it) and the socket answers."""
        wait_until(
            lambda: self.log().count(" ready in ") >= workers and try_get(self.port, "/pid"),
            timeout,
            lambda: f"{workers} workers ready\n{self.log()}",
        )

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"master still running after {timeout}s\n{self.log()}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(*args: str, **options: Any) -> Supervisor:
        server = Supervisor(tmp_path, list(args), **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(autouse=True)
def no_leftover_processes(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Fail any end-to-end test that leaves a process it started running; end those by PID.

    Unit tests start no process, and scanning every process's environment costs."""
    if E2E not in request.path.parents:
        yield
        return
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    monkeypatch.setenv(OWNER, token)
    yield

    def leftovers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if proc.environ().get(OWNER) == token:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    deadline = time.monotonic() + 5.0
    remaining = leftovers()
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = leftovers()
    for proc in remaining:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if remaining:
        pytest.fail(f"test left processes running: {[p.pid for p in remaining]}")
