"""The master's handle on a fork server: start it, ask it for a worker, retire it.

A fork server (`asgi_supervise.worker.forkserver`) is started by exec like a worker, one
per code generation (the first forked before the master's own imports: `interpreter`), and
forks workers that the master adopts as its own children: the master is a child
subreaper (`become_subreaper`), so a worker's exit and status reach it through
`waitpid` at once, as an exec'd worker's do, and no worker depends on the fork
server staying up. With ``--preload`` each fork server also forks a `Standby` before it
imports the app: the next generation's fork server starts from it, with no interpreter
to start and no machinery to import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asgi_supervise.config.values import Values
from asgi_supervise.master.interpreter import (
    FORKSERVER_MODULE,
    EarlyForkServer,
    Forked,
    exec_python,
)
from asgi_supervise.master.policy import SlotHealth
from asgi_supervise.master.workers import send_spec
from asgi_supervise.prctl import PR_SET_CHILD_SUBREAPER, prctl
from asgi_supervise.protocol import READ_BYTES, decode, encode, readable

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("asgi_supervise.master")

FORK_TIMEOUT = 5.0  # seconds a ready fork server gets to answer a fork request
FIRST_WORKERS_WAIT = 0.5  # seconds the master's imports wait for its first workers' start


class ForkError(Exception):
    """The fork server could not start a worker (gone, or fork failed)."""


def become_subreaper() -> bool:
    """Orphans of our descendants (the workers, once their fork server's middle process
    exits) become our children: we wait for them and see their status."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


@dataclass(eq=False)
class Standby:
    """The next generation's fork server, forked by a `--preload` fork server before its
    app import; it waits for a spec on `channel` (`start` gives it one)."""

    channel: socket.socket
    pid: int | None = None  # its fork server's answer says

    def usable(self) -> bool:
        """Forked, and alive: it writes nothing before its spec, so a readable channel
        means it is gone (the end of the channel) and a dead one cannot be promoted."""
        return self.pid is not None and not readable(self.channel)

    def close(self) -> None:
        """Not needed: it exits on the closed channel (and is reaped as an orphan)."""
        self.channel.close()


def usable(standby: Standby | None) -> Standby | None:
    """`standby` if it can be promoted; one that cannot is closed."""
    if standby is not None and not standby.usable():
        standby.close()
        return None
    return standby


