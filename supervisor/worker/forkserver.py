"""The fork server: imports the worker's machinery once, then forks workers on request.

Started by the master as ``python -m asgi_supervise.worker.forkserver``, one per code
generation; the first is forked from the master's first line instead (`adopted`), before
its imports, with no listeners: they come with its spec, which it waits for once the
machinery is imported. It imports uvicorn, its
protocols and loop, our worker modules and, with ``--preload``, the app; then it runs no
event loop and no thread, freezes what it holds out of the garbage collector's reach
(`gc.freeze`: collections in the workers do not write to the shared pages), and waits on
its channel for ``fork`` requests.

With ``--preload`` the spec also brings the channel of a *standby*: before it imports the
app, the fork server forks the next generation's fork server, which waits on that channel
with the machinery imported and no app, sharing its pages. A reload (new code) then
gives the standby its spec instead of starting an interpreter: the new code's import is
all that is left to wait for.

Each request carries the worker's end of a fresh control channel (SCM_RIGHTS). The fork
server forks twice: the middle process reports the worker's pid on the fork server's
channel and exits at once, so the worker is re-parented to the master (a child
subreaper). The master then waits for it, and sees its exit and status, exactly as for an
exec'd worker, and a fork server that dies leaves its workers serving. The worker asks
for SIGKILL on the master's death only once its parent is the master.

Like every worker module it imports nothing of the master, the settings model or observe.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any, NoReturn

from asgi_supervise.prctl import PR_SET_NAME, prctl
from asgi_supervise.protocol import SPEC_BYTES, Control, decode, encode, readable
from asgi_supervise.worker.__main__ import run
from asgi_supervise.worker.boot import boot_error, die_with_master

# What every worker imports before it serves, besides the protocols its settings name.
MACHINERY = (
    "uvicorn.config", "uvicorn.server", "uvicorn.lifespan.on", "uvicorn.loops.auto",
    "uvicorn.loops.asyncio", "uvicorn.loops.uvloop", "uvloop", "httptools",
    "uvicorn.middleware.proxy_headers", "asgi_supervise.worker.server",
    "asgi_supervise.worker.meter", "asgi_supervise.worker._meter",
    "asgi_supervise.worker.forwarded", "asgi_supervise.worker.apploader", "asyncio",
    "asgi_supervise.worker.promfiles", "faulthandler", "resource",
    # The protocols of the default settings (`--http auto`, `--ws auto`), before the spec
    # says which: the fork server started early imports them while the master starts.
    "uvicorn.protocols.http.auto", "uvicorn.protocols.websockets.auto",
)  # fmt: skip
NAME = b"asgi-forkserver"  # its name in ps and top (comm), and its workers' name:
WORKER_NAME = b"asgi-worker"  # they share its command line
STANDBY_NAME = b"asgi-standby"  # the next generation's fork server, until its spec
MAX_LISTENERS = 64  # descriptors a spec may carry
REPARENT_WAIT = 5.0  # seconds a worker waits to be handed to the master before giving up


def _set_name(name: bytes) -> None:
    """This process's name (comm) in ps and top."""
    prctl(PR_SET_NAME, name)


def _import(names: Iterable[str]) -> None:
    """What the workers would import, so they start with it loaded and share its pages.
    A name that is missing (an optional extra) is skipped: the worker reports it."""
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _protocols(settings: Any) -> list[str]:
    """The modules of the HTTP and WebSocket protocols the settings choose."""
    import uvicorn.config

    chosen = (
        uvicorn.config.HTTP_PROTOCOLS.get(settings.http),
        uvicorn.config.WS_PROTOCOLS.get(settings.ws),
    )
    return [spec.partition(":")[0] for spec in chosen if spec]


def _configure_logging(settings: Any) -> None:
    """The workers' logging, set up once here: a worker forked with it does not set it up
    again (`logs.configure`), and the app imported under `--preload` logs as they do."""
    from asgi_supervise import logs

    s = settings
    logs.configure(s.log_format, s.log_level, s.access_log, s.log_file, s.use_colors, s.log_config)


def _preload(control: Control, settings: Any) -> None:
    """Import the app here: once for every worker this fork server starts."""
    from asgi_supervise.worker import apploader, promfiles

    s = settings
    promfiles.install()  # before the app imports prometheus_client, as in a worker
    try:
        apploader.load(s.app or "", s.app_dir, s.factory)
    except Exception as exc:
        boot_error(control, exc)


def _receive(channel: socket.socket, max_fds: int) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors it carries; ({}, []) once the master is gone."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(channel, SPEC_BYTES, max_fds)
    except OSError:
        return {}, []
    for fd in fds:
        os.set_inheritable(fd, False)  # the app's own children must not hold them
    return (decode(data), fds) if data else ({}, fds)


def _become_worker(
    channel: socket.socket,
    control_fd: int,
    listeners: list[socket.socket],
    master_pid: int,
    middle: int,
) -> NoReturn:
    """The forked worker: wait to be the master's child, then the same path as an exec'd
    worker. Never returns into the fork server's loop."""

    def body() -> None:
        channel.close()
        _set_name(WORKER_NAME)
        os.setpgid(0, 0)  # its own process group, as the master gives an exec'd worker
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _wait_for_master(middle, master_pid)
        # `random` re-seeds itself in a forked child (os.register_at_fork); uvicorn installs
        # the worker's signal handlers and starts its own event loop in `run`.
        run(Control(socket.socket(fileno=control_fd)), listeners)

    _exit_after(body)


