"""The master: keeps N healthy workers on the shared socket, then drains them.

Signal handlers only queue the signal; the loop in `run` acts on it, so every change to
the worker table happens in one place (uvicorn's and gunicorn's pattern).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asgi_supervise import drain, logs, sizing
from asgi_supervise.config.settings import Settings
from asgi_supervise.master import balance, control, liveconfig, policy
from asgi_supervise.master.notify import Notifier
from asgi_supervise.master.policy import KILL_GRACE, Overdue
from asgi_supervise.master.rollout import Rollout
from asgi_supervise.master.sockets import cleanup, describe
from asgi_supervise.master.table import WorkerTable
from asgi_supervise.master.workers import State, Worker, spawn
from asgi_supervise.observe.observability import Observability
from asgi_supervise.protocol import Exit
from asgi_supervise.sizing import Plan, host

if TYPE_CHECKING:
    from asgi_supervise.config.sources import Loaded
    from asgi_supervise.master.watcher import Watcher

log = logging.getLogger("asgi_supervise.master")

TICK = 0.25  # seconds between health checks when nothing else happens

HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD,
)  # fmt: skip


class Phase(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"  # SIGTERM: readiness off, keep serving for the drain delay, then stop
    STOPPING = "stopping"  # stop now: SIGQUIT or a second SIGTERM/SIGINT


class Arbiter:
    def __init__(
        self,
        settings: Settings,
        sockets: list[socket.socket],
        plan: Plan,
        memory_limit: int | None = None,
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
        self.observe = Observability(settings, plan)
        self.announced_ready = False
        self.drain_times = drain.of(settings)
        self._signals: deque[int] = deque()
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

            self.watcher = Watcher(self.settings, self.files_changed)
            self.watcher.start()
        while self.phase is Phase.RUNNING:
            self.supervise()
            await self.wait_for_event()
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
        cleanup(self.sockets)  # our copy of the listener: the kernel refuses once all are shut
        for worker in self.live():
            if self.phase is Phase.STOPPING:
                worker.stop("shutdown", KILL_GRACE, signal.SIGQUIT)
            else:
                self.stop_worker(worker, "shutdown", self.drain_times.abort_after)
        while self.live():
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
        for slot in policy.slots_to_fill(empty, time.monotonic(), answering, self.app_boots):
            self.start_worker(slot)

    def start_worker(self, slot: int) -> Worker:
        s = self.settings
        worker = spawn(
            slot, s, self.sockets, self.rollout.generation, self.observe.worker_environ()
        )
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
            worker = self.table.get(pid)
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

    def worker_exited(self, worker: Worker) -> None:
        now = time.monotonic()
        extra = worker.extra("exited", status=worker.exit_status, reason=worker.stop_reason)
        if worker.stop_reason is None and self.phase is not Phase.RUNNING:
            log.info("%s %s while the master stops", worker.tag(), worker.exit_status, extra=extra)
            return
        if worker.stop_reason is not None:
            took = now - (worker.stopping_since or now)
            drained = worker.drained or {}
            if worker.process.returncode == Exit.UNCLEAN:
                log.warning(
                    "%s %s after draining %.2fs (%s): %d request(s) cut at the graceful"
                    " timeout, lifespan shutdown: %s",
                    worker.tag(), worker.exit_status, took, worker.stop_reason,
                    drained.get("cut", 0), drained.get("lifespan", "unknown"),
                    extra={**extra, **drained},
                )  # fmt: skip
                self.unclean()
            else:
                log.info(
                    "%s %s after draining %.2fs (%s)%s",
                    worker.tag(), worker.exit_status, took, worker.stop_reason,
                    f": {drained['streams_ended']} stream(s) ended"
                    if drained.get("streams_ended") else "",
                    extra=extra,
                )  # fmt: skip
            new = self.table.get(worker.replaced_by)
            if new is not None:
                log.info(
                    "worker %d replaced (%s) in %.2fs: pid %d -> %d",
                    worker.slot, worker.stop_reason, now - new.started, worker.pid, new.pid,
                    extra=worker.extra("replaced", reason=worker.stop_reason, new_pid=new.pid),
                )  # fmt: skip
            return
        if worker.ready_at is None:
            killed_by_master = worker.failure is not None
            kind = policy.boot_exit(worker.exit_signal, worker.boot_error, killed_by_master)
            if kind is policy.BootExit.KILLED:
                self.killed_while_booting(worker)
            elif worker.replaces is not None:
                self.rollout.failed(worker)
            else:
                self.boot_failed(worker)
            return
        self.restarts[worker.slot] += 1
        delay = self.crashed(worker, worker.uptime(now))
        cause = worker.failure or worker.exit_status
        if worker.exit_status == "killed by SIGKILL" and worker.failure is None:
            cause += " (out of memory?)"
        log.warning(
            "%s died: %s; respawning %s",
            worker.tag(),
            cause,
            f"in {delay:.1f}s" if delay else "now",
            extra={**extra, "cause": cause, "respawn_delay_s": delay},
        )

    def crashed(self, worker: Worker, uptime: float) -> float:
        """The slot's respawn delay (`policy.SlotHealth.crashed`): none if it served, and
        none if it was the last one serving while the app is known to boot."""
        alone = self.serving() == 0 and self.app_boots
        cap = self.settings.restart_backoff_max
        health = self.table.slots.get(worker.slot)
        if health is None:  # its slot went with SIGTTOU
            return 0.0
        return health.crashed(time.monotonic(), uptime, cap, requests=worker.requests, alone=alone)

    def killed_while_booting(self, worker: Worker) -> None:
        """A signal from outside (OOM killer, an operator) says nothing about the app: the
        slot is refilled, with crash backoff if it keeps happening, and the boot-failure
        count stands. A replacement's old worker keeps serving and gets a new one."""
        old = self.table.get(worker.replaces)
        if old is not None and old.replaced_by == worker.pid:
            old.replaced_by = None
        delay = self.crashed(worker, 0.0)
        log.warning(
            "%s %s while booting (not counted as a failure to start); %s %s",
            worker.tag(),
            worker.exit_status,
            "replacing it" if old is None else f"starting another replacement for pid {old.pid}",
            f"in {delay:.1f}s" if delay else "now",
            extra=worker.extra("killed_booting", status=worker.exit_status, respawn_delay_s=delay),
        )

    def report_boot_error(self, worker: Worker, attempt: str) -> str:
        """Log why a worker failed to start: in full the first time, one line when repeated."""
        error = worker.boot_error or worker.failure or worker.exit_status or "unknown"
        headline = error.strip().splitlines()[-1] if error.strip() else error
        extra = worker.extra("boot_failed", error=headline, attempt=attempt)
        if error == self.boot.last_error:
            log.error("%s failed to start (%s): same error", worker.tag(), attempt, extra=extra)
        else:
            log.error("%s failed to start (%s):\n%s", worker.tag(), attempt, error, extra=extra)
        self.boot.last_error = error
        self.last_boot_error = error
        return headline

    def boot_failed(self, worker: Worker) -> None:
        attempt = f"{self.boot.failures + 1}/{self.boot.limit}"
        headline = self.report_boot_error(worker, attempt)
        fatal = self.boot.failed(worker.boot_error)
        if fatal and self.settings.reload:
            log.error("the app cannot start: waiting for a file change to try again")
            self.waiting_for_fix = True
            return
        if fatal:
            log.critical(
                "giving up: %d workers in a row failed to start: %s",
                self.boot.failures,
                headline,
                extra={"event": "boot_failure", "error": headline},
            )
            self.exit_code = Exit.BOOT_FAILURE
            self.phase = Phase.STOPPING
            return
        delay = self.crashed(worker, 0.0)
        if delay:
            log.info("%s slot respawns in %.1fs", worker.tag(), delay)

    # --- signals --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Explicit handlers for everything: as PID 1 in a container there are no defaults."""
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self.queue_signal, sig)

    def queue_signal(self, sig: int) -> None:
        self._signals.append(sig)
        self._wake.set()

    async def wait_for_event(self, timeout: float = TICK) -> None:
        """A timer, not `wait_for`, which spawns a task per wait: idle CPU is the master's cost."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await self._wake.wait()
        self._wake.clear()

    def handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.popleft()
            handler = getattr(self, f"handle_{signal.Signals(sig).name.lower()}", None)
            if handler is not None:
                handler()
        self.handle_commands()

    # --- the control socket (`asgi-supervise status | reload | scale | stop`) -------------

    def queue_command(self, command: str, request: dict[str, Any], future: asyncio.Future) -> None:
        self._commands.append((command, request, future))
        self._wake.set()

    def handle_commands(self) -> None:
        while self._commands:
            command, request, future = self._commands.popleft()
            if future.done():  # the client went away
                continue
            try:
                result = getattr(self, f"command_{command}")(request, future)
            except control.ControlError as exc:
                future.set_exception(exc)
                continue
            if result is not None:
                future.set_result(result)

    def command_status(self, request: dict[str, Any], future: asyncio.Future) -> dict[str, Any]:
        status = self.observe.status(self)
        status["master"].update(
            pid=os.getpid(),
            control_socket=self.control.path if self.control else None,
            last_reload=self.last_reload,
        )
        for worker in status["workers"]:
            worker["restarts"] = self.restarts[worker["slot"]]
        status["plan_text"] = self.observe.plan.render()
        return status

    def command_reload(self, request: dict[str, Any], future: asyncio.Future) -> None:
        """Answered when the rollout ends (`reload_finished`): the client waits for it."""
        if not self.running:
            raise control.ControlError(f"the master is {self.phase.value}: no reload")
        if self.waiting_for_fix:
            raise control.ControlError("the app cannot start: waiting for a file change")
        error = self.reconfigure("control socket: reload")
        if error is not None:
            raise control.ControlError(
                f"the new config is invalid, nothing was reloaded (the running config stays): "
                f"{error}"
            )
        self.reload_waiters.append(future)
        self.reload("control socket: reload")

    def command_scale(self, request: dict[str, Any], future: asyncio.Future) -> dict[str, Any]:
        if not self.running:
            raise control.ControlError(f"the master is {self.phase.value}: no scaling")
        given = str(request.get("workers", "")).strip()
        try:
            number = int(given)
        except ValueError:
            raise control.ControlError(f"scale {given!r}: expected N, +N or -N") from None
        target = self.target + number if given[:1] in "+-" else number
        if target < 1:
            raise control.ControlError(
                f"scale {given}: {target} workers refused: at least 1 (use stop to stop)"
            )
        warnings = self.scale_to(target, "control socket")
        return {"workers": self.target, "warnings": warnings}

    def command_stop(self, request: dict[str, Any], future: asyncio.Future) -> dict[str, Any]:
        if request.get("now"):
            self.handle_sigquit()
        elif self.phase is Phase.RUNNING:
            log.info("control socket: draining", extra={"event": "drain"})
            self.phase = Phase.DRAINING
        return {"pid": os.getpid(), "phase": self.phase.value}

    def command_config(self, request: dict[str, Any], future: asyncio.Future) -> dict[str, Any]:
        from asgi_supervise.config.settings import FIELDS, redact

        if self.loaded is None:
            raise control.ControlError("the master kept no record of its settings' sources")
        values = self.loaded.settings.model_dump(mode="json")
        rows = {
            name: {"value": redact(name, values[name]), "source": self.loaded.origin(name)}
            for name in FIELDS
        }
        return {"profile": self.loaded.profile, "settings": rows}

    def answer_reload_waiters(self, error: str | None = None) -> None:
        waiters, self.reload_waiters = self.reload_waiters, []
        for future in waiters:
            if future.done():
                continue
            if error is not None:
                future.set_exception(control.ControlError(error))
            else:
                future.set_result(self.last_reload)

    def over_plan(self, workers: int) -> list[str]:
        """Each sizing budget `workers` exceeds, with its numbers (`plan` explains them)."""
        if workers <= self.observe.plan.workers:
            return []
        settings = self.settings.model_copy(update={"workers": workers})
        return sizing.over_budgets(settings, host.read_host(), workers)

    def scale_to(self, target: int, why: str) -> list[str]:
        """Add or remove slots (removal drains the highest ones); warn above the plan."""
        while self.target < target:
            self.table.add_slot()
        while self.target > max(1, target):
            slot = self.table.remove_slot()
            self.observe.slot_removed(slot)
            for worker in self.live():
                if worker.slot == slot:
                    self.stop_worker(worker, "scale-down", self.drain_times.abort_after)
        log.info(
            "%s: %d workers", why, self.target, extra={"event": "scale", "workers": self.target}
        )
        warnings = self.over_plan(self.target)
        for warning in warnings:
            log.warning(
                "%d workers is above the sizing plan (%d): %s",
                self.target, self.observe.plan.workers, warning,
                extra={"event": "sizing_warning"},
            )  # fmt: skip
        self.wake()
        return warnings

    def handle_sigchld(self) -> None:
        self.reap()

    def handle_sigterm(self) -> None:
        if self.phase is Phase.RUNNING:
            log.info("SIGTERM/SIGINT: draining (a second one stops now)", extra={"event": "drain"})
            self.phase = Phase.DRAINING
        else:
            self.handle_sigquit()

    handle_sigint = handle_sigterm

    def handle_sigquit(self) -> None:
        if self.phase is Phase.STOPPING:
            return
        log.warning("stopping now: in-flight requests are cut", extra={"event": "stop_now"})
        self.phase = Phase.STOPPING
        self.unclean()
        for worker in self.live():
            worker.hurry(signal.SIGQUIT)

    def handle_sighup(self) -> None:
        if self.running and self.reconfigure("SIGHUP") is None:
            self.reload("SIGHUP")

    def reconfigure(self, why: str) -> str | None:
        """Re-read the config, validate it, apply what can change without a restart and
        name what cannot. An invalid config keeps the running one: its one-line error is
        returned (and logged), and the caller reloads nothing."""
        if self.reloader is None or self.loaded is None:
            return None
        from asgi_supervise.config.sources import ConfigError
        from asgi_supervise.worker import apploader

        try:
            new = self.reloader()
            if (
                new.settings.app != self.settings.app
                or new.settings.app_dir != self.settings.app_dir
            ):
                try:
                    apploader.check(new.settings.app or "", new.settings.app_dir)
                except apploader.AppStringError as exc:
                    raise ConfigError(f"{new.describe('app')}: {exc.detail}") from None
        except ConfigError as exc:
            error = str(exc)
            log.error(
                "%s: the new config is invalid, nothing reloaded; the running config stays: %s",
                why, error, extra={"event": "config_invalid", "error": error},
            )  # fmt: skip
            self.last_reload = {
                "outcome": "aborted", "duration_s": 0.0, "error": error,
                "finished_at": time.time(), "generation": self.rollout.generation,
            }  # fmt: skip
            return error
        change = liveconfig.reconcile(self.loaded, new)
        if change.kept:
            log.warning(
                "%s: not applied without a restart (running values kept): %s",
                why, "; ".join(change.kept), extra={"event": "config_kept"},
            )  # fmt: skip
        self.loaded = change.loaded
        self.config_change = {"config_applied": change.applied, "config_kept": change.kept}
        self.apply_settings(change)
        if change.applied:
            log.info(
                "%s: config applied: %s", why, "; ".join(change.applied),
                extra={"event": "config_applied"},
            )  # fmt: skip
        return None

    def apply_settings(self, change: liveconfig.Change) -> None:
        """New settings for the master's loop; the replaced workers get them at spawn."""
        s = self.settings = change.settings
        self.rollout.settings = self.observe.settings = s
        self.rollout.db_share = sizing.db_share(s)
        self.drain_times = drain.of(s)
        self.boot.limit = s.boot_failure_limit
        if change.changed(*liveconfig.LOGGING):
            logs.configure(
                s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config
            )
        plan = sizing.plan(s, host.read_host())
        resize = plan.workers != self.observe.plan.workers
        self.observe.plan = plan
        self.observe.metrics.set_plan(plan.to_dict())
        if resize:
            self.scale_to(plan.workers, "config")

    def reload(self, why: str) -> None:
        """Replace every worker, new code first (SIGHUP, or a file change with --reload)."""
        if not self.running:
            return
        self.rollout.start(why)
        self.notify.reloading()
        self.wake()

    def reload_finished(self, seconds: float, outcome: str) -> None:
        self.observe.reload_finished(seconds, outcome)
        error = self.last_boot_error if outcome == "aborted" else None
        self.last_reload = {
            "outcome": outcome,
            "duration_s": round(seconds, 3),
            "error": error,
            "finished_at": time.time(),
            "generation": self.rollout.generation,
            **self.config_change,
        }
        self.config_change = {}
        self.answer_reload_waiters()
        self.notify.ready(f"serving with {self.target} workers ({outcome})")

    def files_changed(self, paths: list[str]) -> None:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        if self.waiting_for_fix:
            log.info("%s changed: trying to start again", shown)
            self.waiting_for_fix = False
            self.boot.succeeded()
            return
        self.reload(f"{shown} changed")

    def handle_sigusr1(self) -> None:
        logs.reopen()
        for worker in self.live():
            worker.send_signal(signal.SIGUSR1)
        log.info("SIGUSR1: log files reopened", extra={"event": "reopen_logs"})

    def handle_sigttin(self) -> None:
        self.scale_to(self.target + 1, "SIGTTIN")

    def handle_sigttou(self) -> None:
        if self.target <= 1:
            log.info("SIGTTOU ignored: already at 1 worker")
            return
        self.scale_to(self.target - 1, "SIGTTOU")
