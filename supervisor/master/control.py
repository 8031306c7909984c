"""The control socket: `asgi-supervise status | reload | scale | stop` talk to the master here.

A Unix socket only (mode 0600, the master's user; never TCP), one request per connection,
newline-delimited JSON: ``{"command": "status"}`` is answered with ``{"ok": true,
"result": {...}}`` or ``{"ok": false, "error": "one line"}``. The server only parses and
queues: the arbiter's loop runs each command (`Arbiter.queue_command`), like a signal, so
the worker table keeps one owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asgi_supervise.master.arbiter import Arbiter

log = logging.getLogger("asgi_supervise.master")

COMMANDS = ("status", "reload", "scale", "stop", "config")
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request line


class ControlError(Exception):
    """A control request the master refuses; its message goes back to the client."""


def runtime_dir() -> Path:
    """Where masters without a pid file or a --control-socket put their socket:
    ``$XDG_RUNTIME_DIR/asgi-supervise`` (per user, on tmpfs), else a per-user directory
    in the temp dir (``/tmp/asgi-supervise-UID``)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg, "asgi-supervise")
    return Path(tempfile.gettempdir(), f"asgi-supervise-{os.getuid()}")


def path_for_pid_file(pid_file: str) -> str:
    """`app.pid` -> `app.sock`, beside it: scripts that know one know the other."""
    path = Path(pid_file)
    if path.suffix == ".sock":
        return str(path) + ".ctl"
    return str(path.with_suffix(".sock"))


def socket_path(control_socket: str | None, pid_file: str | None, pid: int) -> str:
    if control_socket:
        return control_socket
    if pid_file:
        return path_for_pid_file(pid_file)
    return str(runtime_dir() / f"master-{pid}.sock")


def _private_dir(directory: Path) -> None:
    """Create our runtime directory 0700; refuse one another user owns (a shared /tmp)."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(f"{directory} is not a directory owned by uid {os.getuid()}")


def _bind(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 from the start (umask, then chmod)."""
    if os.path.exists(path) or os.path.islink(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by a master that was killed
        else:
            raise OSError(f"{path}: another master is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def remove_stale(directory: Path) -> None:
    """Sockets of masters that were killed (SIGKILL leaves them): their pid is gone."""
    for path in directory.glob("master-*.sock"):
        pid = path.stem.removeprefix("master-")
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
        except (PermissionError, OverflowError):
            continue


def peer_uid(sock: socket.socket | None) -> int | None:
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlServer:
    def __init__(self, arbiter: Arbiter, path: str):
        self.arbiter = arbiter
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.closed = asyncio.Event()  # the master is about to exit: `stop` clients are told

    async def start(self) -> None:
        if not self.path.startswith("/") and not self.path.startswith("."):
            self.path = os.path.abspath(self.path)
        try:
            if self.path.startswith(str(runtime_dir())):
                _private_dir(Path(self.path).parent)
                remove_stale(Path(self.path).parent)
            sock = _bind(self.path)
        except OSError as exc:
            raise OSError(f"--control-socket {self.path}: cannot listen: {exc}") from None
        self.server = await asyncio.start_unix_server(self.serve, sock=sock, limit=MAX_REQUEST)
        log.info("control socket %s (asgi-supervise status | reload | scale | stop)", self.path)

    async def stop(self) -> None:
        """Remove the socket; connections still open (`stop` waiting) end with the master."""
        if self.server is not None:
            self.server.close()
            self.server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.closed.set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid is not None and uid not in (os.getuid(), 0):
                await self.reply(writer, error=f"refused: uid {uid} is not the master's user")
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):  # a silent client holds nothing
                    line = await reader.readline()
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as exc:
                await self.reply(writer, error=f"bad request: {exc}")
                return
            command = request.get("command")
            if command not in COMMANDS:
                await self.reply(writer, error=f"unknown command {command!r}")
                return
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.arbiter.queue_command(command, request, future)
            try:
                result = await future
            except ControlError as exc:
                await self.reply(writer, error=str(exc))
                return
            await self.reply(writer, result=result)
            if command == "stop":  # the connection ends when the master does
                await self.closed.wait()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def reply(
        writer: asyncio.StreamWriter, result: Any = None, error: str | None = None
    ) -> None:
        message = {"ok": False, "error": error} if error else {"ok": True, "result": result}
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
