"""How a worker drains: it stops accepting, lets requests finish without racing a
client, ends streams, cuts what outlives the graceful timeout, then runs the app's
lifespan shutdown.

`Draining` is mixed into `WorkerServer`, whose state it works on (uvicorn's connections
and tasks, the control channel, the drain times), as the master's `Forking` is into its
arbiter. It is woken, not polled: by a connection closing (`Connections`), by a request
ending, and at its deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any

from asgi_supervise.drain import CANCEL_WAIT, DrainTimes
from asgi_supervise.worker import promfiles
from asgi_supervise.worker.streams import StreamEnder

if TYPE_CHECKING:
    from asgi_supervise.protocol import Control

logger = logging.getLogger("uvicorn.error")

POLL = 0.05  # seconds between looks at the connections while draining, if nothing wakes us


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


class QuietCancellation(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for requests we cancelled."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


class Connections(set):  # type: ignore[type-arg]
    """uvicorn's set of open connections, telling us when one is added or removed."""

    on_add: Any = None
    on_remove: Any = None

    def add(self, item: Any) -> None:
        super().add(item)
        if self.on_add is not None:
            self.on_add()

    def discard(self, item: Any) -> None:  # HTTP connections
        super().discard(item)
        if self.on_remove is not None:
            self.on_remove()

    def remove(self, item: Any) -> None:  # WebSockets
        super().remove(item)
        if self.on_remove is not None:
            self.on_remove()


def _tell_to_close(connections: set[Any], http: type, told: set[Any]) -> None:
    """Each connection, once: an HTTP one answers its next request with `Connection:
    close`, a WebSocket is closed with 1012 (service restart). Those made after the drain
    began too: uvloop may have accepted them just before the listeners closed."""
    for connection in list(connections):
        if connection in told:
            continue
        told.add(connection)
        if isinstance(connection, http):
            connection.app = ClosingApp(connection.app)  # its next request: close after
            if connection.cycle is not None and not connection.cycle.response_complete:
                connection.cycle.keep_alive = False
        else:
            connection.shutdown()


def _is_idle(connection: Any) -> bool:
    return connection.cycle is None or connection.cycle.response_complete


def _idle_since(connection: Any, default: float) -> float:
    """When an idle keep-alive connection's last response ended (loop time), read off the
    timer uvicorn set then to close it after --timeout-keep-alive; `default` without one
    (a connection that has not had a request yet)."""
    timer = getattr(connection, "timeout_keep_alive_task", None)
    if timer is None:
        return default
    return timer.when() - connection.timeout_keep_alive


class Draining:
    """Mixed into `WorkerServer`: its drain (`shutdown`, which uvicorn's `serve` calls)."""

    control: Control
    drain: DrainTimes
    idle_grace: float  # an idle keep-alive connection is closed this long after its response
    cut: int
    lifespan_timed_out: bool
    # and, from uvicorn.Server and WorkerServer: server_state, config, servers, lifespan,
    # force_exit, request_metrics, _listeners, wake, _wait, _watched, beat

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, except that idle keep-alive connections are not cut mid-race,
        streams are told to end, and the graceful timeout ends the app, not the process.

        From SIGTERM: WebSockets get 1012 at once; each keep-alive connection's next
        response says `Connection: close`, and one idle for `idle_grace` since its last
        response is closed; streaming responses get `http.disconnect` after `stream_grace`
        and, once their handler returns, a proper end of body; at `graceful_timeout` what
        still runs is cancelled (counted in `cut`: the exit code says so); then the
        lifespan shutdown runs, bounded by `shutdown_timeout`.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(self.control.sock.fileno())
        for server in self.servers:
            server.close()
        for sock in [*(sockets or []), *self._listeners]:
            sock.close()  # every copy: the kernel refuses new connections once all are shut
        # A connection the loop accepted before the close is made (uvicorn counts it) only
        # when its callback runs: one turn of the loop, or the drain could end without it,
        # and its request be served after the last metrics were delivered.
        await asyncio.sleep(0)
        http = self.config.http_protocol_class  # the one in use: h11 is not imported otherwise
        told: set[Any] = set()
        ended = StreamEnder(http)
        stream_deadline = started + self.drain.stream_grace
        deadline = started + self.drain.graceful_timeout
        watched = self._watched()
        watched.on_add = self.wake  # one accepted as the listeners closed: tell it too
        watched.on_remove = self.wake  # a connection closed: maybe the last one
        watched_tasks: set[asyncio.Task[Any]] = set()
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            now = loop.time()
            if now >= deadline:
                break
            _tell_to_close(self.server_state.connections, http, told)
            if now >= stream_deadline:
                ended.end_streams(self.server_state)
            idle_closes = []
            for connection in list(self.server_state.connections):
                if isinstance(connection, http) and _is_idle(connection):
                    close_at = _idle_since(connection, started) + self.idle_grace
                    if now >= close_at:
                        connection.shutdown()  # not used for a while: not about to be
                    else:
                        idle_closes.append(close_at)
            for task in self.server_state.tasks - watched_tasks:  # a request ends: look again
                task.add_done_callback(lambda _: self.wake())
                watched_tasks.add(task)
            upcoming = [t for t in (*idle_closes, stream_deadline, deadline) if t > now]
            await self._wait(min([POLL, *(t - now for t in upcoming)]))
        if not self.force_exit:
            self.cut = await self.cancel_the_rest()
        self.control.offer(self.beat(), 1.0)  # the last second's counts, before exiting
        if self.request_metrics is not None:  # the last second's requests, too
            self.request_metrics.deliver(lambda message: self.control.offer(message, 1.0))
        promfiles.deliver(lambda message: self.control.offer(message, 1.0))
        lifespan = "skipped"
        if not self.force_exit:
            lifespan = await self.lifespan_shutdown()
        self.control.offer(
            {"t": "drained", "streams_ended": ended.count, "cut": self.cut, "lifespan": lifespan},
            1.0,
        )

    async def cancel_the_rest(self) -> int:
        """At the graceful timeout: cancel every request still running, close every
        connection left. Returns how many requests were cut."""
        tasks = [task for task in self.server_state.tasks if not task.done()]
        if tasks:
            logger.warning(
                "graceful timeout (%gs): cancelling %d request(s) still running",
                self.drain.graceful_timeout,
                len(tasks),
            )
        for task in tasks:
            task.cancel(msg="graceful timeout")
        if tasks:
            quiet = QuietCancellation()  # the warning above says it once, not a traceback each
            logger.addFilter(quiet)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CANCEL_WAIT):
                        await asyncio.wait(tasks)
            finally:
                logger.removeFilter(quiet)
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()
        return len(tasks)

    async def lifespan_shutdown(self) -> str:
        """The app's shutdown handlers, bounded: a hung one must not keep the worker."""
        try:
            async with asyncio.timeout(self.drain.shutdown_timeout):
                await self.lifespan.shutdown()
        except TimeoutError:
            logger.error(
                "application shutdown still running after %gs: exiting without it",
                self.drain.shutdown_timeout,
            )
            self.lifespan_timed_out = True
            return "timeout"
        return "done"
