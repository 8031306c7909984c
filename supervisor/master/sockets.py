"""Binding the listening sockets once, in the master, before any worker exists."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import MutableMapping

from asgi_supervise.config.values import Values
from asgi_supervise.master.interpreter import SOCKET_ACTIVATION


class BindError(Exception):
    """The address cannot be served: printed as one line naming `setting`, exit code 2."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting  # the one to change: "port", "host", "uds", "fd", ...


_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied",
    errno.EADDRNOTAVAIL: "address not available on this machine",
}


def _reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0, exc.strerror or str(exc))


def bind(settings: Values) -> list[socket.socket]:
    """The listening sockets, not inheritable: `workers.spawn` passes them to each worker
    (pass_fds), and nothing else the master starts may hold the port."""
    activated = from_systemd(os.environ)
    if activated:
        return activated
    if settings.fd is not None:
        return [_from_fd(settings.fd)]
    if settings.uds:
        return [_bind_unix(settings.uds, settings.backlog)]
    return [_bind_tcp(settings.host, settings.port, settings.backlog)]


def check_free(host: str, port: int, what: str, prefix: str = "") -> None:
    """Bind and release `host:port`, so a busy port fails before any worker exists.

    `prefix` names the settings (`metrics_` for the metrics server's). Port 0 is always free.
    """
    if port == 0:
        return
    _bind_tcp(host, port, 1, what, prefix).close()


def listen_tcp(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket; OSError (socket.gaierror for a bad host) if it cannot be."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_tcp(
    host: str, port: int, backlog: int, what: str = "bind", prefix: str = ""
) -> socket.socket:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = listen_tcp(host, port, backlog)
    except socket.gaierror as exc:
        message = f"cannot {what} {where}: unknown host ({exc.strerror})"
        raise BindError(message, prefix + "host") from None
    except OSError as exc:
        at_fault = "host" if exc.errno == errno.EADDRNOTAVAIL else "port"
        raise BindError(f"cannot {what} {where}: {_reason(exc)}", prefix + at_fault) from None
    sock.set_inheritable(False)
    return sock


def _bind_unix(path: str, backlog: int) -> socket.socket:
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise BindError(
                f"cannot bind unix socket {path}: a file that is not a socket is there", "uds"
            )
        if _socket_in_use(path):
            raise BindError(
                f"cannot bind unix socket {path}: another server is listening on it", "uds"
            )
        os.unlink(path)  # stale socket left by a killed server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind unix socket {path}: {_reason(exc)}", "uds") from None
    sock.set_inheritable(False)
    return sock


def _socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _from_fd(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(f"cannot use it: {_reason(exc)}", "fd") from None
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        raise BindError("it is not a listening socket", "fd")
    sock.set_inheritable(False)
    return sock


LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: systemd passes sockets from fd 3 on


def from_systemd(environ: MutableMapping[str, str]) -> list[socket.socket]:
    """The listening sockets systemd passed (socket activation, sd_listen_fds(3)).

    Used only when LISTEN_PID is this process: variables inherited from a parent that was
    itself activated are not for us. The variables are removed either way, so workers and
    anything the app spawns never see them. Each fd then goes the `--fd` way (checked to be
    a listening socket), and these sockets replace --host/--port, --uds and --fd: the
    socket unit decides the addresses, and systemd keeps them open across restarts.
    """
    count, pid = environ.get("LISTEN_FDS", ""), environ.get("LISTEN_PID", "")
    for name in SOCKET_ACTIVATION:
        environ.pop(name, None)
    if not (count.isdigit() and pid.isdigit()) or int(pid) != os.getpid():
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sockets.append(_from_fd(fd))
        except BindError as exc:
            message = f"socket activation passed fd {fd} (LISTEN_FDS={count}), but {exc}"
            raise BindError(message, exc.setting) from None
    return sockets


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def cleanup(sockets: list[socket.socket]) -> None:
    """Close our copies; remove the unix socket file we created."""
    for sock in sockets:
        if sock.fileno() < 0:
            continue
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            if path and os.path.exists(path):
                os.unlink(path)
        sock.close()
