"""The master's handle on one worker process: spawn it, talk to it, signal it."""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asgi_supervise.config.values import Values
from asgi_supervise.master.interpreter import exec_python
from asgi_supervise.master.policy import KILL_GRACE
from asgi_supervise.protocol import READ_BYTES, decode, encode

if TYPE_CHECKING:
    import psutil

    from asgi_supervise.master.interpreter import Forked

log = logging.getLogger("asgi_supervise.master")


class State(enum.StrEnum):
    BOOTING = "booting"  # spawned, app importing or lifespan starting
    READY = "ready"  # lifespan done, accepting on the shared socket
    DRAINING = "draining"  # told to stop: finishing in-flight requests
    EXITED = "exited"


_STOP_REASONS = {"max-requests": "requests", "scale-down": "scale"}


class Worker:
    """One worker process as the master sees it. The master's table of these is the truth."""

    def __init__(
        self,
        slot: int,
        process: subprocess.Popen[bytes] | Forked,
        control: socket.socket,
        generation: int = 0,
    ):
        self.slot = slot
        self.generation = generation  # bumped by SIGHUP: older generations get replaced
        self.process = process
        self.control = control
        self.state = State.BOOTING
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self.last_beat = self.started
        self.requests = 0
        self.connections = 0
        self.header_timeouts = 0  # connections it closed for --timeout-request-header
        self.stop_reason: str | None = None  # why the master asked it to go
        self.failure: str | None = None  # why the master killed it (timeouts)
        self.boot_error: str | None = None  # what the worker said when it failed to start
        self.meter: str | None = None  # its request meter: "Meter" (compiled), "PythonMeter"
        self.kill_at: float | None = None  # SIGKILL deadline once stopping
        self.stopping_since: float | None = None
        self.exit_status: str | None = None
        self.exit_signal: str | None = None  # the signal that ended it ("SIGKILL"), if one did
        # Replacement: a new worker `replaces` an old one, which is `replaced_by` it.
        self.replaces: int | None = None
        self.replaced_by: int | None = None
        self.hold_slot = False  # draining first (no memory for two): keep the slot until gone
        # Recycling inputs: limits drawn at spawn, samples taken by the master.
        self.request_limit: int | None = None
        self.lifetime_limit: float | None = None
        self.recycle: str | None = None  # max-requests, memory, lifetime
        self.memory_strikes = 0
        self.rss = 0
        self.pss = 0  # forked workers: what it holds, its pages shared with others divided
        self.cpu_percent = 0.0
        self.reports: list[dict[str, Any]] = []  # request metrics, until observe takes them
        self.paused = False  # told to stop accepting: it holds more than its share
        self.drained: dict[str, Any] | None = None  # how its drain ended, as it reported
        self._ps: psutil.Process | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.state is not State.EXITED

    @property
    def exit_reason(self) -> str:
        """Why it is gone, in the vocabulary of the restart metrics."""
        if self.stop_reason is not None:
            return _STOP_REASONS.get(self.stop_reason, self.stop_reason)
        if self.ready_at is None:
            return "boot-failure"
        if self.failure is not None:
            return "timeout"
        return "crash"

    def uptime(self, now: float) -> float:
        return now - (self.ready_at or self.started)

    def tag(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"

    def extra(self, event: str, **fields: Any) -> dict[str, Any]:
        return {"event": event, "slot": self.slot, "worker_pid": self.pid, **fields}

    def send_signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def tell(self, kind: str) -> bool:
        """A message to the worker (pause, resume); False if it could not be sent now."""
        if not self.alive:
            return False
        try:
            self.control.send(encode({"t": kind}))
        except OSError:  # full (it will be told again on its next beat) or gone
            return False
        return True

    def sample(self, max_rss: int | None, pss: bool = False) -> None:
        """RSS and CPU via psutil; count consecutive samples over the memory limit. `pss`
        for forked workers, whose RSS counts the pages they share with the fork server."""
        import psutil  # first needed a second after the start, not before the first workers

        try:
            self._ps = self._ps or psutil.Process(self.pid)
            with self._ps.oneshot():
                self.rss = self._ps.memory_info().rss
                self.cpu_percent = self._ps.cpu_percent()
                if pss:
                    self.pss = getattr(self._ps.memory_full_info(), "pss", self.rss)
        except psutil.Error:
            return
        over = max_rss is not None and self.rss > max_rss
        self.memory_strikes = self.memory_strikes + 1 if over else 0

    def stop(self, reason: str, grace: float, sig: int = signal.SIGTERM) -> None:
        """Ask for a graceful drain; the master kills it if it is not gone by `grace`."""
        if self.state is State.EXITED or self.stop_reason:
            return
        self.stop_reason = reason
        self.state = State.DRAINING
        self.stopping_since = time.monotonic()
        self.signal_with_deadline(sig, grace)

    def hurry(self, sig: int = signal.SIGQUIT) -> None:
        """Stop now, draining or not: SIGKILL follows if it is still here after KILL_GRACE."""
        self.signal_with_deadline(sig, KILL_GRACE)

    def kill(self, failure: str, sig: int = signal.SIGKILL) -> None:
        """Kill for a failure (timeouts). SIGABRT first shows the stack; SIGKILL follows."""
        self.failure = self.failure or failure
        if sig == signal.SIGKILL:
            self.send_signal(sig)
            self.kill_at = None  # nothing follows SIGKILL
        else:
            self.signal_with_deadline(sig, KILL_GRACE)

    def signal_with_deadline(self, sig: int, grace: float) -> None:
        """The one escalation: send `sig` now, SIGKILL at the deadline (never later than
        one already set)."""
        self.send_signal(sig)
        deadline = time.monotonic() + grace
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)

    def exited(self, status: int) -> None:
        self.state = State.EXITED
        code = os.waitstatus_to_exitcode(status)
        self.process.returncode = code  # we reaped it; keep Popen from trying again
        if code < 0:
            try:
                self.exit_signal = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name
                self.exit_signal = f"signal {-code}"
            self.exit_status = f"killed by {self.exit_signal}"
        else:
            self.exit_status = f"exited with code {code}"

    def read_messages(self) -> tuple[bool, bool]:
        """Take every message waiting on the channel: (state changed, channel at EOF)."""
        before = self.state, self.boot_error
        eof = False
        while True:
            try:
                data = self.control.recv(READ_BYTES)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            try:
                self.on_message(decode(data))
            except ValueError:
                log.warning("%s sent an unreadable message", self.tag())
        return (self.state, self.boot_error) != before, eof

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "beat":
            self.last_beat = time.monotonic()
            self.requests = int(message.get("requests", 0))
            self.connections = int(message.get("connections", 0))
            self.header_timeouts = int(message.get("header_timeouts", 0))
        elif kind == "ready" and self.state is State.BOOTING:
            self.state = State.READY
            self.meter = message.get("meter")
            self.ready_at = self.last_beat = time.monotonic()
        elif kind == "metrics":
            self.reports.append(message)
        elif kind == "drained":
            self.drained = message
        elif kind == "boot_error":
            self.boot_error = str(message.get("error", "")).strip()