@dataclass(eq=False)
class ForkServer:
    """One fork server as the master sees it."""

    process: subprocess.Popen[bytes] | Forked  # Forked: promoted from a standby
    channel: socket.socket
    generation: int
    preload: bool
    standby: Standby | None = None  # the one it forks for the next generation (--preload)
    state: str = "booting"  # booting, ready, retiring, exited
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    boot_error: str | None = None
    exit_status: str | None = None
    from_standby: bool = False
    forks: int = 0  # workers it has started
    requested: dict[int, socket.socket] = field(default_factory=dict)  # slot -> our channel end
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)  # slot -> forked, unclaimed
    rss: int = 0
    pss: int = 0
    _ps: psutil.Process | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def tag(self) -> str:
        return f"fork server (pid {self.pid}, generation {self.generation})"

    def extra(self, event: str, **fields: Any) -> dict[str, Any]:
        return {
            "event": event,
            "fork_server_pid": self.pid,
            "generation": self.generation,
            **fields,
        }

    def read_messages(self) -> tuple[bool, bool]:
        """Take what it said (ready, boot_error, answers): (state changed, channel at EOF)."""
        before = self.state, self.boot_error
        while True:
            try:
                data = self.channel.recv(READ_BYTES)
            except BlockingIOError:
                return (self.state, self.boot_error) != before, False
            except OSError:
                data = b""
            if not data:
                return (self.state, self.boot_error) != before, True
            self._take(data)

    def _take(self, data: bytes) -> None:
        try:
            message = decode(data)
        except ValueError:
            return
        kind = message.get("t")
        if kind == "ready" and self.state == "booting":
            self.state, self.ready_at = "ready", time.monotonic()
        elif kind == "boot_error":
            self.boot_error = str(message.get("error", "")).strip()
        elif kind in ("forked", "fork_failed") and message.get("slot") in self.requested:
            self.answers[message["slot"]] = message
        elif kind == "standby" and self.standby is not None:
            self.standby.pid = int(message["pid"])

    def request(self, slot: int, settings: Values) -> None:
        """Ask for a worker in `slot` without waiting; `fork` takes the answer.

        Its spec goes on its channel at once, so it boots the moment it is forked:
        `start_first` asks for the first workers this way, before the master's loop runs.
        ForkError if the fork server is gone, or its channel (non-blocking) is full: the
        kernel queues only a few messages on a local socket.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(self.channel, [encode({"t": "fork", "slot": slot})], [theirs.fileno()])
        except OSError as exc:
            ours.close()
            raise ForkError(f"{self.tag()} takes no requests: {exc or 'timeout'}") from None
        finally:
            theirs.close()
        send_spec(ours, settings)
        self.requested[slot] = ours

    def await_requested(self, timeout: float) -> None:
        """Until every requested worker has said something (ready, or why it cannot start)
        or its channel closed, at most `timeout` seconds. The master's first workers boot
        while it waits here rather than importing the rest of itself: with fewer cores
        than processes starting, those imports would take a core from the workers."""
        poller = select.poll()
        for channel in self.requested.values():
            poller.register(channel, select.POLLIN)
        pending = len(self.requested)
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for fd, _event in poller.poll(left * 1000):
                poller.unregister(fd)
                pending -= 1

    def fork(self, slot: int, settings: Values) -> tuple[Forked, socket.socket]:
        """A worker in `slot`: its process and the master's end of its control channel.

        Blocks until the fork server answers (a fork: milliseconds), unless a `request`
        was answered already. The worker's end of the channel travels with the request;
        the worker's pid comes back from the fork server's middle process, before the
        worker can be re-parented to us, so `reap` knows it.
        """
        if slot not in self.requested:
            self.channel.settimeout(FORK_TIMEOUT)  # wait for room in the queue
            try:
                self.request(slot, settings)
            finally:
                self.channel.setblocking(False)
        ours = self.requested[slot]
        try:
            answer = self._answer(slot)
        except (OSError, ValueError) as exc:
            del self.requested[slot]
            ours.close()
            raise ForkError(f"{self.tag()} did not answer: {exc or 'timeout'}") from None
        del self.requested[slot], self.answers[slot]
        if answer.get("t") != "forked":
            ours.close()
            raise ForkError(f"{self.tag()} could not fork: {answer.get('error', answer)}")
        self.forks += 1
        return Forked(int(answer["pid"])), ours

    def forked_slot(self, pid: int) -> int | None:
        """The slot of `pid` if this fork server forked it on request and it is unclaimed."""
        for slot, answer in self.answers.items():
            if answer.get("t") == "forked" and answer.get("pid") == pid:
                return slot
        return None

    def _answer(self, slot: int) -> dict[str, Any]:
        """Read the channel until `slot`'s answer is there; what else comes is taken too."""
        self.channel.settimeout(FORK_TIMEOUT)
        try:
            while slot not in self.answers:
                data = self.channel.recv(READ_BYTES)
                if not data:
                    raise OSError("its channel closed")
                self._take(data)
        finally:
            self.channel.setblocking(False)
        return self.answers[slot]

    def drop_requests(self) -> None:
        """Workers requested and never claimed are not wanted: their channels close, and a
        worker whose channel closes drains and exits (one not forked yet never serves)."""
        for ours in self.requested.values():
            ours.close()
        self.requested.clear()
        self.answers.clear()

    def take_standby(self) -> Standby | None:
        """Its standby, if alive, for the next generation; it is no longer this one's."""
        standby, self.standby = self.standby, None
        return usable(standby)

    def drop_standby(self) -> None:
        if self.standby is not None:
            self.standby.close()
            self.standby = None

    def retire(self) -> None:
        """Done with it: it exits on the closed channel; SIGTERM in case it is still booting."""
        self.drop_requests()
        self.drop_standby()
        if self.state == "exited":
            return
        self.state = "retiring"
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def exited(self, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        self.process.returncode = code
        self.exit_status = (
            f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        )
        self.state = "exited"

    def sample(self) -> None:
        """Its memory: RSS, and PSS (what it really adds beside the workers sharing its pages)."""
        import psutil  # first needed a second after the start, not before the first workers

        try:
            self._ps = self._ps or psutil.Process(self.pid)
            info = self._ps.memory_full_info()
        except (psutil.Error, OSError):
            return
        self.rss, self.pss = info.rss, getattr(info, "pss", info.rss)

    def status(self, now: float) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "generation": self.generation,
            "state": self.state,
            "preload": self.preload,
            "age_s": round(now - self.started, 3),
            "forks": self.forks,
            "standby_pid": None if self.standby is None else self.standby.pid,
            "rss_bytes": self.rss,
            "pss_bytes": self.pss,
        }


