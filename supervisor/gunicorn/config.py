"""The settings model as gunicorn's configuration, and what gunicorn's arbiter leaves out.

Pure: `cfg_values` is what `app.Application.load_config` hands to gunicorn's
``cfg.set``, one setting at a time, so gunicorn validates each value itself; no command
line or config file is ever written. Tested without processes (tests/unit).
"""

from __future__ import annotations

import math
from typing import Any

from asgi_supervise import drain

WORKER_CLASS = "asgi_supervise.gunicorn.worker.UvicornWorker"
EXIT_MARGIN = 2  # seconds gunicorn waits past a worker's own drain bound before SIGKILL

# Settings that only the native master applies, with what the gunicorn engine does instead.
NATIVE_ONLY: dict[str, str] = {
    "reload": "no file watcher: gunicorn's reloader restarts every worker at once",
    "reload_surge": "a HUP starts every new worker at once and stops the old ones",
    "ready_timeout": "a booting worker is killed after --worker-timeout",
    "boot_failure_limit": "the first worker that fails to start stops the master",
    "restart_backoff_max": "no backoff: gunicorn respawns at once",
    "balance_connections": "no balancing of long-lived connections",
    "control_socket": "no control socket: use signals (HUP, TTIN, TTOU, TERM)",
    "preload": "each worker imports the app itself",
    "worker_start": "gunicorn's arbiter forks every worker itself",
}


def bind_address(settings: Any) -> str:
    """gunicorn's spelling of the one listener: HOST:PORT, [IPv6]:PORT, unix:PATH, fd://N."""
    if settings.uds is not None:
        return f"unix:{settings.uds}"
    if settings.fd is not None:
        return f"fd://{settings.fd}"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.port}"


def graceful_timeout(settings: Any) -> int:
    """gunicorn's graceful timeout: when its master SIGKILLs a draining worker.

    Our worker ends its requests at --graceful-timeout by itself, then runs the lifespan
    shutdown; gunicorn's bound must cover all of it, or gunicorn kills the worker in the
    middle of the app's shutdown (the mismatch of uvicorn issue #2094, where gunicorn's
    and uvicorn's graceful timeouts are two settings).
    """
    return math.ceil(drain.of(settings).worker_bound + EXIT_MARGIN)


def cfg_values(settings: Any, workers: int) -> dict[str, Any]:
    """Every gunicorn setting the engine sets, by gunicorn's name."""
    s = settings
    return {
        "bind": [bind_address(s)],
        "workers": workers,
        "worker_class": WORKER_CLASS,
        "timeout": math.ceil(s.worker_timeout),  # heartbeats: gunicorn's notify() per second
        "graceful_timeout": graceful_timeout(s),
        "keepalive": math.ceil(s.timeout_keep_alive),
        "max_requests": s.max_requests or 0,
        "max_requests_jitter": s.max_requests_jitter if s.max_requests else 0,
        "forwarded_allow_ips": ",".join(s.forwarded_allow_ips),
        "backlog": s.backlog,
        "loglevel": "debug" if s.log_level == "trace" else s.log_level,
        "proc_name": "asgi-supervise",
        "preload_app": False,  # each worker imports the app after the fork, as natively
        "control_socket_disable": True,  # gunicorn's own; `asgi-supervise status` is native
    }
