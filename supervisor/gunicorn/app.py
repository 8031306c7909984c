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
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from asgi_supervise import logs
from asgi_supervise.gunicorn.arbiter import Arbiter
from asgi_supervise.gunicorn.config import cfg_values
from asgi_supervise.gunicorn.observer import Observer
from asgi_supervise.sizing import Plan

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
    def __init__(self, settings: Any, workers: int) -> None:
        self.settings = settings  # the worker class reads them after the fork
        self.workers = workers
        super().__init__(prog="asgi-supervise")

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


def serve(settings: Any, sockets: list[socket.socket], plan: Plan) -> int:
    """Run gunicorn's arbiter until it exits; its exit code."""
    import gunicorn

    application = Application(settings, plan.workers)
    arbiter: Arbiter | None = None
    observer = Observer(settings, plan.to_dict(), lambda: arbiter.num_workers if arbiter else 0)
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