def start(
    settings: Values,
    sockets: list[socket.socket],
    generation: int,
    env: dict[str, str] | None,
    early: EarlyForkServer | None = None,
    standby: Standby | None = None,
) -> ForkServer:
    """A fork server with the listeners its workers inherit: the `standby` a fork server
    forked, or the one started `early` (before the master's imports), or a new
    `python -m asgi_supervise.worker.forkserver`. With --preload it forks a standby."""
    process: subprocess.Popen[bytes] | Forked
    if standby is not None:  # `usable`: its pid is known
        process, ours, started = Forked(standby.pid or 0), standby.channel, time.monotonic()
    elif early is not None:
        process, ours, started = early.take()
    else:  # the exec gives it the listeners and the environment
        process, ours = exec_python(FORKSERVER_MODULE, sockets, env)
        started, env, sockets = time.monotonic(), None, []
    next_standby, theirs = None, None
    if settings.preload:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        next_standby = Standby(mine)
    with contextlib.suppress(OSError):  # it died at once: reaped and restarted like any other
        send_spec(ours, settings, env, sockets, theirs)
    if theirs is not None:
        theirs.close()
    return ForkServer(
        process, ours, generation, settings.preload, next_standby,
        started=started, from_standby=standby is not None,
    )  # fmt: skip


def start_first(
    settings: Values,
    sockets: list[socket.socket],
    env: dict[str, str] | None,
    early: EarlyForkServer,
    workers: int,
) -> ForkServer:
    """The fork server started `early`, given its spec, and asked at once for the first
    `workers` (as many as its channel queues): they boot while the master imports the rest
    of itself and starts its loop, which then claims them (`fork`) like any other."""
    if not become_subreaper():
        log.warning("not a child subreaper (not Linux?): forked workers are reaped by init")
    server = start(settings, sockets, 0, env, early)
    with contextlib.suppress(ForkError):  # full: the loop asks for the rest; gone: it says why
        for slot in range(1, workers + 1):
            server.request(slot, settings)
    return server


@dataclass
class ForkServers:
    """The current generation's fork server, the next one while it boots, and retired ones
    until they are reaped. Restarts back off like a worker slot (`SlotHealth`)."""

    current: ForkServer | None = None
    next: ForkServer | None = None
    by_pid: dict[int, ForkServer] = field(default_factory=dict)
    health: SlotHealth = field(default_factory=SlotHealth)
    starts: int = 0
    orphan: Standby | None = None  # the standby of a fork server that died: its restart

    def standby(self) -> Standby | None:
        """A standby for the fork server about to start: the current one's, or the one a
        dead fork server left; whichever is not taken is closed."""
        standby = self.current.take_standby() if self.current is not None else None
        orphan = self.take_orphan()
        if standby is None:
            return orphan
        if orphan is not None:
            orphan.close()
        return standby

    def keep_orphan(self, standby: Standby | None) -> None:
        """Keep a dead fork server's standby for its restart (None: close the one kept)."""
        if self.orphan is not None:
            self.orphan.close()
        self.orphan = standby

    def take_orphan(self) -> Standby | None:
        orphan, self.orphan = self.orphan, None
        return usable(orphan)

    def get(self, pid: int) -> ForkServer | None:
        return self.by_pid.get(pid)

    def add(self, server: ForkServer) -> None:
        self.by_pid[server.pid] = server
        self.next = server
        self.starts += 1

    def newest(self) -> ForkServer | None:
        return self.next or self.current

    def promote(self, server: ForkServer) -> ForkServer | None:
        """`server` is ready: it becomes the current one; the one it replaces is returned."""
        old = self.current if self.current is not server else None
        self.current, self.next = server, None
        return old

    def forget(self, server: ForkServer) -> None:
        self.by_pid.pop(server.pid, None)
        if self.current is server:
            self.current = None
        if self.next is server:
            self.next = None

    def alive(self) -> list[ForkServer]:
        return list(self.by_pid.values())
