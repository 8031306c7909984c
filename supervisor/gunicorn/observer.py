"""What the gunicorn master knows of its workers: their reports, metrics and health.

gunicorn's arbiter loop waits on its signal queue and cannot watch sockets, so this runs
in a thread of the gunicorn master with its own event loop: it reads every worker's
control channel (the messages of `protocol`, the same as a native worker sends), adds up
the request metrics, keeps each worker's state, and serves /livez /readyz /status
/metrics (`observe.health`, `observe.metrics`) when --metrics is on. The arbiter
(`gunicorn.arbiter`) tells it of spawns, stops and exits with `call`; everything the
thread keeps is touched only from its loop.

gunicorn forks its workers from the thread's process. A child whose parent thread held
the lock of sys.stderr at the fork would block on its first log line, so the thread
writes its log lines only under `quiet`, which the arbiter holds while it forks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

from asgi_supervise.master.notify import Notifier
from asgi_supervise.observe.health import HealthApp, HealthServer, readiness, start_server
from asgi_supervise.observe.metrics import SupervisorMetrics, render
from asgi_supervise.observe.multiproc import MultiprocDir
from asgi_supervise.protocol import APP_SAMPLES_DROPPED, READ_BYTES, decode

log = logging.getLogger("asgi_supervise.master")


@dataclass
class WorkerView:
    """One gunicorn worker as its reports and the arbiter's events describe it."""

    pid: int
    age: int  # gunicorn's worker number, in spawn order
    sock: socket.socket
    started: float = field(default_factory=time.monotonic)
    state: str = "booting"  # ready, draining
    ready_at: float | None = None
    requests: int = 0
    connections: int = 0
    header_timeouts: int = 0
    meter: str | None = None
    stop_reason: str | None = None  # reload, scale, shutdown, requests, timeout
    boot_error: str | None = None
    drained: dict[str, Any] | None = None
    rss: int = 0
    cpu_percent: float = 0.0
    ps: psutil.Process | None = None


def exit_reason(view: WorkerView) -> str:
    """Why a worker is gone, in the vocabulary of `asgi_supervise_worker_restarts_total`."""
    if view.stop_reason is not None:
        return view.stop_reason
    if view.ready_at is None:
        return "boot-failure"
    return "crash"


