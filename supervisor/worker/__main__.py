"""A worker process: one uvicorn server on the master's inherited socket.

Started by the master as ``python -m asgi_supervise.worker``. It knows only its control
channel (`protocol.Control`) and uvicorn (`server.WorkerServer`): it reports *ready* once
the ASGI lifespan startup is done, beats from its event loop so a blocked loop is noticed,
and drains keep-alive connections without racing clients. It imports nothing of the
master, of the settings model (pydantic) or of `observe`: it runs in every worker.
"""

from __future__ import annotations

# Only what dying with the master needs is imported up front: until prctl runs, a worker
# whose master died would finish importing uvicorn and the app first (seconds on a
# loaded machine). Everything else is imported in `run`, after it.
import argparse
import socket
from typing import TYPE_CHECKING, cast

from asgi_supervise.worker.boot import die_with_master

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings
    from asgi_supervise.protocol import Control


def run(control: Control, listeners: list[socket.socket]) -> None:
    from types import SimpleNamespace

    from asgi_supervise.worker.boot import serve

    spec = control.receive()
    die_with_master(spec["master_pid"])  # a no-op unless started without --master-pid
    # Validated by the master already: plain values keep pydantic (and ~20 MB) out of workers.
    serve(control, listeners, cast("Settings", SimpleNamespace(**spec["settings"])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="asgi-supervise worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--socket-fds", required=True)
    parser.add_argument("--master-pid", type=int)
    args = parser.parse_args(argv)
    if args.master_pid is not None:
        die_with_master(args.master_pid)
    # The master passed these inheritable. The app's own children (a subprocess, a shell
    # command) must not hold the listener or the channel: they would keep the port bound
    # and accepting after the master stopped.
    channel = socket.socket(fileno=args.control_fd)
    listeners = [socket.socket(fileno=int(fd)) for fd in args.socket_fds.split(",")]
    for sock in (channel, *listeners):
        sock.set_inheritable(False)
    from asgi_supervise.protocol import Control

    run(Control(channel), listeners)


if __name__ == "__main__":
    main()
