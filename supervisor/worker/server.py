"""The worker's uvicorn server: readiness, heartbeats, the master's orders (drain: `draining`)."""

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
from asgi_supervise.drain import DrainTimes
from asgi_supervise.protocol import Control, Exit
from asgi_supervise.worker import promfiles
from asgi_supervise.worker.draining import Connections, Draining
from asgi_supervise.worker.headers import HeaderTimeout
from asgi_supervise.worker.meter import RequestMetrics
from asgi_supervise.worker.uvicorn_options import PASSED_AS_IS

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings

logger = logging.getLogger("uvicorn.error")

TICK = 0.1  # seconds between uvicorn's ticks (its date header, our heartbeat, max requests)
HEARTBEAT_TICKS = 10  # beat once a second
REPORT_GAP = 0.02  # new connections are reported at most this often (the master balances)


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


class _WakingFlag:
    """uvicorn's `should_exit` and `force_exit`: setting one wakes the server's loop."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = "_" + name

    def __get__(self, server: Any, owner: type | None = None) -> bool:
        return getattr(server, self.attribute, False)

    def __set__(self, server: Any, value: bool) -> None:
        setattr(server, self.attribute, value)
        if value:
            server.wake()


class WorkerServer(Draining, uvicorn.Server):
    """uvicorn's server, told what to do by the master (`_on_control`), reporting to it
    (`beat`), and woken the moment it is told to stop: uvicorn looks at `should_exit` only
    at its next 0.1 s tick, and its drain polls the connections every 0.1 s too; in a
    rolling reload each old worker's drain is on the path to the next replacement."""

    _wakeup: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    should_exit = _WakingFlag()  # type: ignore[assignment]
    force_exit = _WakingFlag()  # type: ignore[assignment]

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

    def _watched(self) -> Connections:
        """uvicorn's set of open connections, replaced by one that tells us of changes."""
        old = self.server_state.connections
        if isinstance(old, Connections):
            return old
        watched = Connections(old)
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
