"""The master's handle on a fork server: start it, ask it for a worker, retire it.

A fork server (`asgi_supervise.worker.forkserver`) is started by exec like a worker, one
per code generation, and forks workers that the master adopts as its own children: the
master is a child subreaper (`become_subreaper`), so a worker's exit and status reach it
through `waitpid` at once, as an exec'd worker's do, and no worker depends on the fork
server staying up.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from asgi_supervise.config.settings import Settings
from asgi_supervise.master.policy import SlotHealth
from asgi_supervise.master.workers import exec_python, send_spec
from asgi_supervise.protocol import READ_BYTES, decode, encode

log = logging.getLogger("asgi_supervise.master")

PR_SET_CHILD_SUBREAPER = 36
FORK_TIMEOUT = 5.0  # seconds a ready fork server gets to answer a fork request


class ForkError(Exception):
    """The fork server could not start a worker (gone, or fork failed)."""


def become_subreaper() -> bool:
    """Orphans of our descendants (the workers, once their fork server's middle process
    exits) become our children: we wait for them and see their status."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


@dataclass(eq=False)
class Forked:
    """What the worker handle needs of a forked worker's process (a Popen's pid, returncode)."""

    pid: int
    returncode: int | None = None


@dataclass(eq=False)
class ForkServer:
    """One fork server as the master sees it."""

    process: subprocess.Popen[bytes]
    channel: socket.socket
    generation: int
    preload: bool
    state: str = "booting"  # booting, ready, retiring, exited
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    boot_error: str | None = None
    exit_status: str | None = None
    forks: int = 0  # workers it has started
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
        """Take what it said (ready, boot_error): (state changed, channel at EOF)."""
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
            try:
                message = decode(data)
            except ValueError:
                continue
            if message.get("t") == "ready" and self.state == "booting":
                self.state, self.ready_at = "ready", time.monotonic()
            elif message.get("t") == "boot_error":
                self.boot_error = str(message.get("error", "")).strip()

    def fork(self, slot: int) -> tuple[Forked, socket.socket]:
        """A new worker: its process and the master's end of its control channel.

        Blocks until the fork server answers (a fork: milliseconds). The worker's end of the
        channel travels with the request; the worker's pid comes back from the fork server's
        middle process, before the worker can be re-parented to us, so `reap` knows it.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.channel.setblocking(True)
            self.channel.settimeout(FORK_TIMEOUT)
            socket.send_fds(self.channel, [encode({"t": "fork", "slot": slot})], [theirs.fileno()])
            reply = decode(self.channel.recv(READ_BYTES) or b"{}")
        except (OSError, ValueError) as exc:
            ours.close()
            raise ForkError(f"{self.tag()} did not answer: {exc or 'timeout'}") from None
        finally:
            theirs.close()
            with contextlib.suppress(OSError):
                self.channel.setblocking(False)
        if reply.get("t") != "forked":
            ours.close()
            raise ForkError(f"{self.tag()} could not fork: {reply.get('error', reply)}")
        self.forks += 1
        return Forked(int(reply["pid"])), ours

    def retire(self) -> None:
        """Done with it: it exits on the closed channel; SIGTERM in case it is still booting."""
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
            "rss_bytes": self.rss,
            "pss_bytes": self.pss,
        }


def start(
    settings: Settings, sockets: list[socket.socket], generation: int, env: dict[str, str] | None
) -> ForkServer:
    """`python -m asgi_supervise.worker.forkserver`, with the listeners its workers inherit."""
    process, ours = exec_python("asgi_supervise.worker.forkserver", sockets, env)
    send_spec(ours, settings)
    return ForkServer(process, ours, generation, settings.preload)


@dataclass
class ForkServers:
    """The current generation's fork server, the next one while it boots, and retired ones
    until they are reaped. Restarts back off like a worker slot (`SlotHealth`)."""

    current: ForkServer | None = None
    next: ForkServer | None = None
    by_pid: dict[int, ForkServer] = field(default_factory=dict)
    health: SlotHealth = field(default_factory=SlotHealth)
    starts: int = 0

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
