"""From validated settings to a serving master: the checks that need this host (the app
string, the plan, the sockets, the metrics port), then the native arbiter or gunicorn's.

Runs in the master, which holds its settings as plain data (`config/values.py`): nothing
here imports the settings model. `launch` imports this module while a child reads the
settings, so what the start needs before its first workers is imported here at the top;
the arbiter, once they are asked for.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from asgi_supervise import logs, sizing
from asgi_supervise.config.values import ConfigError, Loaded
from asgi_supervise.master import forkserver, signals
from asgi_supervise.master.interpreter import EarlyForkServer
from asgi_supervise.master.pidfile import PidFileError, pid_file
from asgi_supervise.master.sockets import BindError, bind, check_free, cleanup
from asgi_supervise.observe.observability import metrics_directory
from asgi_supervise.protocol import Exit
from asgi_supervise.sizing import host

log = logging.getLogger("asgi_supervise.master")


def run(
    loaded: Loaded,
    reloader: Callable[[], Loaded] | None = None,
    early: EarlyForkServer | None = None,
) -> int:
    settings = loaded.settings
    if not settings.app:
        raise ConfigError(
            "no app to serve: pass APP (module:attribute), set ASGI_SUPERVISE_APP, "
            'or put app = "module:attribute" in asgi-supervise.toml'
        )
    loaded.check_app()
    if settings.engine == "gunicorn" and settings.reload:
        raise ConfigError(
            f"{loaded.describe('reload')}: not with --engine gunicorn (gunicorn restarts every "
            "worker at once on a change); use the native engine for development"
        )
    s = settings
    try:
        logs.configure(
            s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config
        )
    except Exception as exc:  # any logging.config failure: the file is what is wrong
        where = f"--log-config {s.log_config}" if s.log_config else f"--log-file {s.log_file}"
        raise ConfigError(f"{where}: cannot set up logging: {exc}") from None
    for note in loaded.notes:
        log.warning("%s", note, extra={"event": "config_ignored"})
    facts = host.read_host()
    plan = sizing.plan(settings, facts)
    if settings.min_ready > plan.workers:  # a fixed count was checked with the settings
        raise ConfigError(
            f"{loaded.describe('min_ready')}: above the {plan.workers} workers --workers auto "
            f"sized (limited by {plan.limited_by}): /readyz could never answer 200"
        )
    try:
        sockets = bind(settings)
    except BindError as exc:
        raise ConfigError(f"{loaded.describe(exc.setting)}: {exc}") from None
    if settings.metrics:  # a busy metrics port fails here, before any worker starts
        try:
            check_free(
                s.metrics_host, s.metrics_port, "serve metrics and health on", prefix="metrics_"
            )
        except BindError as exc:
            cleanup(sockets)
            raise ConfigError(f"{loaded.describe(exc.setting)}: {exc}") from None
    # Said once nothing can fail any more: a usage error stays one line.
    if not plan.forced:
        limit = next((b for b in plan.budgets if b.name == plan.limited_by), None)
        detail = f": {limit.detail}" if limit else ""
        log.info(
            "sizing: %d workers, limited by %s%s", plan.workers, plan.limited_by, detail,
            extra={"event": "plan", "workers": plan.workers, "limited_by": plan.limited_by},
        )  # fmt: skip
    for warning in plan.warnings:
        log.warning("sizing: %s", warning, extra={"event": "sizing_warning"})
    if early is not None and (settings.engine == "gunicorn" or settings.worker_start != "fork"):
        early.discard()
        early = None
    if settings.engine == "gunicorn":
        signals.release()  # gunicorn's arbiter installs its own handlers
        return _run_gunicorn(loaded, sockets, plan, reloader)
    try:
        with pid_file(settings.pid_file):
            return _run_native(loaded, sockets, plan, facts.memory_limit, reloader, early)
    except PidFileError as exc:
        cleanup(sockets)
        logs.say(str(exc))
        return Exit.USAGE


def _run_native(
    loaded: Loaded,
    sockets: list[socket.socket],
    plan: sizing.Plan,
    memory_limit: int | None,
    reloader: Callable[[], Loaded] | None,
    early: EarlyForkServer | None,
) -> int:
    """The native master. The fork server `launch` started gets its spec and the first
    workers' requests before the arbiter's modules are imported: they boot meanwhile."""
    settings = loaded.settings
    try:
        directory = metrics_directory(settings)
    except OSError as exc:
        cleanup(sockets)
        logs.say(str(exc))
        return Exit.USAGE
    first = None
    if early is not None:
        env = None if directory is None else directory.environ()
        first = forkserver.start_first(settings, sockets, env, early, plan.workers)
        first.await_requested(forkserver.FIRST_WORKERS_WAIT)
    import asyncio

    from asgi_supervise.master.arbiter import Arbiter  # imported while they boot

    arbiter = Arbiter(settings, sockets, plan, memory_limit, directory)
    arbiter.loaded = loaded  # `config --running` shows these settings and their sources
    arbiter.reloader = reloader  # a reload re-reads the config
    arbiter.first = first
    return asyncio.run(arbiter.run())


def _run_gunicorn(
    loaded: Loaded,
    sockets: list[Any],
    plan: sizing.Plan,
    reloader: Callable[[], Loaded] | None,
) -> int:
    """`--engine gunicorn`: gunicorn's arbiter supervises the same workers (README)."""
    from asgi_supervise.gunicorn import app, config

    given = [name for name in config.NATIVE_ONLY if loaded.origins.get(name) is not None]
    if given:
        what = "; ".join(f"{loaded.describe(n)}: {config.NATIVE_ONLY[n]}" for n in given)
        log.warning("engine gunicorn does not apply %s", what, extra={"event": "engine_warning"})
    try:
        with pid_file(loaded.settings.pid_file):
            return app.serve(loaded, sockets, plan, reloader)
    except PidFileError as exc:
        cleanup(sockets)
        logs.say(str(exc))
        return Exit.USAGE
