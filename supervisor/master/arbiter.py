"""The master: keeps N healthy workers on the shared socket, then drains them.

Signal handlers and control commands only queue what they ask; the loop in `serve` acts
on it, so every change to the worker table happens in one place (uvicorn's and gunicorn's
pattern). What happens when a worker exits is in `exits`; what operators ask (signals,
the control socket, a reload of the configuration) in `operations`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asgi_supervise import drain, logs
from asgi_supervise.config.values import Values
from asgi_supervise.master import balance, control, policy, signals
from asgi_supervise.master.exits import Exits
from asgi_supervise.master.forking import Forking
from asgi_supervise.master.notify import Notifier
from asgi_supervise.master.operations import Operations
from asgi_supervise.master.phase import Phase
from asgi_supervise.master.policy import KILL_GRACE, Overdue
from asgi_supervise.master.rollout import Rollout
from asgi_supervise.master.sockets import cleanup, describe
from asgi_supervise.master.table import WorkerTable
from asgi_supervise.master.workers import State, Worker
from asgi_supervise.observe.observability import Observability
from asgi_supervise.protocol import Exit
from asgi_supervise.sizing import Plan

if TYPE_CHECKING:
    from asgi_supervise.config.values import Loaded
    from asgi_supervise.master.watcher import Watcher
    from asgi_supervise.observe.multiproc import MultiprocDir

log = logging.getLogger("asgi_supervise.master")

TICK = 0.25  # seconds between health checks when nothing else happens


class Arbiter(Exits, Operations, Forking):
    def __init__(
        self,
        settings: Values,
        sockets: list[socket.socket],
        plan: Plan,
        memory_limit: int | None = None,
        metrics_dir: MultiprocDir | None = None,
    ):
        self.settings = settings
        self.sockets = sockets
        self.table = WorkerTable(plan.workers)
        self.boot = policy.BootBudget(settings.boot_failure_limit)
        self.phase = Phase.RUNNING
        self.exit_code = Exit.OK
        self.started = time.monotonic()
        self.waiting_for_fix = False  # --reload: the app cannot start; retry on the next save
        self.booted_generation = -1  # newest code generation that had a worker become ready
        self.watcher: Watcher | None = None
        self.rollout = Rollout(self.table, self, settings, memory_limit)
        self.notify = Notifier()
        self.observe = Observability(settings, plan, metrics_dir)
        self.announced_ready = False
        self.drain_times = drain.of(settings)
        self._signals: deque[int] = deque()
        self._changes: deque[list[str]] = deque()  # saved files, from the watcher (--reload)
        self._wake = asyncio.Event()
        # The control socket: commands wait here, like signals, for the loop to run them.
        self.loaded: Loaded | None = None  # the settings' sources, for `config --running`
        self.reloader: Callable[[], Loaded] | None = None  # re-reads every layer (a reload)
        self.control: control.ControlServer | None = None
        self._commands: deque[tuple[str, dict[str, Any], asyncio.Future[Any]]] = deque()
        self.reload_waiters: list[asyncio.Future[Any]] = []
        self.last_reload: dict[str, Any] | None = None
        self.last_boot_error: str | None = None
        self.config_change: dict[str, list[str]] = {}  # the reload's config lines, for its result
        self.restarts: Counter[int] = Counter()  # per slot: workers that died unasked
        self.forks = None  # the fork servers (`forking`), unless workers start by exec
        self.first = None  # the first fork server, if `launch` started it (`start_first`)

    # --- the lifecycle --------------------------------------------------------------------

    async def run(self) -> int:
        self.install_signal_handlers()
        try:
            await self.observe.start(self)
        except OSError as exc:
            logs.say(str(exc))
            cleanup(self.sockets)
            return Exit.USAGE
        s = self.settings
        try:
            path = control.socket_path(s.control_socket, s.pid_file, os.getpid())
            self.control = control.ControlServer(self, path)
            await self.control.start()
        except OSError as exc:
            if s.control_socket is not None:  # asked for: a usage error, like a busy port
                logs.say(str(exc))
                await self.observe.stop()
                cleanup(self.sockets)
                return Exit.USAGE
            # The default place (a read-only root with no TMPDIR): serve without it.
            log.warning(
                "no control socket (status, reload, scale, stop): %s; set --control-socket "
                "to a writable path",
                exc,
                extra={"event": "no_control_socket"},
            )
            self.control = None
        try:
            return await self.serve()
        finally:
            if self.control is not None:
                await self.control.stop()

    async def serve(self) -> int:
        where = ", ".join(describe(s) for s in self.sockets)
        log.info("master %d serving %s with %d workers", os.getpid(), where, self.target)
        if self.settings.reload:
            from asgi_supervise.master.watcher import Watcher  # watchfiles only when watching

            self.watcher = Watcher(self.settings, self.queue_change)
            self.watcher.start()
        self.start_forking()
        while self.phase is Phase.RUNNING:
            self.supervise()
            await self.wait_for_event()
            if not self.first_workers_pending():  # signals, commands, saves wait for them
                self.handle_signals()
        await self.drain()
        return self.exit_code

    def supervise(self) -> None:
        """One pass: collect the dead, kill the hung, replace the due, fill the empty slots."""
        self.reap()
        self.check_timeouts()
        self.notify.watchdog(time.monotonic())
        if self.phase is Phase.RUNNING and not self.waiting_for_fix:
            if self.rollout.sample():
                self.observe.sampled(self.live())
                self.sample_fork_servers()
            self.ensure_fork_server()
            self.rollout.mark_recycling()
            self.rollout.step()
            self.fill_slots()
        if self.settings.balance_connections:
            self.balance()  # a worker left or drains: the paused ones may have to accept

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish, kill what outlives the deadline."""
        started = time.monotonic()
        self.notify.stopping()
        self.answer_reload_waiters(error="the master is stopping: the reload was abandoned")
        self.observe.draining()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.phase is Phase.DRAINING and self.settings.drain_delay > 0:
            log.info(
                "draining: not ready; serving %.1fs more while load balancers deregister",
                self.settings.drain_delay,
                extra={"event": "drain_delay"},
            )
            await self.serve_for(self.settings.drain_delay)
        self.retire_fork_servers()  # they hold the listener too
        cleanup(self.sockets)  # our copy of the listener: the kernel refuses once all are shut
        for worker in self.live():
            if self.phase is Phase.STOPPING:
                worker.stop("shutdown", KILL_GRACE, signal.SIGQUIT)
            else:
                self.stop_worker(worker, "shutdown", self.drain_times.abort_after)
        while self.live() or self.fork_servers_alive():
            await self.pump(TICK)
        outcome = {Exit.OK: "cleanly", Exit.BOOT_FAILURE: "(app failed to start)"}.get(
            self.exit_code, "uncleanly"
        )
        took = time.monotonic() - started
        await self.observe.stop()
        log.info(
            "master stopped %s in %.2fs",
            outcome,
            took,
            extra={"event": "stopped", "exit_code": self.exit_code},
        )

    async def serve_for(self, seconds: float) -> None:
        """Keep supervising (but not respawning) for the drain delay; a second signal cuts it."""
        deadline = time.monotonic() + seconds
        while self.phase is Phase.DRAINING and time.monotonic() < deadline:
            await self.pump(min(TICK, deadline - time.monotonic()))

    async def pump(self, timeout: float) -> None:
        """While stopping: collect exits, enforce deadlines, wait, take signals. No respawns."""
        self.reap()
        self.check_timeouts()
        await self.wait_for_event(timeout)
        self.handle_signals()

    @property
    def target(self) -> int:
        return self.table.target

    @property
    def running(self) -> bool:
        return self.phase is Phase.RUNNING

    def wake(self) -> None:
        self._wake.set()

    def unclean(self) -> None:
        """Requests were cut; a boot failure's own code still wins."""
        if self.exit_code == Exit.OK and self.phase is not Phase.RUNNING:
            self.exit_code = Exit.UNCLEAN

    # --- workers ------------------------------------------------------------------------

    def live(self) -> list[Worker]:
        return self.table.live()

    def ready_count(self) -> int:
        return self.table.ready_count()

    @property
    def app_boots(self) -> bool:
        """A worker of the current code became ready: the app is known to start."""
        return self.booted_generation >= self.rollout.generation

    def serving(self) -> int:
        return sum(w.state is State.READY and w.stop_reason is None for w in self.live())

    def fill_slots(self) -> None:
        live = [w for w in self.live() if w.stop_reason is None or w.hold_slot]
        occupied = {w.slot for w in live}
        empty = {s: h.not_before for s, h in self.table.slots.items() if s not in occupied}
        answering = sum(w.stop_reason is None for w in live)
        if not self.can_spawn():
            return
        for slot in policy.slots_to_fill(empty, time.monotonic(), answering, self.app_boots):
            self.start_worker(slot)

    def start_worker(self, slot: int) -> Worker | None:
        """Fork it from the current fork server, or exec it; None if the fork server failed
        (its exit is reaped and it is restarted)."""
        worker = self.new_worker(slot)
        if worker is None:
            return None
        self.observe.worker_started(worker)
        worker.request_limit, worker.lifetime_limit = self.rollout.limits_for_new_worker()
        self.table.add(worker)
        loop = asyncio.get_running_loop()
        loop.add_reader(worker.control.fileno(), self.on_worker_message, worker)
        log.info("%s booting", worker.tag(), extra=worker.extra("booting"))
        return worker

    def stop_worker(self, worker: Worker, reason: str, grace: float) -> None:
        if worker.stop_reason is None:
            log.info("%s stopping: %s", worker.tag(), reason, extra=worker.extra("stopping"))
        worker.stop(reason, grace)

    def on_worker_message(self, worker: Worker) -> None:
        changed, eof = worker.read_messages()
        if eof:
            asyncio.get_running_loop().remove_reader(worker.control.fileno())
        if worker.reports:
            self.observe.requests_reported(worker)
        if self.settings.balance_connections and worker.state is State.READY:
            self.balance()
        if changed and worker.state is State.READY and worker.ready_at is not None:
            self.boot.succeeded()
            self.booted_generation = max(self.booted_generation, worker.generation)
            took = worker.ready_at - worker.started
            log.info(
                "%s ready in %.2fs", worker.tag(), took, extra=worker.extra("ready", boot_s=took)
            )
            self.observe.worker_ready(worker, took)
            if not self.announced_ready and self.ready_count() >= self.target:
                self.announced_ready = True
                self.notify.ready(f"serving with {self.target} workers")
        if changed:
            self._wake.set()

    def balance(self) -> None:
        """Pause accepting in a worker holding clearly more than its share of connections;
        resume it near the average (`balance.paused`). Draining workers take no part."""
        serving = {
            w.pid: w for w in self.live() if w.state is State.READY and w.stop_reason is None
        }
        counts = {pid: w.connections for pid, w in serving.items()}
        now_paused = {pid for pid, w in serving.items() if w.paused}
        should = balance.paused(counts, now_paused)
        for pid, worker in serving.items():
            if (pid in should) != worker.paused and worker.tell(
                "pause" if pid in should else "resume"
            ):
                worker.paused = pid in should
                log.debug(
                    "%s %s accepting: %d connections of %d on %d workers",
                    worker.tag(), "stops" if worker.paused else "resumes", worker.connections,
                    sum(counts.values()), len(counts),
                )  # fmt: skip

    def check_timeouts(self) -> None:
        now = time.monotonic()
        s = self.settings
        for worker in self.live():
            verdict = policy.overdue(
                worker.state, now, worker.started, worker.last_beat, worker.kill_at,
                worker.failure is not None, s.ready_timeout, s.worker_timeout,
            )  # fmt: skip
            if verdict is not None:
                self.overdue(worker, verdict, now)

    def overdue(self, worker: Worker, verdict: Overdue, now: float) -> None:
        """Kill a worker past a deadline, saying which (SIGABRT: its stack if blocked)."""
        s = self.settings
        if verdict is Overdue.DRAIN:
            took = now - (worker.stopping_since or now)
            log.error(
                "%s still running %.1fs after it was told to stop (its own deadline, graceful"
                " timeout %gs + shutdown %gs, has passed): aborting; its stack follows if its"
                " event loop is blocked, SIGKILL in %gs",
                worker.tag(), took, s.graceful_timeout, s.shutdown_timeout, KILL_GRACE,
                extra=worker.extra("drain_timeout", draining_s=took),
            )  # fmt: skip
            self.unclean()
            worker.kill_at = None  # SIGABRT now; SIGKILL KILL_GRACE later, not at once
            worker.kill("did not exit after draining", signal.SIGABRT)
            return
        if verdict is Overdue.KILL:
            log.error(
                "%s still there %.1fs after SIGABRT/SIGQUIT: SIGKILL",
                worker.tag(), KILL_GRACE, extra=worker.extra("kill"),
            )  # fmt: skip
        if verdict is Overdue.BOOT:
            log.error(
                "%s not ready after %.1fs (ready-timeout): killing",
                worker.tag(), now - worker.started, extra=worker.extra("ready_timeout"),
            )  # fmt: skip
            worker.boot_error = f"not ready within {s.ready_timeout:g}s"
        elif verdict is Overdue.SILENT:
            silent = now - worker.last_beat
            log.error(
                "%s event loop silent for %.1fs (worker-timeout %gs): killing; "
                "its stack follows if the loop was blocked in Python",
                worker.tag(), silent, s.worker_timeout,
                extra=worker.extra("timeout", silent_s=silent),
            )  # fmt: skip
            worker.kill(f"event loop blocked {silent:.1f}s", signal.SIGABRT)
            return
        worker.kill(verdict.value)

    def reap(self) -> None:
        """Collect every exited child: our workers, and orphans re-parented to us as PID 1."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            server = self.forks.get(pid) if self.forks else None
            if server is not None:
                self.fork_server_exited(server, status)
                continue
            worker = self.table.get(pid) or self.claim_exited(pid)
            if worker is None:
                log.debug("reaped orphan process %d", pid)
                continue
            self.on_worker_message(worker)  # its last words (a boot error) come first
            asyncio.get_running_loop().remove_reader(worker.control.fileno())
            worker.control.close()
            worker.exited(status)
            self.table.remove(worker)
            self.observe.worker_exited(worker)
            self.worker_exited(worker)

    # --- signals --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Explicit handlers for everything: as PID 1 in a container there are no defaults."""
        loop = asyncio.get_running_loop()
        for sig in signals.HANDLED:
            loop.add_signal_handler(sig, self.queue_signal, sig)
        for sig in signals.held():  # arrived while the master started (`launch`)
            self.queue_signal(sig)

    def queue_signal(self, sig: int) -> None:
        self._signals.append(sig)
        self._wake.set()

    async def wait_for_event(self, timeout: float = TICK) -> None:
        """A timer, not `wait_for`, which spawns a task per wait: idle CPU is the master's cost."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await self._wake.wait()
        self._wake.clear()

    def queue_change(self, paths: list[str]) -> None:
        """Saved files (--reload): acted on in the loop, like a signal."""
        self._changes.append(paths)
        self._wake.set()

    def handle_signals(self) -> None:
        """Signals, then control commands, then saved files, in the order they came."""
        while self._signals:
            sig = self._signals.popleft()
            handler = getattr(self, f"handle_{signal.Signals(sig).name.lower()}", None)
            if handler is not None:
                handler()
        self.handle_commands()
        while self._changes:
            self.files_changed(self._changes.popleft())
