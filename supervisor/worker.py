"""A worker process: one uvicorn server on the master's inherited socket.

Started by the master as ``python -m asgi_supervise.worker``. It knows only its control
channel (a SOCK_SEQPACKET socket to the master) and uvicorn: it reports *ready* once the
ASGI lifespan startup is done, beats from its event loop so a blocked loop is noticed,
and drains keep-alive connections without racing clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import faulthandler
import importlib
import json
import logging
import os
import resource
import signal
import socket
import sys
import traceback
from collections.abc import Generator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import uvicorn

from asgi_supervise import apploader, forwarded, logs
from asgi_supervise.httpmetrics import RequestMetrics

if TYPE_CHECKING:
    from asgi_supervise.settings import Settings

BOOT_FAILURE = 3  # exit code of a worker that never became ready
HEARTBEAT_TICKS = 10  # uvicorn ticks every 0.1 s: beat once a second
PR_SET_PDEATHSIG = 1


class Control:
    """The worker's end of the master's channel. Message boundaries come from SEQPACKET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive(self) -> dict[str, Any]:
        return json.loads(self.sock.recv(1 << 20))

    def send(self, kind: str, **fields: Any) -> None:
        """For what must arrive (ready, boot errors): may wait while the channel is full."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.send(json.dumps({"t": kind, **fields}).encode())

    def offer(self, message: dict[str, Any], timeout: float = 0.0) -> bool:
        """Send unless the channel stays full for `timeout`: the event loop never stalls
        on a busy or stopped master. False if the message was not sent."""
        data = json.dumps(message).encode()
        try:
            if timeout <= 0:
                self.sock.send(data, socket.MSG_DONTWAIT)
                return True
            self.sock.settimeout(timeout)
            try:
                self.sock.send(data)
            finally:
                self.sock.settimeout(None)
        except OSError:  # full, gone, or too large: the caller keeps what it offered
            return False
        return True


def _die_with_master(master_pid: int) -> None:
    """SIGKILL from the kernel when the master dies, so no worker outlives it."""
    if sys.platform == "linux":  # elsewhere only the parent check below protects us
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != master_pid:  # the master died before prctl took effect
        os._exit(1)


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
    def __init__(self, config: uvicorn.Config, control: Control, idle_grace: float):
        super().__init__(config)
        self.control = control
        self.idle_grace = idle_grace
        self.reopen_logs = False
        self.request_metrics: RequestMetrics | None = None  # when --metrics is on

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
            raise SystemExit(BOOT_FAILURE) from None
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
        if counter % HEARTBEAT_TICKS == 0:
            state = self.server_state
            beat = {"requests": state.total_requests, "connections": len(state.connections)}
            self.control.offer({"t": "beat", **beat})  # a missed beat: the next one counts
            if self.request_metrics is not None:  # after the beat: it may fill the channel
                self.request_metrics.deliver(self.control.offer)
        return await super().on_tick(counter)

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
        if self.request_metrics is not None:  # the last second's requests, before exiting
            self.request_metrics.deliver(lambda message: self.control.offer(message, 1.0))
        if not self.force_exit:
            await self.lifespan.shutdown()


def _is_idle(connection: Any) -> bool:
    return connection.cycle is None or connection.cycle.response_complete


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    s = settings
    return uvicorn.Config(
        app,
        loop=s.loop,
        http=s.http,
        http2=s.http2,
        interface=s.interface,
        reset_contextvars=s.reset_contextvars,
        ssl_version=s.ssl_version,
        ssl_cert_reqs=s.ssl_cert_reqs,
        ws=s.ws,
        ws_max_size=s.ws_max_size,
        ws_max_queue=s.ws_max_queue,
        ws_ping_interval=s.ws_ping_interval,
        ws_ping_timeout=s.ws_ping_timeout,
        ws_per_message_deflate=s.ws_per_message_deflate,
        lifespan=s.lifespan,
        env_file=s.env_file,
        log_config=None,  # run() configured logging already, the master's way
        log_level=s.log_level,
        access_log=s.access_log,
        use_colors=s.use_colors,
        proxy_headers=False,  # run() wraps the app in forwarded.proxy_headers instead
        server_header=s.server_header,
        date_header=s.date_header,
        root_path=s.root_path,
        limit_concurrency=s.limit_concurrency,
        backlog=s.backlog,
        timeout_keep_alive=int(s.timeout_keep_alive),
        ssl_keyfile=s.ssl_keyfile,
        ssl_certfile=s.ssl_certfile,
        ssl_keyfile_password=s.ssl_keyfile_password,
        ssl_ca_certs=s.ssl_ca_certs,
        ssl_ciphers=s.ssl_ciphers,
        headers=[tuple(h.split(":", 1)) for h in s.headers],  # type: ignore[misc]
        h11_max_incomplete_event_size=s.h11_max_incomplete_event_size,
    )


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the first frame of the user's code on: ours and importlib's are noise."""
    noise = (os.path.dirname(__file__), os.path.dirname(importlib.__file__), "<frozen importlib")
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(noise):
            break
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _boot_error(control: Control, exc: BaseException) -> None:
    control.send("boot_error", error=_user_traceback(exc))
    sys.exit(BOOT_FAILURE)


def run(control: Control, listeners: list[socket.socket]) -> None:
    spec = control.receive()
    _die_with_master(spec["master_pid"])
    faulthandler.enable()  # SIGABRT from the master's timeout shows where the loop was stuck
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ... without leaving a core file
    # Validated by the master already: plain values keep pydantic (and ~20 MB) out of workers.
    settings = cast("Settings", SimpleNamespace(**spec["settings"]))
    s = settings
    logs.configure(s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config)

    try:
        app = apploader.load(settings.app or "", settings.app_dir, settings.factory)
    except Exception as exc:
        _boot_error(control, exc)
    config = uvicorn_config(app, settings)
    try:
        config.load()
    except Exception as exc:
        _boot_error(control, exc)
    if settings.proxy_headers:  # outermost, where uvicorn puts its own
        config.loaded_app = forwarded.proxy_headers(config.loaded_app, settings.forwarded_allow_ips)
    idle_grace = min(settings.timeout_keep_alive, settings.graceful_timeout)
    server = WorkerServer(config, control, idle_grace)
    if settings.metrics and settings.request_metrics:
        server.request_metrics = RequestMetrics(config.loaded_app)
        config.loaded_app = server.request_metrics.meter  # served directly: no extra call
    server.run(sockets=listeners)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="asgi-supervise worker")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--socket-fds", required=True)
    args = parser.parse_args(argv)
    control = Control(socket.socket(fileno=args.control_fd))
    listeners = [socket.socket(fileno=int(fd)) for fd in args.socket_fds.split(",")]
    run(control, listeners)


if __name__ == "__main__":
    main()
