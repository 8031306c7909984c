"""`--timeout-request-header`: connections that never finish their request headers (idle
ones, slowloris ones) are closed and counted; requests whose headers are in are not cut,
however slowly their body arrives or their answer leaves. Both HTTP implementations."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import free_port, get, try_get, wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.parametrize("http", ["h11", "httptools"])]

COUNTER = "asgi_supervise_header_timeouts_total"
HEAD = b"GET / HTTP/1.1\r\nHost: test\r\n"


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed `sock` (end of stream, or a reset)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(4096) == b""
    except OSError:
        return True


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with a Content-Length body: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "closed inside a response body"
        body += chunk
    return int(head.split()[1]), body


@contextlib.contextmanager
def trickling(socks: list[socket.socket]) -> Iterator[None]:
    """A slowloris client: one more header byte on each socket every 0.1 s, never the end."""
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.1):
            for sock in socks:
                with contextlib.suppress(OSError):  # closed by the server: what tests await
                    sock.send(b"a")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def counted(mport: int) -> float:
    status, body = get(mport, "/metrics")
    assert status == 200
    match = re.search(rf"^{COUNTER} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else -1


def test_idle_and_slowloris_connections_are_closed_and_counted(supervisor: Any, http: str):
    mport = free_port()
    server = supervisor(
        "bodyapp:app", "--workers", "1", "--http", http, "--limit-concurrency", "10",
        "--timeout-request-header", "1", "--metrics", "--metrics-port", str(mport),
    )  # fmt: skip
    server.wait_ready()
    kept_alive = [connect(server.port) for _ in range(5)]
    for sock in kept_alive:  # one whole request, then the next one's headers never end
        sock.sendall(HEAD + b"\r\n")
        assert read_response(sock) == (200, b"0")
        sock.sendall(HEAD)  # a byte: uvicorn's keep-alive timer is off
    idle = [connect(server.port) for _ in range(30)]
    slowloris = [connect(server.port) for _ in range(30)]
    for sock in slowloris:
        sock.sendall(HEAD + b"X-Slow: ")  # the headers never end
    every = idle + slowloris + kept_alive
    try:
        with trickling(slowloris + kept_alive):
            wait_until(
                lambda: all(closed_by_server(sock) for sock in every),
                30,
                lambda: (
                    f"{sum(not closed_by_server(s) for s in every)} sockets still open\n"
                    + server.log()
                ),
            )
        wait_until(lambda: try_get(server.port, "/") == (200, "0"), 10, "a 200 afterwards")
        assert [get(server.port, "/")[0] for _ in range(20)] == [200] * 20
        wait_until(lambda: counted(mport) == len(every), 10, lambda: f"{len(every)} counted")
    finally:
        for sock in every:
            sock.close()


def test_without_the_timeout_idle_connections_fill_the_concurrency_limit(
    supervisor: Any, http: str
):
    """Why the timeout exists: uvicorn itself never closes a connection that sends nothing."""
    server = supervisor(
        "bodyapp:app", "--workers", "1", "--http", http, "--limit-concurrency", "10",
        "--timeout-request-header", "3600",
    )  # fmt: skip
    server.wait_ready()
    idle = [connect(server.port) for _ in range(30)]
    try:
        wait_until(lambda: try_get(server.port, "/") == (503, "Service Unavailable"), 10, "503")
        assert not any(closed_by_server(sock) for sock in idle)
    finally:
        for sock in idle:
            sock.close()


def test_slow_bodies_and_slow_answers_are_not_cut(supervisor: Any, http: str):
    mport = free_port()
    server = supervisor(
        "bodyapp:app", "--workers", "1", "--http", http, "--limit-concurrency", "10",
        "--timeout-request-header", "1", "--metrics", "--metrics-port", str(mport),
    )  # fmt: skip
    server.wait_ready()
    answers: dict[str, Any] = {}

    def slow_answer() -> None:  # the app takes 3 s, three header timeouts
        answers["sleep"] = get(server.port, "/sleep?s=3", timeout=20)

    thread = threading.Thread(target=slow_answer)
    thread.start()
    upload = connect(server.port)
    try:
        upload.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 30\r\n\r\n")
        stop = threading.Event()
        for _ in range(30):  # one byte every 0.1 s: three header timeouts in all
            stop.wait(0.1)
            upload.sendall(b"x")
        assert read_response(upload) == (200, b"30")
        upload.sendall(HEAD + b"\r\n")  # and the connection is still there for the next one
        assert read_response(upload) == (200, b"0")
    finally:
        upload.close()
        thread.join(30)
    assert answers["sleep"] == (200, "0")
    assert counted(mport) == 0
