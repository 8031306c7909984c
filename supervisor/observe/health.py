"""The master's own HTTP endpoints: /livez, /readyz, /status and /metrics.

They run on their own port inside the master's event loop, never on the app's socket: a
probe must reach the master even when every worker is busy, and the answers come from the
master's worker table, which only the master holds. Serving at all proves the loop runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from asgi_supervise.master.sockets import listen_tcp

log = logging.getLogger("asgi_supervise.master")

Status = Callable[[], dict[str, Any]]
Readiness = Callable[[], tuple[bool, str]]
Metrics = Callable[[str | None], tuple[bytes, str]]
Response = tuple[int, bytes, str]

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
STOP_GRACE = 2.0  # seconds an in-flight scrape gets when the master stops


def readiness(draining: bool, ready: int, workers: int, min_ready: int) -> tuple[bool, str]:
    """The /readyz verdict from the master's facts, with the reason a human needs."""
    if draining:
        return False, "draining"
    if ready < min_ready:
        noun = "worker" if workers == 1 else "workers"
        return False, f"{ready} of {workers} {noun} ready, need {min_ready}"
    return True, f"{ready} of {workers} ready"


class HealthApp:
    """A raw ASGI app: four read-only GET endpoints over provider callables."""

    def __init__(self, status: Status, readiness: Readiness, metrics: Metrics) -> None:
        self.status = status
        self.readiness = readiness
        self.metrics = metrics
        self.routes: dict[str, Callable[[dict[str, Any]], Response]] = {
            "/livez": self.livez,
            "/readyz": self.readyz,
            "/status": self.show_status,
            "/metrics": self.show_metrics,
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":  # a WebSocket handshake: refuse it
            await send({"type": "websocket.close", "code": 1008})
            return
        handler = self.routes.get(scope["path"])
        extra: list[tuple[bytes, bytes]] = []
        if handler is None:
            code, body, kind = 404, b"not found\n", TEXT
        elif scope["method"] not in ("GET", "HEAD"):
            code, body, kind = 405, b"method not allowed\n", TEXT
            extra.append((b"allow", b"GET, HEAD"))
        else:
            code, body, kind = self.answer(handler, scope)
        headers = [
            (b"content-type", kind.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *extra,
        ]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        head = scope["method"] == "HEAD"
        await send({"type": "http.response.body", "body": b"" if head else body})

    def answer(self, handler: Callable[[dict[str, Any]], Response], scope: Any) -> Response:
        try:
            return handler(scope)
        except Exception:  # a provider's bug must not take the master's loop with it
            log.exception("%s failed", scope["path"])
            return 500, b"internal error\n", TEXT

    def livez(self, scope: Any) -> Response:
        return 200, b"ok\n", TEXT

    def readyz(self, scope: Any) -> Response:
        ready, reason = self.readiness()
        if ready:
            return 200, _json({"ready": True}), JSON
        return 503, _json({"ready": False, "reason": reason}), JSON

    def show_status(self, scope: Any) -> Response:
        return 200, _json(self.status()), JSON

    def show_metrics(self, scope: Any) -> Response:
        accept = None
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value.decode("latin-1")
        body, kind = self.metrics(accept)
        return 200, body, kind


def _json(data: Any) -> bytes:
    return json.dumps(data, default=str).encode() + b"\n"


async def _lifespan(receive: Any, send: Any) -> None:
    """Nothing to start or stop; answered so a lifespan-on server is happy too."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a loop someone else runs; the master owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HealthServer:
    """A running health server; `stop` it before the master's loop ends.

    uvicorn's `main_loop` wakes ten times a second; all this server needs from it is the
    Date header refreshed once a second, so that is all it does. The master then idles at
    a few wake-ups a second, and under load it takes that much less CPU from the workers.
    """

    def __init__(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.task = asyncio.create_task(self._keep_date(), name="asgi-supervise-health")
        self.stopped = False

    async def _keep_date(self) -> None:
        while True:
            await self.server.on_tick(0)  # tick 0: uvicorn renews the Date header
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.server.shutdown(sockets=[self.sock])


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so "port in use" reaches the caller as OSError."""
    try:
        return listen_tcp(host, port, backlog=128)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot serve metrics and health on {host}:{port}: {exc.strerror}"
        ) from exc


async def start_server(app: Any, host: str, port: int) -> HealthServer:
    """Serve `app` from the running loop (no thread): lifespan, access log and signals off."""
    sock = bind(host, port)
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_config=None,  # the master's logging is configured already; leave it alone
        log_level="warning",
        ws="none",
        server_header=False,
        timeout_graceful_shutdown=STOP_GRACE,
    )
    try:
        config.load()
        server = _EmbeddedServer(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
    except BaseException:
        sock.close()
        raise
    return HealthServer(server, sock)
