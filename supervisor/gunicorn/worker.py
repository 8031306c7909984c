"""The gunicorn worker class: asgi-supervise's worker, on gunicorn's forked process.

gunicorn forks it with the listeners open; `run` then serves exactly as a native worker
does (`worker.boot.serve`: app loading, proxy headers, request meter, the drain of
keep-alive connections and streams), with two differences only gunicorn needs: the
heartbeat is gunicorn's `notify()` (its master kills a worker whose heartbeat file is
older than --timeout), and recycling (--max-requests, --max-worker-memory,
--max-worker-lifetime) is the worker's own: it drains, exits, and gunicorn forks a new
one. The control channel is a socket pair made before the fork (`__init__` runs in the
master): the gunicorn master's observer reads what the worker reports on it, the
messages of `protocol`.

Not `uvicorn.workers.UvicornWorker` (deprecated) nor the `uvicorn-worker` package: both
run plain `uvicorn.Server`, which closes idle keep-alive connections at a drain while
clients may be sending on them (a reset request now and then on a HUP), cuts streams only at
gunicorn's graceful timeout, measures nothing, and has its own graceful timeout beside
gunicorn's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import signal
import socket
import time
from typing import Any, NamedTuple

from gunicorn.workers.base import Worker

from asgi_supervise.protocol import Control
from asgi_supervise.worker import boot
from asgi_supervise.worker.server import HEARTBEAT_TICKS, WorkerServer

log = logging.getLogger("asgi_supervise.worker")
MIB = 1024 * 1024
MEMORY_STRIKES = 3  # samples in a row over --max-worker-memory, one a second
PAGE = os.sysconf("SC_PAGE_SIZE")


class GunicornServer(WorkerServer):
    """`WorkerServer`, beating gunicorn's heartbeat, and recycling itself: gunicorn's
    arbiter knows only max_requests, and only as an exit it respawns after."""

    def __init__(self, *args: Any, worker: UvicornWorker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker = worker
        self.limits = RecycleLimits.of(worker.app.settings)
        self.born = time.monotonic()
        self.memory_strikes = 0

    async def on_tick(self, counter: int) -> bool:
        if counter % HEARTBEAT_TICKS == 0:
            self.worker.notify()
            if not self.should_exit:
                self.check_recycling()
        return await super().on_tick(counter)

    def check_recycling(self) -> None:
        """Once a second: over max-requests, the memory limit (3 samples in a row, as the
        native master samples) or the lifetime, drain; gunicorn then forks a successor."""
        limits = self.limits
        rss = resident_bytes() if limits.memory is not None else None
        over = rss is not None and limits.memory is not None and rss > limits.memory
        self.memory_strikes = self.memory_strikes + 1 if over else 0
        reason = None
        if self.server_state.total_requests >= self.worker.max_requests:
            reason, detail = "requests", f"{self.worker.max_requests} requests served"
        elif self.memory_strikes >= MEMORY_STRIKES:
            reason, detail = "memory", f"RSS {(rss or 0) // MIB} MiB over {limits.memory // MIB}"
        elif limits.lifetime is not None and time.monotonic() - self.born >= limits.lifetime:
            reason, detail = "lifetime", f"{limits.lifetime:.0f}s old"
        if reason is not None:
            log.info("due for recycling: %s (%s): draining", reason, detail)
            self.control.offer({"t": "recycling", "reason": reason})
            self.should_exit = True  # uvicorn's loop ends; `shutdown` drains

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


class RecycleLimits(NamedTuple):
    memory: int | None  # bytes
    lifetime: float | None  # seconds, jitter drawn

    @classmethod
    def of(cls, settings: Any) -> RecycleLimits:
        memory = settings.max_worker_memory * MIB if settings.max_worker_memory else None
        lifetime = settings.max_worker_lifetime
        if lifetime is not None:
            lifetime += random.uniform(0, settings.max_worker_lifetime_jitter)
        return cls(memory, lifetime)


def resident_bytes() -> int | None:
    """This process's RSS from /proc (Linux); None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


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
