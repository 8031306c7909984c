"""Fresh interpreters the master starts: exec'd workers, fork servers, and the first fork
server, started before the master's own imports.

Standard library only: `launch` imports this before anything heavy. The master's imports
(the settings model: pydantic) take about a quarter of a second, the fork server's
(uvicorn, uvloop, httptools) about as long. Started first, the fork server imports on
the other core while the master reads its settings, then waits on its channel for them
and for the listeners (`forkserver.start`). If the settings choose exec mode or the
gunicorn engine, or turn out wrong, it is stopped unused (`EarlyForkServer.discard`).
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

FORKSERVER_MODULE = "asgi_supervise.worker.forkserver"
# systemd's socket activation variables: the master's alone (`sockets.from_systemd`).
SOCKET_ACTIVATION = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def exec_python(
    module: str,
    sockets: Sequence[socket.socket],
    env: dict[str, str] | None,
    without: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """`python -m module` in its own process group, holding the listeners (if any: a
    fork server started early gets them with its spec) and its end of a fresh channel;
    returns the process and the master's end. Its environment is ours with `env` added
    and the variables named in `without` left out."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [s.fileno() for s in sockets]
    command = [
        sys.executable, "-m", module,
        # Not secret, and needed before its imports: it dies with the master.
        "--master-pid", str(os.getpid()),
        "--control-fd", str(theirs.fileno()),
    ]  # fmt: skip
    if fds:
        command += ["--socket-fds", ",".join(map(str, fds))]
    environ = None
    if env or without:
        environ = {k: v for k, v in os.environ.items() if k not in without} | (env or {})
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


class EarlyForkServer:
    """A fork server started before the settings are known; `take` hands it to the
    master's fork servers, `discard` stops it if nothing took it."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        # Started before the master takes systemd's variables out of its environment.
        self.process, self.channel = exec_python(
            FORKSERVER_MODULE, (), None, without=SOCKET_ACTIVATION
        )
        self.taken = False

    def take(self) -> tuple[subprocess.Popen[bytes], socket.socket, float]:
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
        self.process.wait()
        self.channel.close()
