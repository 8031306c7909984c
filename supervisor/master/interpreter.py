"""Processes the master starts before or instead of its own imports: exec'd workers and
fork servers, and the first fork server, forked before the master's imports.

Standard library only: `launch` imports this before anything heavy. The master's imports
(the settings model: pydantic) take about a tenth of a second, the fork server's
(uvicorn, uvloop, httptools) about as long. The first fork server is forked from `launch`
at its first line: it skips an interpreter's start, imports on the other core while the
master reads its settings, then waits on its channel for them and for the listeners
(`forkserver.start`). If the settings choose exec mode or the gunicorn engine, or turn
out wrong, it is stopped unused (`EarlyForkServer.discard`). Later fork servers, and
exec'd workers, are fresh interpreters: by then the master holds what they must not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from asgi_supervise.master import signals

FORKSERVER_MODULE = "asgi_supervise.worker.forkserver"
# systemd's socket activation variables: the master's alone (`sockets.from_systemd`).
SOCKET_ACTIVATION = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536


def exec_python(
    module: str, sockets: Sequence[socket.socket], env: dict[str, str] | None
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """`python -m module` in its own process group, holding the listeners and its end of
    a fresh channel; returns the process and the master's end. Its environment is ours
    with `env` added."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [s.fileno() for s in sockets]
    command = [
        sys.executable, "-m", module,
        # Not secret, and needed before its imports: it dies with the master.
        "--master-pid", str(os.getpid()),
        "--control-fd", str(theirs.fileno()),
        "--socket-fds", ",".join(map(str, fds)),
    ]  # fmt: skip
    environ = None if not env else {**os.environ, **env}
    try:
        process = subprocess.Popen(
            command,
            pass_fds=[*fds, theirs.fileno()],
            process_group=0,
            env=environ,
        )
    finally:
        theirs.close()
    return process, ours


class Forked:
    """A process forked rather than exec'd: what the master's handles use of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None


class EarlyForkServer:
    """The first fork server, forked before the settings are known; `take` hands it to
    the master's fork servers, `discard` stops it if nothing took it."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            self.channel.close()
            theirs.close()
            raise
        if pid == 0:
            self.channel.close()
            _serve_forked(theirs, master_pid)
        theirs.close()
        self.process = Forked(pid)
        self.taken = False

    def take(self) -> tuple[Forked, socket.socket, float]:
        self.taken = True
        return self.process, self.channel, self.started

    def discard(self) -> None:
        """Not needed (exec mode, the gunicorn engine, a usage error): it holds nothing
        yet, so SIGKILL, and reap it so no zombie is left."""
        if self.taken:
            return
        self.taken = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        os.waitpid(self.process.pid, 0)
        self.channel.close()


def _serve_forked(channel: socket.socket, master_pid: int) -> NoReturn:
    """The forked first fork server: what `python -m asgi_supervise.worker.forkserver`
    would be, less the interpreter's start. Never returns."""
    try:
        # What an exec'd one gets from Popen: only stdio and its channel. A descriptor the
        # master was started with (systemd's sockets, a pipe a script waits on) held here
        # and in every worker would outlive their drain and the master.
        keep = channel.fileno()  # below 3 if the master was started without stdio
        os.closerange(3, max(3, keep))
        os.closerange(max(3, keep + 1), MAX_FD)
        os.setpgid(0, 0)  # its own process group, as an exec'd one's: a ^C is the master's
        signals.reset()  # `launch` holds the master's signals: not ours
        for name in SOCKET_ACTIVATION:
            os.environ.pop(name, None)
        from asgi_supervise.worker import forkserver
    except BaseException:
        os._exit(1)  # no memory, no module: the master starts one by exec
    forkserver.adopted(channel, master_pid)
