"""The pieces every scenario uses: the server under test, readiness, small statistics.
The HTTP client and the load it generates are `loadgen`'s (the tests use it too).

Rules kept everywhere: every loop is bounded in count and in time, and only processes this
harness started are signalled, by PID, after checking the PID still names the same process
(its create_time). Nothing here uses pkill/killall or process names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import psutil
from loadgen import HOST, Pool, failure_kind, get, open_loop, pid_of  # noqa: F401 (harness.get etc. still work)

BENCH = os.path.dirname(os.path.abspath(__file__))
MB = 1024 * 1024
LOGS: list[str] = []  # every server log of this process, newest last (run.py records them)
SERVER_CPUS = ""  # pin(): taskset's CPU list for every server tree ("" = anywhere)


# --- the server under test -------------------------------------------------------------


def pin(spec: str) -> tuple[str, str]:
    """--pin SERVER:LOAD: every server tree started from now on runs on the SERVER CPUs,
    this process (and so its load generator) on the LOAD CPUs. ValueError if malformed."""
    global SERVER_CPUS
    server_cpus, _, load_cpus = spec.partition(":")
    if not (server_cpus and load_cpus):
        raise ValueError("--pin takes SERVER:LOAD CPU lists, e.g. 1:0")
    subprocess.run(["taskset", "-pc", load_cpus, str(os.getpid())], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    SERVER_CPUS = server_cpus
    return server_cpus, load_cpus


def pinned(command: list[str]) -> list[str]:
    """`command` on the SERVER CPUs once pin() was called (taskset execs: the same pid)."""
    return ["taskset", "-c", SERVER_CPUS, *command] if SERVER_CPUS else command


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """One server process tree, started from a command template.

    The template is split with shlex and exec'd without a shell, so the process started is
    the master. It runs in bench/ with bench/ on PYTHONPATH (so `apps.hello:app` imports)
    and the harness interpreter's bin/ first on PATH (so `uvicorn`, `gunicorn` and
    `asgi-supervise` are this venv's). A thread polls the tree every `poll` seconds and
    remembers each process once: pid -> (create_time, first seen).
    """

    def __init__(
        self,
        name: str,
        template: str,
        app: str,
        workers: int,
        log_dir: str,
        poll: float = 0.05,
        **extra: Any,
    ):
        self.name = name
        self.port = free_port()
        # Its own metrics port when the template has one and the caller gave none.
        asked = "{metrics_port}" in template
        self.metrics_port: int | None = extra.pop("metrics_port", None) or (
            free_port() if asked else None
        )
        values = {"app": app, "host": HOST, "port": self.port, "workers": workers, **extra}
        values["metrics_port"] = self.metrics_port
        cmd = template
        for key, value in values.items():
            cmd = cmd.replace("{" + key + "}", str(value))
        self.cmd = cmd
        self.poll = poll
        self.log_path = os.path.join(log_dir, f"{name}-{self.port}.log")
        self.known: dict[int, tuple[float, float]] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_start = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["PYTHONPATH"] = BENCH
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.t_start = time.monotonic()
            self.proc = subprocess.Popen(
                pinned(shlex.split(self.cmd)),
                cwd=BENCH,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.remember([self.pid])
        LOGS.append(self.log_path)
        threading.Thread(target=self._track, daemon=True).start()
        return self

    def remember(self, pids: list[int]) -> None:
        now = time.monotonic()
        for pid in pids:
            with self.lock:
                if pid in self.known:
                    continue
            try:
                created = psutil.Process(pid).create_time()
            except psutil.Error:
                continue
            with self.lock:
                self.known.setdefault(pid, (created, now))

    def tree(self) -> list[int]:
        """The live descendants of the master (recorded as seen)."""
        try:
            kids = [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return []
        self.remember(kids)
        return [p for p in kids if self.alive(p)]

    def _track(self) -> None:
        while not self.done.is_set() and self.running():  # ends with the master
            self.tree()
            self.done.wait(self.poll)

    def first_seen(self, pid: int) -> float | None:
        with self.lock:
            return self.known[pid][1] if pid in self.known else None

    def alive(self, pid: int) -> bool:
        """True if pid is still the process we recorded, and not a zombie."""
        with self.lock:
            rec = self.known.get(pid)
        try:
            p = psutil.Process(pid)
            if rec is not None and abs(p.create_time() - rec[0]) > 0.01:
                return False
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int, pid: int | None = None) -> float:
        """Signal the master, or one recorded process of the tree; returns when."""
        pid = self.pid if pid is None else pid
        if pid != self.pid and not self.alive(pid):
            raise RuntimeError(f"pid {pid} is not a live process of {self.name}")
        os.kill(pid, sig)
        return time.monotonic()

    async def wait_exit(self, timeout: float, step: float = 0.01) -> float | None:
        """Monotonic time the master was seen gone (polled every `step`), or None."""
        assert self.proc is not None
        for _ in range(int(timeout / step) + 1):
            if self.proc.poll() is not None:
                return time.monotonic()
            await asyncio.sleep(step)
        return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; then SIGKILL any recorded process still alive."""
        if self.proc is None:
            return
        self.tree()
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.tree()
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.done.set()
        with self.lock:
            leftovers = [pid for pid in self.known if pid != self.pid]
        for pid in leftovers:
            if self.alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def log_tail(self, n: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""


class ListenerWatch(threading.Thread):
    """When a new process of the tree first has the listening socket in an epoll set:
    the moment it can accept, the same way for every server, read from /proc.

    Which worker answers a connection on a shared socket is a scheduler lottery (the
    worker placed on an awake CPU wins, and keeps winning), so "a new pid answered" times
    the lottery as much as the respawn. An eventpoll's fdinfo lists every watched file
    by inode (`ino:<hex>`); the listener's inode is the same in every process holding it.
    Polled every `every` s, for at most `limit` s; `at` is monotonic, None if never.
    """

    def __init__(self, srv: Server, every: float = 0.001, limit: float = 5.0):
        super().__init__(daemon=True)
        self.root = srv.pid
        self.old = {srv.pid, *srv.tree()}
        ino = listener_inode(sorted(self.old), srv.port)
        if ino is None:
            raise RuntimeError(f"{srv.name}: no process holds a listener on {srv.port}")
        self.tag = f"ino:{ino:x} "
        self.every, self.limit = every, limit
        self.at: float | None = None
        self.pid: int | None = None

    def run(self) -> None:
        end = time.monotonic() + self.limit
        while time.monotonic() < end:
            for pid in descendants(self.root):
                if pid not in self.old and polls_file(pid, self.tag):
                    self.at, self.pid = time.monotonic(), pid
                    return
            time.sleep(self.every)


def listener_inode(pids: list[int], port: int) -> int | None:
    for pid in pids:
        with contextlib.suppress(psutil.Error, OSError):
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.fd != -1:
                    return os.stat(f"/proc/{pid}/fd/{c.fd}").st_ino
    return None


def descendants(root: int) -> list[int]:
    """Every descendant of root, from /proc/PID/task/PID/children (cheap to poll)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def polls_file(pid: int, tag: str) -> bool:
    """Whether one of pid's epoll sets watches the file whose fdinfo tag is `tag`."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                if tag in f.read():
                    return True
        except OSError:
            continue
    return False


def started_at(pid: int) -> float | None:
    """When pid started, in CLOCK_BOOTTIME seconds (10 ms ticks). psutil's create_time()
    adds the boot time rounded to whole seconds, too coarse to time a respawn."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def wait_workers(
    srv: Server, n: int, timeout: float = 30.0, every: float = 0.01
) -> dict[str, Any]:
    """A new-connection probe of /pid every `every` s (not waiting for earlier ones, so a
    request held in the listen backlog is timed by when it really completes), until n
    distinct pids have answered. Times are from the server's start."""
    seen: dict[int, float] = {}
    first: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    done = asyncio.Event()

    async def probe() -> None:
        r = await get(srv.port, "/pid", timeout=2.0)
        pid = pid_of(r)
        if pid is not None:
            first.append(r["t1"])
            seen.setdefault(pid, r["t1"])
            if len(seen) >= n:
                done.set()

    for _ in range(int(timeout / every)):
        if done.is_set() or not srv.running():
            break
        if len(tasks) < 64:
            task = asyncio.ensure_future(probe())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    times = sorted(seen.values())
    return {
        "pids": sorted(seen),
        "t_first_200": min(first) - srv.t_start if first else None,
        "t_all": times[n - 1] - srv.t_start if len(times) >= n else None,
    }


async def start_ready(
    name: str, template: str, app: str, o: Any, **extra: Any
) -> tuple[Server, dict[str, Any]]:
    """A server with all `o.workers` answering. A free port can be taken before the server
    binds it (load generators' client sockets share the range): then it starts again, on
    other ports, up to three times in all."""
    tries = 3
    while True:
        srv = Server(name, template, app, o.workers, o.log_dir, **extra).start()
        ready = await wait_workers(srv, o.workers)
        if ready["t_all"] is not None:
            return srv, ready
        srv.stop()
        tries -= 1
        if not tries or "address already in use" not in srv.log_tail().lower():
            raise RuntimeError(
                f"{name}: {len(ready['pids'])}/{o.workers} workers answered; "
                f"log tail:\n{srv.log_tail()}"
            )


# --- small statistics ----------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    v = sorted(values)
    if not v:
        return None
    return v[min(len(v) - 1, max(0, int(-(-p * len(v) // 100)) - 1))]


def median(values: list[Any]) -> float | None:
    v = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return statistics.median(v) if v else None


def spread(values: list[Any], nd: int = 1) -> str:
    """'median [min-max]' of the numbers in values, with nd decimals."""
    v = [x for x in values if isinstance(x, (int, float))]
    if not v:
        return "-"
    return f"{median(v):.{nd}f} [{min(v):.{nd}f}-{max(v):.{nd}f}]"


def kinds(results: list[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(r["outcome"] for r in results if not r["ok"]))


def r3(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)