def _exit_after(body: Callable[[], None]) -> NoReturn:
    """Run `body`, then end this forked process the way an interpreter ends: with
    SystemExit's code (its message printed), or 1 and the traceback; atexit handlers run
    (logging flushes)."""
    code: Any = 0
    try:
        body()
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        os._exit(code)


def _become_standby(
    channel: socket.socket,
    control_fd: int,
    listeners: list[socket.socket],
    master_pid: int,
    middle: int,
) -> None:
    """The next generation's fork server, forked before this one's spec took effect:
    wait to be the master's child, then for a spec of its own. Never returns."""
    try:
        _set_name(STANDBY_NAME)  # at once: ps must not show two fork servers
        channel.close()
        for listener in listeners:
            listener.close()  # its own come with its spec
        _wait_for_master(middle, master_pid)
        serve(socket.socket(fileno=control_fd), None, STANDBY_NAME)
    except BaseException:
        traceback.print_exc()
    os._exit(1)


def _wait_for_master(middle: int, master_pid: int) -> None:
    """Until the middle process has exited and we are the master's child (at most
    REPARENT_WAIT), then die with the master; exits if it is not our parent by then."""
    deadline = time.monotonic() + REPARENT_WAIT
    while os.getppid() == middle and time.monotonic() < deadline:
        time.sleep(0.0002)  # the middle process exits right after reporting our pid
    die_with_master(master_pid)


def _fork(
    channel: socket.socket,
    request: dict[str, Any],
    control_fd: int,
    listeners: list[socket.socket],
    master_pid: int,
    standby: bool = False,
) -> int | None:
    """Fork a worker (or, `standby`, the next fork server) through a middle process, which
    reports its pid and exits: it is re-parented to the master. Returns the middle
    process's pid, for `_reap` (None if the fork failed)."""
    gc.freeze()  # whatever the fork server holds now stays out of the workers' collections
    slot = request.get("slot")
    try:
        middle = os.fork()
    except OSError as exc:
        channel.send(encode({"t": "fork_failed", "slot": slot, "error": str(exc)}))
        os.close(control_fd)
        return None
    if middle == 0:
        try:
            middle_pid = os.getpid()
            pid = os.fork()
            if pid == 0:
                become = _become_standby if standby else _become_worker
                become(channel, control_fd, listeners, master_pid, middle_pid)
            answer = {"t": "standby", "pid": pid} if standby else {"t": "forked", "pid": pid}
            channel.send(encode({**answer, "slot": slot}))
            os._exit(0)
        except BaseException as exc:
            try:
                channel.send(encode({"t": "fork_failed", "slot": slot, "error": str(exc)}))
            finally:
                os._exit(1)
    os.close(control_fd)
    return middle


def _reap(middles: list[int | None], channel: socket.socket) -> None:
    """Wait for the middle processes once no request is queued: a batch of requests (the
    first workers, a scale-up) is forked without waiting for each middle process in turn,
    and none is left a zombie while the fork server waits."""
    if middles and not readable(channel):  # no request queued
        for pid in filter(None, middles):
            os.waitpid(pid, 0)
        middles.clear()


def serve(
    channel: socket.socket, listeners: list[socket.socket] | None, name: bytes = NAME
) -> None:
    """Import, take the spec, preload, then fork on request until the channel closes.

    `listeners` is None for the fork server forked before the master's imports (it
    imports the machinery while the master reads its settings) and for a standby: both get
    the listeners, and the environment the master adds, with the spec.
    """
    _set_name(name)
    control = Control(channel)
    _import(MACHINERY)
    spec, fds = _receive(channel, MAX_LISTENERS + 1)
    if not spec:
        os._exit(0)  # the master is gone, or did not need us
    if name != NAME:
        _set_name(NAME)
    master_pid = spec["master_pid"]
    die_with_master(master_pid)
    standby = fds.pop() if spec.get("standby") else None
    if listeners is None:
        listeners = [socket.socket(fileno=fd) for fd in fds]
    middles = []
    if standby is not None:  # before the spec takes effect: no environment, no app
        middles.append(_fork(channel, {}, standby, listeners, master_pid, standby=True))
    os.environ.update(spec.get("env") or {})
    settings = SimpleNamespace(**spec["settings"])
    _import(_protocols(settings))
    _configure_logging(settings)
    if settings.preload:
        _preload(control, settings)
    gc.freeze()
    control.send("ready", preloaded=bool(settings.preload))
    while True:
        _reap(middles, channel)
        request, fds = _receive(channel, 1)
        if not fds:
            if not request:
                os._exit(0)  # the master closed the channel: it is gone or retiring us
            continue
        if request.get("t") == "fork":
            middles.append(_fork(channel, request, fds[0], listeners, master_pid))
        else:
            os.close(fds[0])


def adopted(channel: socket.socket, master_pid: int) -> NoReturn:
    """The first fork server, forked from the master's first line (`launch`): it dies with
    the master, serves, and ends as an exec'd one would. Never returns."""

    def body() -> None:
        _set_name(NAME)  # at once: ps must not show it as a second master
        die_with_master(master_pid)
        channel.set_inheritable(False)
        serve(channel, None)

    _exit_after(body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="asgi-supervise fork server")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--socket-fds", required=True)
    parser.add_argument("--master-pid", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_master(args.master_pid)
    channel = socket.socket(fileno=args.control_fd)
    listeners = [socket.socket(fileno=int(fd)) for fd in args.socket_fds.split(",")]
    for sock in (channel, *listeners):
        sock.set_inheritable(False)
    serve(channel, listeners)


if __name__ == "__main__":
    main()
