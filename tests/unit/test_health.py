"""The master's health server: real HTTP over loopback, inside one asyncio loop."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from asgi_supervise.observe.health import HealthApp, HealthServer, readiness, start_server

STATUS = {"workers": [{"slot": 1, "pid": 1234, "state": "ready"}], "plan": {"workers": 1}}


class Master:
    """Provider functions the way the arbiter will hand them over."""

    def __init__(self) -> None:
        self.ready: tuple[bool, str] = (True, "1 of 1 ready")
        self.accepts: list[str | None] = []

    def status(self) -> dict[str, Any]:
        return STATUS

    def readiness(self) -> tuple[bool, str]:
        return self.ready

    def metrics(self, accept: str | None) -> tuple[bytes, str]:
        self.accepts.append(accept)
        return b"# metrics\n", "text/plain; version=0.0.4; charset=utf-8"

    def app(self) -> HealthApp:
        return HealthApp(self.status, self.readiness, self.metrics)


def run(test: Callable[[HealthServer, httpx.AsyncClient], Awaitable[None]], app: Any) -> None:
    async def main() -> None:
        server = await start_server(app, "127.0.0.1", 0)
        try:
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                await test(server, client)
        finally:
            await server.stop()

    asyncio.run(main())


def test_endpoints() -> None:
    master = Master()

    async def check(server: HealthServer, client: httpx.AsyncClient) -> None:
        assert server.port > 0
        live = await client.get("/livez")
        assert (live.status_code, live.text) == (200, "ok\n")
        assert live.headers["content-type"].startswith("text/plain")
        assert live.headers["cache-control"] == "no-store"

        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        master.ready = (False, "draining")
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json() == {"ready": False, "reason": "draining"}
        assert not_ready.headers["content-type"] == "application/json"

        status = await client.get("/status")
        assert (status.status_code, status.json()) == (200, STATUS)

        metrics = await client.get("/metrics", headers={"accept": "application/openmetrics-text"})
        assert metrics.status_code == 200
        assert metrics.text == "# metrics\n"
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert master.accepts == ["application/openmetrics-text"]

        head = await client.head("/livez")
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "3")

        missing = await client.get("/")
        assert missing.status_code == 404
        post = await client.post("/readyz")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"

    run(check, master.app())


def test_the_date_header_is_renewed_every_second() -> None:
    """The server runs without uvicorn's 10 Hz main loop; its Date header must still move."""

    async def check(server: HealthServer, client: httpx.AsyncClient) -> None:
        first = (await client.get("/livez")).headers["date"]
        assert parsedate_to_datetime(first).timestamp() == pytest.approx(time.time(), abs=10)
        deadline = time.monotonic() + 15  # a deadline, not a measure: it moves once a second
        while (await client.get("/livez")).headers["date"] == first:
            assert time.monotonic() < deadline, f"the Date header stayed {first!r}"
            await asyncio.sleep(0.05)

    run(check, Master().app())


def test_a_failing_provider_answers_500_and_the_server_lives_on() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("bug")

    master = Master()
    app = HealthApp(broken, master.readiness, master.metrics)

    async def check(server: HealthServer, client: httpx.AsyncClient) -> None:
        assert (await client.get("/status")).status_code == 500
        assert (await client.get("/livez")).status_code == 200

    run(check, app)


def test_port_in_use_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            with pytest.raises(OSError) as caught:
                await start_server(Master().app(), "127.0.0.1", port)
            assert caught.value.errno == errno.EADDRINUSE
            assert f"127.0.0.1:{port}" in str(caught.value)

        asyncio.run(main())


def test_stop_closes_the_listening_socket() -> None:
    async def main() -> int:
        server = await start_server(Master().app(), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")  # keep-alive, left open
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(server.stop(), 5)
        await server.stop()  # twice is fine
        await asyncio.wait_for(reader.read(), 5)  # reaches EOF: the server closed it
        writer.close()
        return server.port

    port = asyncio.run(main())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with socket.socket() as again:  # no listener holds the port (TIME_WAIT may remain)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_the_server_leaves_the_loop_usable() -> None:
    """No signal handlers taken, no thread: the master's loop carries on afterwards."""
    import signal

    def handlers() -> tuple[Any, ...]:
        return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    async def main() -> None:
        before = handlers()
        server = await start_server(Master().app(), "127.0.0.1", 0)
        assert handlers() == before
        await server.stop()
        await asyncio.sleep(0)

    asyncio.run(main())


def test_lifespan_is_answered() -> None:
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Any:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(Master().app()({"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.parametrize(
    ("draining", "ready", "workers", "min_ready", "verdict"),
    [
        (False, 2, 2, 2, (True, "2 of 2 ready")),
        (False, 1, 2, 2, (False, "1 of 2 workers ready, need 2")),
        (True, 2, 2, 1, (False, "draining")),
        (False, 0, 1, 1, (False, "0 of 1 worker ready, need 1")),
    ],
)
def test_readiness_reasons(
    draining: bool, ready: int, workers: int, min_ready: int, verdict: tuple[bool, str]
) -> None:
    assert readiness(draining, ready, workers, min_ready) == verdict


def test_status_is_json_even_with_odd_values() -> None:
    master = Master()
    app = HealthApp(lambda: {"dir": Path("/tmp/x"), "n": 1.5}, master.readiness, master.metrics)

    async def check(server: HealthServer, client: httpx.AsyncClient) -> None:
        response = await client.get("/status")
        assert json.loads(response.text) == {"dir": "/tmp/x", "n": 1.5}

    run(check, app)
