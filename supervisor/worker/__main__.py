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
import ctypes
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings
    from asgi_supervise.protocol import Control

PR_SET_PDEATHSIG = 1


def _die_with_master(master_pid: int) -> None:
    """SIGKILL from the kernel when the master dies, so no worker outlives it."""
    if sys.platform == "linux":  # elsewhere only the parent check below protects us
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != master_pid:  # the master died before prctl took effect
        os._exit(1)


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the first frame of the user's code on: ours and importlib's are noise."""
    import importlib
    import traceback

    noise = (
        os.path.dirname(os.path.dirname(__file__)),
        os.path.dirname(importlib.__file__),
        "<frozen importlib",
    )
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(noise):
            break
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _boot_error(control: Control, exc: BaseException) -> None:
    from asgi_supervise.protocol import Exit

    control.send("boot_error", error=_user_traceback(exc))
    sys.exit(Exit.BOOT_FAILURE)


def run(control: Control, listeners: list[socket.socket]) -> None:
    import faulthandler
    import resource
    from types import SimpleNamespace

    from asgi_supervise import drain, logs
    from asgi_supervise.worker import apploader, forwarded, promfiles
    from asgi_supervise.worker.meter import RequestMetrics
    from asgi_supervise.worker.server import WorkerServer, uvicorn_config

    spec = control.receive()
    _die_with_master(spec["master_pid"])  # a no-op unless started without --master-pid
    faulthandler.enable()  # SIGABRT from the master's timeout shows where the loop was stuck
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ... without leaving a core file
    # Validated by the master already: plain values keep pydantic (and ~20 MB) out of workers.
    settings = cast("Settings", SimpleNamespace(**spec["settings"]))
    s = settings
    logs.configure(s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config)

    promfiles.install()  # before the app imports prometheus_client: no SIGBUS on a full disk
    try:
        app = apploader.load(settings.app or "", settings.app_dir, settings.factory)
    except Exception as exc:
        _boot_error(control, exc)
    config = uvicorn_config(app, settings)
    try:
        config.load()
    except Exception as exc:
        _boot_error(control, exc)
    if settings.proxy_headers:  # outermost, where uvicorn puts its own
        config.loaded_app = forwarded.proxy_headers(config.loaded_app, settings.forwarded_allow_ips)
    idle_grace = min(settings.timeout_keep_alive, settings.graceful_timeout)
    server = WorkerServer(
        config, control, idle_grace, drain.of(settings), settings.timeout_request_header
    )
    server.report_connections = settings.balance_connections
    if settings.metrics and settings.request_metrics:
        server.request_metrics = RequestMetrics(config.loaded_app)
        config.loaded_app = server.request_metrics.meter  # served directly: no extra call
    server.run(sockets=listeners)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="asgi-supervise worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--socket-fds", required=True)
    parser.add_argument("--master-pid", type=int)
    args = parser.parse_args(argv)
    if args.master_pid is not None:
        _die_with_master(args.master_pid)
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