def spawn(
    slot: int,
    settings: Values,
    sockets: list[socket.socket],
    generation: int = 0,
    env: dict[str, str] | None = None,
) -> Worker:
    """Start `python -m asgi_supervise.worker` with the listening sockets and a channel.

    Exec (not fork) from the master: it may hold threads and an event loop. Forked
    workers come from a fork server instead (`forkserver`).
    """
    process, ours = exec_python("asgi_supervise.worker", sockets, env)
    send_spec(ours, settings)
    return Worker(slot, process, ours, generation)


def send_spec(
    control: socket.socket,
    settings: Values,
    env: dict[str, str] | None = None,
    sockets: Sequence[socket.socket] = (),
    standby: socket.socket | None = None,
) -> None:
    """The settings, over the channel: never argv or environ, they may hold secrets.

    A fork server started early (`interpreter.EarlyForkServer`) or a standby also gets
    here what an exec gives the others: the environment the master adds, and the
    listeners; a fork server, the channel of the standby it is to fork."""
    spec: dict[str, Any] = {"master_pid": os.getpid(), "settings": settings.model_dump(mode="json")}
    if env:
        spec["env"] = env
    fds = [s.fileno() for s in sockets]
    if standby is not None:
        spec["standby"] = True
        fds.append(standby.fileno())  # last: the fork server takes it off the end
    if fds:
        socket.send_fds(control, [encode(spec)], fds)
    else:
        control.sendall(encode(spec))
    control.setblocking(False)
