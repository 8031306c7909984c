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
from asgi_supervise.drain import CANCEL_WAIT, DrainTimes
from asgi_supervise.protocol import Control, Exit
from asgi_supervise.worker import promfiles
from asgi_supervise.worker.headers import HeaderTimeout
from asgi_supervise.worker.meter import RequestMetrics
from asgi_supervise.worker.streams import StreamEnder
from asgi_supervise.worker.uvicorn_options import PASSED_AS_IS

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings

logger = logging.getLogger("uvicorn.error")

TICK = 0.1  # seconds between uvicorn's ticks (its date header, our heartbeat, max requests)
HEARTBEAT_TICKS = 10  # beat once a second
POLL = 0.05  # seconds between looks at the connections while draining, if nothing wakes us
REPORT_GAP = 0.02  # new connections are reported at most this often (the master balances)


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


class _QuietCancellation(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for requests we cancelled."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


class WorkerServer(uvicorn.Server):
    """uvicorn's server, told what to do by the master (`_on_control`), reporting to it
    (`beat`), and woken the moment it is told to stop: uvicorn looks at `should_exit` only
    at its next 0.1 s tick, and its drain polls the connections every 0.1 s too; in a
    rolling reload each old worker's drain is on the path to the next replacement."""

    _wakeup: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _should_exit = False
    _force_exit = False

    def __init__(
        self,
        config: uvicorn.Config,
        control: Control,
        idle_grace: float,
        drain: DrainTimes | None = None,
        header_timeout: float | None = None,
    ):
        super().__init__(config)
        self.control = control
        self.idle_grace = idle_grace
        self.drain = drain or DrainTimes(0.0, 0.5, 15.0, 5.0)
        self.reopen_logs = False
        self.request_metrics: RequestMetrics | None = None  # when --metrics is on
        # --timeout-request-header; None: never
        self.header_timeout = None if header_timeout is None else HeaderTimeout(header_timeout)
        self.cut = 0  # requests still running at the graceful timeout: cancelled
        self.lifespan_timed_out = False  # the app's shutdown outran --shutdown-timeout
        self.paused = False  # the master asked us to stop accepting (we hold more than our share)
        self._listeners: list[socket.socket] = []  # our own copies, to accept again after a pause
        self._inherited: list[socket.socket] = []  # the master's listeners, until serving
        self._last_connections = -1
        self.report_connections = False  # the master balances: tell it of new ones at once
        self._report: asyncio.TimerHandle | None = None
        self._reported_at = 0.0

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value:
            self.wake()

    @property  # type: ignore[override]
    def force_exit(self) -> bool:
        return self._force_exit

    @force_exit.setter
    def force_exit(self, value: bool) -> None:
        self._force_exit = value
        if value:
            self.wake()

    def wake(self) -> None:
        """End the current wait (a tick, or a drain's look at the connections) now. Safe
        from a signal handler: the event is set from the loop."""
        if self._loop is not None and self._wakeup is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def _wait(self, timeout: float) -> None:
        """Until `wake` or `timeout` seconds, whichever comes first."""
        assert self._wakeup is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        self._wakeup.clear()

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        # Our own list: a drain before the server started empties it (`drop_listeners`),
        # and uvicorn's startup, which reads it only after the lifespan startup, then
        # serves nothing.
        self._inherited = list(sockets or [])
        super().run(sockets=self._inherited)
        if self.cut or self.lifespan_timed_out:  # how the master tells an unclean drain
            raise SystemExit(Exit.UNCLEAN)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """SIGTERM drains, SIGQUIT stops now. SIGINT is the master's: it decides for us."""

        def drain(*_: Any) -> None:
            self.should_exit = True
            if not hasattr(self, "servers"):  # uvicorn has not begun to serve them yet
                self.drop_listeners()

        def stop_now(*_: Any) -> None:
            self.should_exit = self.force_exit = True

        def reopen(*_: Any) -> None:
            self.reopen_logs = True  # done from the loop, not inside a handler mid-write

        signal.signal(signal.SIGUSR1, reopen)
        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGQUIT, stop_now)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        await super().serve(sockets)

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
        if sockets is not None and len(sockets) == len(self.servers):
            self._listeners = [sock.dup() for sock in sockets]
        if self.report_connections:
            self._watch_connections()
        if self.should_exit:  # drained while starting: it never serves, so it is not ready
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(self.control.sock.fileno(), self._on_control)
        metrics = self.request_metrics
        self.control.send("ready", meter=metrics and type(metrics.meter).__qualname__)

    def drop_listeners(self) -> None:
        """Told to drain before serving (its lifespan is still starting): close our copies
        of the listeners now. A copy kept while the app starts would keep the port queueing
        new connections nobody accepts, where the kernel should refuse them."""
        for sock in self._inherited:
            sock.close()
        self._inherited.clear()

    # --- what the master says ---------------------------------------------------------

    def _on_control(self) -> None:
        messages, eof = self.control.poll()
        if eof:  # a dead master's PR_SET_PDEATHSIG ends us; a live one closed it: not wanted
            asyncio.get_running_loop().remove_reader(self.control.sock.fileno())
            self.should_exit = True
        for message in messages:
            kind = message.get("t")
            if kind == "pause" and not self.should_exit:
                self.pause_accepting()
            elif kind == "resume" and not self.should_exit:
                asyncio.get_running_loop().create_task(self.resume_accepting())

    def _watch_connections(self) -> None:
        """Report a new connection within REPORT_GAP, not at the next tick: a burst of
        sequential connections lands on one worker within a tick otherwise."""
        self._watched().on_add = self._connection_added

    def _watched(self) -> _Connections:
        """uvicorn's set of open connections, replaced by one that tells us of changes."""
        old = self.server_state.connections
        if isinstance(old, _Connections):
            return old
        watched = _Connections(old)
        for connection in old:  # protocols keep a reference to the set they were made with
            connection.connections = watched
        self.server_state.connections = watched
        return watched

    def _connection_added(self) -> None:
        if self._report is not None or self.should_exit:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._reported_at + REPORT_GAP - loop.time())
        self._report = loop.call_later(delay, self._report_connections)

    def _report_connections(self) -> None:
        self._report = None
        self._reported_at = asyncio.get_running_loop().time()
        connections = len(self.server_state.connections)
        if connections != self._last_connections:
            self._last_connections = connections
            beat = {"requests": self.server_state.total_requests, "connections": connections}
            self.control.offer({"t": "beat", **beat})

    def pause_accepting(self) -> None:
        """Stop taking connections from the shared queue; the other workers take them.

        Only this process's listening descriptors close: the socket, and every connection
        waiting in its queue, stay with the master's and the other workers' copies (unlike
        SO_REUSEPORT, where a closing socket's queue is lost)."""
        if self.paused or not self._listeners:
            return
        self.paused = True
        for server in self.servers:
            server.close()

    async def resume_accepting(self) -> None:
        if not self.paused or self.should_exit:
            return
        self.paused = False
        config, loop = self.config, asyncio.get_running_loop()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        servers = []
        for listener in self._listeners:
            server = await loop.create_server(
                create_protocol, sock=listener.dup(), ssl=config.ssl, backlog=config.backlog
            )
            servers.append(server)
        if self.should_exit or self.paused:  # drained or paused again meanwhile
            for server in servers:
                server.close()
            return
        self.servers = servers

    async def main_loop(self) -> None:
        """uvicorn's, but a tick is cut short by `wake`: a drain starts when it is asked for."""
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            await self._wait(TICK)
            should_exit = await self.on_tick(counter)

    async def on_tick(self, counter: int) -> bool:
        if self.reopen_logs:
            self.reopen_logs = False
            logs.reopen()
        if self.request_metrics is not None:
            self.request_metrics.fold()  # every tick, so no one fold stalls the loop long
        if self.header_timeout is not None:
            now = asyncio.get_running_loop().time()
            self.header_timeout.check(self.server_state.connections, now)
        connections = len(self.server_state.connections)
        if counter % HEARTBEAT_TICKS == 0 or connections != self._last_connections:
            # Once a second, and within a tick of a change: the master balances on it.
            self._last_connections = connections
            self.control.offer(self.beat())  # a missed beat: the next one counts
        if counter % HEARTBEAT_TICKS == 0:
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
            "header_timeouts": 0 if self.header_timeout is None else self.header_timeout.closed,
        }

    # --- draining -----------------------------------------------------------------------

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
        http = self.config.http_protocol_class  # the one in use: h11 is not imported otherwise
        for connection in list(self.server_state.connections):
            if isinstance(connection, http):
                connection.app = ClosingApp(connection.app)  # its next request: close after
                if connection.cycle is not None and not connection.cycle.response_complete:
                    connection.cycle.keep_alive = False
            else:
                connection.shutdown()  # WebSockets: close 1012 (service restart)

        ended = StreamEnder(http)
        stream_deadline = started + self.drain.stream_grace
        deadline = started + self.drain.graceful_timeout
        self._watched().on_remove = self.wake  # a connection closed: maybe the last one
        watched_tasks: set[asyncio.Task[Any]] = set()
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            now = loop.time()
            if now >= deadline:
                break
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
            quiet = _QuietCancellation()  # the warning above says it once, not a traceback each
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


class _Connections(set):  # type: ignore[type-arg]
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
