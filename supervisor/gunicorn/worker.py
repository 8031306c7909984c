"""The gunicorn worker class: asgi-supervise's worker, on gunicorn's forked process.

gunicorn forks it with the listeners open; `run` then serves exactly as a native worker
does (`worker.boot.serve`: app loading, proxy headers, request meter, the drain of
keep-alive connections and streams), with two differences only gunicorn needs: the
heartbeat is gunicorn's `notify()` (its master kills a worker whose heartbeat file is
older than --timeout), and --max-requests ends the worker with a drain, after which
gunicorn forks a new one. The control channel is a socket pair made before the fork
(`__init__` runs in the master): the gunicorn master's observer reads what the worker
reports on it, the messages of `protocol`.

Not `uvicorn.workers.UvicornWorker` (deprecated) nor the `uvicorn-worker` package: both
run plain `uvicorn.Server`, which closes idle keep-alive connections at a drain while
clients may be sending on them (failed requests on every HUP), cuts streams only at
gunicorn's graceful timeout, measures nothing, and has its own graceful timeout beside
gunicorn's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from typing import Any

from gunicorn.workers.base import Worker

from asgi_supervise.protocol import Control
from asgi_supervise.worker import boot
from asgi_supervise.worker.server import HEARTBEAT_TICKS, WorkerServer

log = logging.getLogger("asgi_supervise.worker")


class GunicornServer(WorkerServer):
    """`WorkerServer`, beating gunicorn's heartbeat and counting gunicorn's max_requests."""

    def __init__(self, *args: Any, worker: UvicornWorker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker = worker

    async def on_tick(self, counter: int) -> bool:
        if counter % HEARTBEAT_TICKS == 0:
            self.worker.notify()
        requests = self.server_state.total_requests
        if requests >= self.worker.max_requests and not self.should_exit:
            log.info("max requests (%d) served: draining to be replaced", self.worker.max_requests)
            self.control.offer({"t": "recycling", "reason": "requests"})
            self.should_exit = True  # uvicorn's loop ends; `shutdown` drains
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The drain keeps beating: gunicorn would take a long drain for a hung worker."""
        beating = asyncio.create_task(self._beat())
        try:
            await super().shutdown(sockets)
        finally:
            beating.cancel()

    async def _beat(self) -> None:
        while True:
            self.worker.notify()
            await asyncio.sleep(1.0)


class UvicornWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # in the master, before the fork
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel_master, self.channel = pair

    def init_process(self) -> None:
        boot.die_with_master(self.ppid)  # even a SIGKILLed master leaves no worker
        super().init_process()  # gunicorn's: environment, user, then `run`

    def init_signals(self) -> None:
        """Default handlers until the server installs the native worker's own."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def load_wsgi(self) -> None:
        """`run` loads the app, so a failure is reported as the native worker reports it."""

    def run(self) -> None:
        self.notify()
        settings = self.app.settings
        make = functools.partial(GunicornServer, worker=self)
        listeners = [listener.sock for listener in self.sockets]
        boot.serve(Control(self.channel), listeners, settings, server_class=make)
