"""The worker's uvicorn server: readiness, heartbeats, and a drain that races no client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import traceback
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import uvicorn

from asgi_supervise import logs
from asgi_supervise.protocol import Control, Exit
from asgi_supervise.worker import promfiles
from asgi_supervise.worker.meter import RequestMetrics
from asgi_supervise.worker.uvicorn_options import PASSED_AS_IS

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings

log = logging.getLogger("asgi_supervise.worker")
HEARTBEAT_TICKS = 10  # uvicorn ticks every 0.1 s: beat once a second
ABSENT = object()  # an attribute a connection does not have


class ClosingApp:
    """Wraps a connection's app once draining: every response says `Connection: close`.

    Closing an idle keep-alive connection races a client that is sending on it; asking the
    client to close after its next response moves it to another worker without an error.
    Installed per connection at drain time, so serving costs no extra ASGI layer.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        def send_closing(message: Any) -> Any:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            return send(message)

        await self.app(scope, receive, send_closing)


class _CaptureErrors(logging.Filter):
    """Holds back uvicorn's startup error lines: the master prints them once, not per try."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if text == "Application startup failed. Exiting.":  # uvicorn's; the cause came before
            return False
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self.lines.append(text)
        return False


class WorkerServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        control: Control,
        idle_grace: float,
        header_timeout: float | None = None,
    ):
        super().__init__(config)
        self.control = control
        self.idle_grace = idle_grace
        self.reopen_logs = False
        self.request_metrics: RequestMetrics | None = None  # when --metrics is on
        self.header_timeout = header_timeout  # --timeout-request-header; None: never
        self.header_timeouts = 0  # connections closed for it, reported in every beat
        self._awaiting_headers: dict[Any, tuple[Any, float]] = {}  # connection: cycle, since

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """SIGTERM drains, SIGQUIT stops now. SIGINT is the master's: it decides for us."""

        def drain(*_: Any) -> None:
            self.should_exit = True

        def stop_now(*_: Any) -> None:
            self.should_exit = self.force_exit = True

        def reopen(*_: Any) -> None:
            self.reopen_logs = True  # done from the loop, not inside a handler mid-write

        signal.signal(signal.SIGUSR1, reopen)
        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGQUIT, stop_now)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        errors = _CaptureErrors()
        error_log = logging.getLogger("uvicorn.error")
        error_log.addFilter(errors)
        try:
            await super().startup(sockets=sockets)
        except SystemExit:
            reason = "\n".join(errors.lines) or "lifespan startup failed"
            self.control.send("boot_error", error=reason)
            raise SystemExit(Exit.BOOT_FAILURE) from None
        finally:
            error_log.removeFilter(errors)
        metrics = self.request_metrics
        self.control.send("ready", meter=metrics and type(metrics.meter).__qualname__)

    async def on_tick(self, counter: int) -> bool:
        if self.reopen_logs:
            self.reopen_logs = False
            logs.reopen()
        if self.request_metrics is not None:
            self.request_metrics.fold()  # every tick, so no one fold stalls the loop long
        if self.header_timeout is not None:
            self.close_slow_headers(asyncio.get_running_loop().time())
        if counter % HEARTBEAT_TICKS == 0:
            self.control.offer(self.beat())  # a missed beat: the next one counts
            if self.request_metrics is not None:  # after the beat: it may fill the channel
                self.request_metrics.deliver(self.control.offer)
            promfiles.deliver(self.control.offer)  # app metrics dropped for want of room
        return await super().on_tick(counter)

    def beat(self) -> dict[str, Any]:
        """Totals since the worker started: a beat the channel refused loses nothing."""
        state = self.server_state
        return {
            "t": "beat",
            "requests": state.total_requests,
            "connections": len(state.connections),
            "header_timeouts": self.header_timeouts,
        }

    def close_slow_headers(self, now: float) -> None:
        """Close HTTP connections whose request headers took longer than `header_timeout`.

        uvicorn times out nothing before a request's headers are in: a connection that
        sends nothing, or trickles its headers (slowloris), holds its place in
        --limit-concurrency for ever. A connection awaits headers from when it was
        accepted, and again from the first byte after a response: until that byte,
        uvicorn's keep-alive timer runs (--timeout-keep-alive), and any byte cancels it.
        A request whose headers are in (its body uploading, the app answering) is not
        awaiting headers. Checked every tick (0.1 s), so a wait is seen to within one,
        and a request cycle is told from the next by its identity.
        """
        awaiting: dict[Any, tuple[Any, float]] = {}
        limit = self.header_timeout or 0.0
        for connection in self.server_state.connections:
            # uvicorn's HTTP/1 connections (h11, httptools, zttp) have both; WebSocket and
            # HTTP/2 ones do not, and are left alone
            cycle = getattr(connection, "cycle", ABSENT)
            if getattr(connection, "timeout_keep_alive_task", ABSENT) is not None:
                continue  # idle under the keep-alive timer, or not HTTP/1
            if cycle is ABSENT or (cycle is not None and not cycle.response_complete):
                continue  # a request in progress: its headers are in
            if connection.transport.is_closing():
                continue
            noted = self._awaiting_headers.get(connection)
            since = noted[1] if noted is not None and noted[0] is cycle else now
            if now - since < limit:
                awaiting[connection] = cycle, since
                continue
            connection.transport.close()  # uvicorn's connection_lost does the rest
            self.header_timeouts += 1
            log.debug("closed a connection: no request headers within %gs", limit)
        self._awaiting_headers = awaiting

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, except idle keep-alive connections are not cut mid-race."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        http = self.config.http_protocol_class  # the one in use: h11 is not imported otherwise
        for connection in list(self.server_state.connections):
            if isinstance(connection, http):
                connection.app = ClosingApp(connection.app)  # its next request: close after
                if connection.cycle is not None and not connection.cycle.response_complete:
                    connection.cycle.keep_alive = False
            else:
                connection.shutdown()  # WebSockets: close 1012 (service restart)

        loop = asyncio.get_running_loop()
        idle_deadline = loop.time() + self.idle_grace
        while self.server_state.connections and not self.force_exit:
            if loop.time() >= idle_deadline:
                for connection in list(self.server_state.connections):
                    if isinstance(connection, http) and _is_idle(connection):
                        connection.shutdown()
            await asyncio.sleep(0.05)
        while self.server_state.tasks and not self.force_exit:
            await asyncio.sleep(0.05)
        self.control.offer(self.beat(), 1.0)  # the last second's counts, before exiting
        if self.request_metrics is not None:  # the last second's requests, too
            self.request_metrics.deliver(lambda message: self.control.offer(message, 1.0))
        promfiles.deliver(lambda message: self.control.offer(message, 1.0))
        if not self.force_exit:
            await self.lifespan.shutdown()


def _is_idle(connection: Any) -> bool:
    return connection.cycle is None or connection.cycle.response_complete


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings as validated by the master; ours are not its to see."""
    options = {name: getattr(settings, name) for name in PASSED_AS_IS}
    return uvicorn.Config(
        app,
        **options,
        log_config=None,  # run() configured logging already, the master's way
        proxy_headers=False,  # run() wraps the app in forwarded.proxy_headers instead
        headers=[_header(h) for h in settings.headers],
    )


def _header(header: str) -> tuple[str, str]:
    """`Name: value` (checked by the master) as uvicorn's (name, value)."""
    name, _, value = header.partition(":")
    return name.strip(), value.strip()
