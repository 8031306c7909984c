"""`--engine gunicorn`: the validated settings as a gunicorn application, and its run.

The settings model stays the one source of truth: `Application.load_config` sets each
gunicorn setting from it through gunicorn's own API (``cfg.set``, validated by gunicorn),
never through a generated command line or config file. The listeners are the ones the
CLI bound (so a busy port is the native one-line error), gunicorn's log calls go into
asgi-supervise's loggers and format, and the workers are `worker.UvicornWorker`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from asgi_supervise import logs, sizing
from asgi_supervise.config.values import ConfigError, Loaded
from asgi_supervise.gunicorn.arbiter import Arbiter
from asgi_supervise.gunicorn.config import cfg_values
from asgi_supervise.gunicorn.observer import Observer
from asgi_supervise.master import liveconfig
from asgi_supervise.sizing import Plan, host

log = logging.getLogger("asgi_supervise.master")
HEARTBEAT_DIR = "/dev/shm"  # gunicorn's advice: a heartbeat file on disk can stall


class Logger(glogging.Logger):
    """gunicorn's own lines (booting, signals, exits) in asgi-supervise's format and
    handlers (`logs.configure` ran in the CLI), under the logger asgi_supervise.gunicorn."""

    def setup(self, cfg: Any) -> None:
        self.cfg = cfg
        self.error_log = logging.getLogger("asgi_supervise.gunicorn")
        self.access_log = logging.getLogger("asgi_supervise.gunicorn.access")
        self._access_log_enabled = False  # the workers' uvicorn writes the access lines

    def reopen_files(self) -> None:
        logs.reopen()

    def close_on_exec(self) -> None:
        """Our handlers are the CLI's; nothing is exec'd."""


def _post_fork(arbiter: Arbiter, worker: Any) -> None:
    arbiter.post_fork(worker)


def _child_exit(arbiter: Arbiter, worker: Any) -> None:
    arbiter.child_exit(worker)


class Application(BaseApplication):
    def __init__(
        self,
        settings: Any,
        workers: int,
        loaded: Loaded | None = None,
        reloader: Callable[[], Loaded] | None = None,
    ) -> None:
        self.settings = settings  # the worker class reads them after the fork
        self.workers = workers
        self.loaded = loaded  # the layers the settings came from, for a reload
        self.reloader = reloader
        super().__init__(prog="asgi-supervise")

    def reconfigure(self) -> Plan | None:
        """SIGHUP: re-read every layer as the native master does (`master.liveconfig`).
        The new settings, and the plan they make, are then what gunicorn's reload loads;
        what was bound at start keeps its running value. None when the new config is
        invalid: nothing is reloaded (one line says why)."""
        if self.reloader is None or self.loaded is None:
            return sizing.plan(self.settings, host.read_host())
        try:
            new = self.reloader()
            if (new.settings.app, new.settings.app_dir) != (
                self.settings.app,
                self.settings.app_dir,
            ):
                new.check_app()
        except ConfigError as exc:
            log.error(
                "SIGHUP: the new config is invalid, nothing reloaded; the running config "
                "stays: %s", exc, extra={"event": "config_invalid", "error": str(exc)},
            )  # fmt: skip
            return None
        change = liveconfig.reconcile(self.loaded, new)
        if change.kept:
            log.warning(
                "SIGHUP: not applied without a restart (running values kept): %s",
                "; ".join(change.kept), extra={"event": "config_kept"},
            )  # fmt: skip
        if change.applied:
            log.info(
                "SIGHUP: config applied: %s", "; ".join(change.applied),
                extra={"event": "config_applied"},
            )  # fmt: skip
        self.loaded, s = change.loaded, change.settings
        self.settings = s
        if change.changed(*liveconfig.LOGGING):
            logs.configure(
                s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config
            )
        plan = sizing.plan(s, host.read_host())
        self.workers = plan.workers
        return plan

    def load_config(self) -> None:
        for name, value in cfg_values(self.settings, self.workers).items():
            self.cfg.set(name, value)
        self.cfg.set("logger_class", Logger)
        self.cfg.set("post_fork", _post_fork)
        self.cfg.set("child_exit", _child_exit)
        if os.path.isdir(HEARTBEAT_DIR) and os.access(HEARTBEAT_DIR, os.W_OK):
            self.cfg.set("worker_tmp_dir", HEARTBEAT_DIR)

    def load(self) -> None:
        """Never called: each worker loads the ASGI app itself (`worker.boot.serve`)."""


def serve(
    loaded: Loaded,
    sockets: list[socket.socket],
    plan: Plan,
    reloader: Callable[[], Loaded] | None = None,
) -> int:
    """Run gunicorn's arbiter until it exits; its exit code."""
    import gunicorn

    settings = loaded.settings
    application = Application(settings, plan.workers, loaded, reloader)
    arbiter: Arbiter | None = None
    observer = Observer(settings, plan.to_dict(), lambda: arbiter.num_workers if arbiter else 0)
    # The observer says READY=1 once the workers are ready; gunicorn would say it at boot.
    # And only the main process may notify: the workers must not inherit the socket.
    os.environ.pop("NOTIFY_SOCKET", None)
    observer.start()
    arbiter = Arbiter(application, observer, [sock.detach() for sock in sockets])
    where = application.cfg.bind[0]
    log.info(
        "master %d serving %s with %d workers (engine: gunicorn %s)",
        os.getpid(), where, plan.workers, gunicorn.__version__,
    )  # fmt: skip
    try:
        arbiter.run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0
