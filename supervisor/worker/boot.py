"""Booting a worker's uvicorn server, whoever forked or started the process.

The native worker (`python -m asgi_supervise.worker`) and gunicorn's worker class
(`asgi_supervise.gunicorn.worker`) both end here, so the two engines serve with the same
code: the same app loading and error report, proxy headers, request meter, drain.
Imports nothing but the standard library up front: `die_with_master` runs before the app
and uvicorn are imported.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asgi_supervise.prctl import PR_SET_PDEATHSIG, prctl

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings
    from asgi_supervise.protocol import Control
    from asgi_supervise.worker.server import WorkerServer


def die_with_master(master_pid: int) -> None:
    """SIGKILL from the kernel when the master dies, so no worker outlives it."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # off Linux only the check below protects us
    if os.getppid() != master_pid:  # the master died before prctl took effect
        os._exit(1)


def user_traceback(exc: BaseException) -> str:
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


def boot_error(control: Control, exc: BaseException) -> None:
    from asgi_supervise.protocol import Exit

    control.send("boot_error", error=user_traceback(exc))
    sys.exit(Exit.BOOT_FAILURE)


def serve(
    control: Control,
    listeners: list[socket.socket],
    settings: Settings,
    server_class: Callable[..., WorkerServer] | None = None,
) -> None:
    """Load the app, build the server (`server_class`, default `WorkerServer`), serve."""
    import faulthandler
    import resource

    from asgi_supervise import drain, logs
    from asgi_supervise.worker import apploader, forwarded, promfiles
    from asgi_supervise.worker.meter import RequestMetrics
    from asgi_supervise.worker.server import WorkerServer, uvicorn_config

    faulthandler.enable()  # SIGABRT from the master's timeout shows where the loop was stuck
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ... without leaving a core file
    s = settings
    logs.configure(s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config)

    promfiles.install()  # before the app imports prometheus_client: no SIGBUS on a full disk
    app: Any = None
    try:
        app = apploader.load(settings.app or "", settings.app_dir, settings.factory)
    except Exception as exc:
        boot_error(control, exc)
    config = uvicorn_config(app, settings)
    try:
        config.load()
    except Exception as exc:
        boot_error(control, exc)
    if settings.proxy_headers:  # outermost, where uvicorn puts its own
        config.loaded_app = forwarded.proxy_headers(config.loaded_app, settings.forwarded_allow_ips)
    idle_grace = min(settings.idle_drain_grace, settings.timeout_keep_alive)
    make = server_class or WorkerServer
    server = make(config, control, idle_grace, drain.of(settings), settings.timeout_request_header)
    server.report_connections = settings.balance_connections
    if settings.metrics and settings.request_metrics:
        server.request_metrics = RequestMetrics(config.loaded_app)
        config.loaded_app = server.request_metrics.meter  # served directly: no extra call
    server.run(sockets=listeners)
