"""gunicorn's arbiter, with the native engine's SIGTERM, exit codes and worker bookkeeping.

Everything else is gunicorn's own loop: forking, reaping, respawning, HUP, TTIN/TTOU,
the heartbeat timeout. What changes:

- SIGTERM and SIGINT turn readiness off at once, keep serving for --drain-delay while
  load balancers deregister, then run gunicorn's graceful stop (listeners closed, workers
  SIGTERMed: each drains as a native worker does). A second one, or SIGQUIT, stops now.
- The exit code says what the native master's says: 1 when a worker cut requests at the
  graceful timeout, outran its lifespan shutdown, or had to be killed; 3 when the app
  cannot start (gunicorn's own halt on a worker's boot error, whose code is the same).
- Each worker's exit is told to the observer with why the arbiter stopped it (reload,
  scale, shutdown, timeout), so restarts are counted by reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

from gunicorn import sock as gsock
from gunicorn.arbiter import Arbiter as GunicornArbiter
from gunicorn.errors import HaltServer

from asgi_supervise.gunicorn.observer import Observer
from asgi_supervise.protocol import Exit

log = logging.getLogger("asgi_supervise.master")


class Arbiter(GunicornArbiter):
    def __init__(self, app: Any, observer: Observer, listeners: list[int]) -> None:
        self.stop_reasons: dict[int, str] = {}  # pid -> why the arbiter SIGTERMed it
        super().__init__(app)
        self.observer = observer
        self.inherited = listeners  # bound by the CLI: its errors are the native ones
        self.stopping_for: str | None = None  # why workers SIGTERMed now are stopped
        self.term_at: float | None = None  # end of the drain delay, once SIGTERM came
        self.unclean = False

    # --- start and listeners --------------------------------------------------------------

    def start(self) -> None:
        if not self.LISTENERS and self.inherited:
            self.LISTENERS = gsock.create_sockets(self.cfg, self.log, self.inherited)
            self.inherited = []
        super().start()

    # --- forking --------------------------------------------------------------------------

    def spawn_worker(self) -> int:
        master = os.getpid()
        try:
            with self.observer.quiet():
                pid = super().spawn_worker()  # a child leaves it by SystemExit, at its end
        except SystemExit as exc:
            if os.getpid() != master:
                _end_child(exc.code)
            raise
        worker = self.WORKERS[pid]
        worker.channel.close()  # the child's end
        self.observer.call(self.observer.started, pid, worker.age, worker.channel_master)
        return pid

    def post_fork(self, worker: Any) -> None:
        """In the child: the master's ends of every channel and its health port go."""
        self.observer.in_child([*self.WORKERS.values(), worker])

    def child_exit(self, worker: Any) -> None:
        reason = "timeout" if worker.aborted else self.stop_reasons.pop(worker.pid, None)
        self.observer.worker_exited(worker.pid, reason)

    # --- why workers are stopped ------------------------------------------------------------

    def kill_worker(self, pid: int, sig: int) -> None:
        if sig == signal.SIGTERM and pid in self.WORKERS:
            reason = self.stop_reasons.setdefault(pid, self.stopping_for or "scale")
            self.observer.call(self.observer.stopping, pid, reason)
        elif sig == signal.SIGKILL and pid in self.WORKERS and self.stopping_for == "shutdown":
            self.unclean = True  # still draining at gunicorn's graceful timeout
        super().kill_worker(pid, sig)

    def handle_hup(self) -> None:
        """Re-read the configuration first: an invalid one reloads nothing."""
        plan = self.app.reconfigure()
        if plan is None:
            return
        self.observer.call(self.observer.new_plan, plan.to_dict())
        self.observer.call(self.observer.reloading)
        super().handle_hup()

    def reap_workers(self) -> None:
        """gunicorn's, except that a worker's boot error while the arbiter already stops
        (another one's halted it) does not halt it again halfway through its stop."""
        try:
            super().reap_workers()
        except HaltServer:
            if self.stopping_for != "shutdown":
                raise

    def reload(self) -> None:
        self.stopping_for = "reload"
        try:
            super().reload()
        finally:
            self.stopping_for = None

    def stop(self, graceful: bool = True) -> None:
        self.stopping_for = "shutdown"
        self.observer.call(self.observer.set_draining)
        if not graceful:
            self.unclean = True
        super().stop(graceful)

    # --- SIGTERM: readiness off, the drain delay, then gunicorn's graceful stop -----------

    def handle_term(self) -> None:
        if self.term_at is not None:  # a second one: stop now
            log.info("second SIGTERM: stopping now")
            self.stop(graceful=False)
            raise StopIteration
        self.observer.call(self.observer.set_draining)
        delay = self.app.settings.drain_delay
        self.term_at = time.monotonic() + delay
        if delay > 0:
            log.info(
                "draining: not ready; serving %.1fs more while load balancers deregister", delay
            )
            return
        raise StopIteration

    handle_int = handle_term  # as the native master: SIGINT drains too

    def wait_for_signals(self, timeout: float = 1.0) -> list[int]:
        self.observer.notifier.watchdog(time.monotonic())  # from the loop a wedge stops
        if self.term_at is not None:
            left = self.term_at - time.monotonic()
            if left <= 0:
                log.info("drain delay over: stopping gracefully")
                raise StopIteration  # gunicorn's run() halts: its graceful stop
            timeout = min(timeout, left)
        return super().wait_for_signals(timeout)

    def halt(self, reason: str | None = None, exit_status: int = 0) -> None:
        """gunicorn's halt, with the native exit codes and the observer stopped last."""
        self._stop_control_server()
        self.stop()
        self.observer.wait(self.observer.read_all)  # the last reports of every worker
        if exit_status == Exit.BOOT_FAILURE or (exit_status and self.observer.boot_error):
            first = (self.observer.boot_error or reason or "").strip().splitlines()
            log.error("giving up: the app cannot start: %s", first[-1] if first else reason)
            exit_status = Exit.BOOT_FAILURE
        elif exit_status == 0 and (self.unclean or self.observer.unclean):
            log.warning("master stopped uncleanly: requests were cut or a worker was killed")
            exit_status = Exit.UNCLEAN
        elif reason is not None:
            log.error("stopping: %s", reason)
        if self.pidfile is not None:
            self.pidfile.unlink()
        self.cfg.on_exit(self)
        self.observer.stop()
        log.info("master %d exited (%d)", self.pid, exit_status)
        sys.exit(exit_status)


def _end_child(code: object) -> None:
    """A worker's end: exit here, never unwinding into the master's stack that the fork
    copied (the CLI's pid-file cleanup, the master's finalizers), and without the
    interpreter's teardown of everything the master had imported."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