class Observer:
    def __init__(
        self,
        settings: Any,
        plan: dict[str, Any],
        target: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.target = target  # gunicorn's current worker count
        self.metrics = SupervisorMetrics()
        self.metrics.set_plan(plan)
        self.dir: MultiprocDir | None = None
        self.workers: dict[int, WorkerView] = {}
        self.draining = False
        self.unclean = 0  # workers whose drain cut requests or outran the lifespan shutdown
        self.boot_error: str | None = None  # the first worker's report, for the exit line
        self.fork_lock = threading.Lock()
        self.notifier = Notifier()  # systemd: READY once the workers are, not at boot
        self.notify_ready = True  # READY=1 is due once `target` workers are ready ...
        self.ready_from_age = 0  # ... of those gunicorn started since the last HUP
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: HealthServer | None = None
        self.started_at = time.monotonic()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="asgi-supervise-observer")

    # --- from the arbiter's thread ------------------------------------------------------

    def start(self) -> None:
        """Start the thread; the health port is bound (or its error raised) on return."""
        if self.settings.metrics:
            self.dir = MultiprocDir.create(self.settings.multiproc_dir)
        self._thread.daemon = True
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run `function(*args)` in the observer's loop, after what was called before."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                self.loop.call_soon_threadsafe(function, *args)

    def wait(self, function: Callable[..., Any], *args: Any, timeout: float = 2.0) -> Any:
        """`call`, and wait for its result (None if the loop does not answer in time)."""
        if self.loop is None or self.loop.is_closed():
            return None
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # handed to the waiting thread
                future.set_exception(exc)

        self.call(run)
        with contextlib.suppress(concurrent.futures.TimeoutError):
            return future.result(timeout)
        return None

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No log line from the thread meanwhile: held around each fork (module doc)."""
        with self.fork_lock:
            yield

    def in_child(self, workers: list[Any]) -> None:
        """In a freshly forked worker: drop what belongs to the master alone."""
        for worker in workers:
            worker.channel_master.close()
        if self.server is not None:
            self.server.sock.close()
            # A scrape's connection open at the fork: the child's copy would keep it open
            # (no FIN to the scraper) after the master closes it.
            for connection in list(self.server.server.server_state.connections):
                transport = getattr(connection, "transport", None)
                sock = transport and transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        os.close(sock.fileno())
        if self.dir is not None:
            os.environ.update(self.dir.environ())

    def worker_exited(self, pid: int, reason: str | None) -> None:
        """From gunicorn's child_exit; its metrics files are folded before the next fork."""
        if self.dir is not None:
            self.dir.worker_exited(pid)
        self.wait(self._exited, pid, reason)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.call(self._stop.set)
        self._thread.join(5)
        if self.dir is not None:
            self.dir.cleanup()

    # --- in the observer's loop -----------------------------------------------------------

    def _run(self) -> None:
        # Signals are the arbiter's: delivered to this thread instead, they would wait for
        # the arbiter's next wake-up (up to a second) before its handlers run.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # the health port, most likely: the arbiter says it
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        s = self.settings
        if s.metrics:
            app = HealthApp(status=self.status, readiness=self.readiness, metrics=self.scrape)
            self.server = await start_server(app, s.metrics_host, s.metrics_port)
            where = f"http://{s.metrics_host}:{self.server.port}"
            self._log(
                logging.INFO, "metrics and health on %s (/metrics /livez /readyz /status)", where
            )
        self._ready.set()
        sampling = asyncio.create_task(self._sample())
        await self._stop.wait()
        sampling.cancel()
        if self.server is not None:
            await self.server.stop()
        for view in self.workers.values():
            view.sock.close()

    def _log(self, level: int, message: str, *args: Any, **kwargs: Any) -> None:
        with self.fork_lock:
            log.log(level, message, *args, **kwargs)

    def started(self, pid: int, age: int, sock: socket.socket) -> None:
        assert self.loop is not None
        view = self.workers[pid] = WorkerView(pid, age, sock)
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._read, view)
        self.metrics.worker_started()
        if self.dir is not None:
            self.dir.worker_started(pid)

    def stopping(self, pid: int, reason: str) -> None:
        view = self.workers.get(pid)
        if view is not None and view.stop_reason is None:
            view.stop_reason = reason
            view.state = "draining"

    def reloading(self) -> None:
        """Called before gunicorn's reload spawns: READY again once its new workers are."""
        self.notifier.reloading()
        self.notify_ready = True
        self.ready_from_age = max((view.age for view in self.workers.values()), default=0) + 1

    def _maybe_ready(self) -> None:
        ready = sum(
            view.state == "ready" and view.age >= self.ready_from_age
            for view in self.workers.values()
        )
        target = self.target()
        if self.notify_ready and not self.draining and ready >= target:
            self.notify_ready = False
            self.notifier.ready(f"serving with {ready} workers")

    def new_plan(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.metrics.set_plan(plan)

    def set_draining(self) -> None:
        if not self.draining:
            self.notifier.stopping()
        self.draining = True
        self.metrics.set_draining(True)

    def _exited(self, pid: int, reason: str | None) -> None:
        view = self.workers.pop(pid, None)
        if view is None:
            return
        self._read(view)  # what it said last, before the pid is forgotten
        with contextlib.suppress(ValueError, OSError):
            assert self.loop is not None
            self.loop.remove_reader(view.sock.fileno())
        view.sock.close()
        if reason is not None:
            view.stop_reason = reason
        why = exit_reason(view)
        level = (
            logging.INFO if why in ("reload", "scale", "shutdown", "requests") else logging.WARNING
        )
        extra = {"event": "exited", "worker_pid": pid, "reason": why}
        self._log(level, "worker %d (pid %d) exited (%s)", view.age, pid, why, extra=extra)
        self.metrics.worker_exited(why)
        self.metrics.requests.worker_gone(pid)
        self.metrics.header_timeouts_final(pid, view.header_timeouts)
        drained = view.drained or {}
        if drained.get("cut") or drained.get("lifespan") == "timeout":
            self.unclean += 1

    def read_all(self) -> None:
        for view in list(self.workers.values()):
            self._read(view)

    def _read(self, view: WorkerView) -> None:
        while True:
            try:
                data = view.sock.recv(READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the worker is gone; child_exit says why
                with contextlib.suppress(ValueError, OSError):
                    assert self.loop is not None
                    self.loop.remove_reader(view.sock.fileno())
                return
            try:
                self._handle(view, decode(data))
            except (ValueError, TypeError, KeyError) as exc:
                self._log(logging.WARNING, "worker (pid %d): unreadable report: %s", view.pid, exc)

    def _handle(self, view: WorkerView, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "beat":
            view.requests = int(message.get("requests", view.requests))
            view.connections = int(message.get("connections", view.connections))
            view.header_timeouts = int(message.get("header_timeouts", view.header_timeouts))
            self.metrics.header_timeouts_seen(view.pid, view.header_timeouts)
        elif kind == "metrics":
            self.metrics.requests.add(view.pid, message)
            self.metrics.app_samples_dropped(message.get(APP_SAMPLES_DROPPED, 0))
        elif kind == "ready":
            view.ready_at = time.monotonic()
            view.meter = message.get("meter")
            if view.state == "booting":
                view.state = "ready"
            took = view.ready_at - view.started
            self.metrics.worker_ready(took)
            extra = {"event": "ready", "worker_pid": view.pid, "boot_s": took}
            self._log(
                logging.INFO,
                "worker %d (pid %d) ready in %.2fs",
                view.age,
                view.pid,
                took,
                extra=extra,
            )
            self._maybe_ready()  # after the line: what it says has happened
        elif kind == "recycling":
            view.stop_reason = view.stop_reason or str(message.get("reason", "requests"))
            view.state = "draining"
        elif kind == "boot_error":
            view.boot_error = str(message.get("error", ""))
            if self.boot_error is None:
                self.boot_error = view.boot_error
                self._log(
                    logging.ERROR,
                    "worker %d (pid %d) failed to start:\n%s",
                    view.age,
                    view.pid,
                    view.boot_error.rstrip(),
                    extra={"event": "boot_failure", "worker_pid": view.pid},
                )
        elif kind == "drained":
            view.drained = message

    async def _sample(self) -> None:
        """RSS and CPU of each worker once a second, for /status; states for /metrics."""
        while True:
            for view in list(self.workers.values()):
                try:
                    view.ps = view.ps or psutil.Process(view.pid)
                    with view.ps.oneshot():
                        view.rss = view.ps.memory_info().rss
                        view.cpu_percent = view.ps.cpu_percent()
                except psutil.Error:
                    pass
            self.metrics.set_worker_states(Counter(v.state for v in self.workers.values()))
            await asyncio.sleep(1.0)

    # --- what the health server asks --------------------------------------------------------

    def ready_count(self) -> int:
        return sum(view.state == "ready" for view in self.workers.values())

    def readiness(self) -> tuple[bool, str]:
        return readiness(self.draining, self.ready_count(), self.target(), self.settings.min_ready)

    def scrape(self, accept: str | None) -> tuple[bytes, str]:
        self.metrics.set_worker_states(Counter(v.state for v in self.workers.values()))
        return render(accept, self.dir, self.metrics)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "master": {
                "engine": "gunicorn",
                "phase": "draining" if self.draining else "running",
                "uptime_s": round(now - self.started_at, 3),
                "workers_target": self.target(),
                "workers_ready": self.ready_count(),
            },
            "workers": [
                {
                    "worker": view.age,
                    "pid": view.pid,
                    "state": view.state,
                    "age_s": round(now - view.started, 3),
                    "requests": view.requests,
                    "connections": view.connections,
                    "rss_bytes": view.rss,
                    "cpu_percent": view.cpu_percent,
                    "stopping": view.stop_reason,
                    "request_meter": view.meter,
                }
                for view in sorted(self.workers.values(), key=lambda v: v.age)
            ],
            "plan": self.plan,
        }
