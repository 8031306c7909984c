"""A bounded keep-alive load generator that counts every failure.

Clients reuse their connection like urllib3 or nginx do (a connection the server closed
while idle is not reused; `Connection: close` is obeyed), so any failure counted here
is one a real client would have seen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Stats:
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    pids: collections.Counter[int] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail}")


class Connection:
    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def usable(self) -> bool:
        """False when the server closed the connection while it was idle (urllib3's check)."""
        return self.reader is not None and not self.reader.at_eof() and not self.reader._buffer

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def get(self, path: str, timeout: float) -> tuple[int, bytes, bool]:
        if not self.usable():
            await self.close()
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), timeout
            )
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        body = await asyncio.wait_for(
            self.reader.readexactly(int(headers.get("content-length", "0"))), timeout
        )
        return status, body, headers.get("connection", "").lower() == "close"


async def _client(port: int, path: str, interval: float, stop: threading.Event, stats: Stats):
    conn = Connection(port)
    next_at = time.monotonic()
    while not stop.is_set():
        reused = conn.usable()
        try:
            status, body, closing = await conn.get(path, timeout=5.0)
        except ConnectionRefusedError as exc:
            stats.fail("refused", str(exc))
            await conn.close()
        except (ConnectionResetError, BrokenPipeError) as exc:
            stats.fail("reset" + (" (reused)" if reused else ""), str(exc))
            await conn.close()
        except asyncio.IncompleteReadError as exc:
            stats.fail("closed without response" + (" (reused)" if reused else ""), repr(exc))
            await conn.close()
        except TimeoutError:
            stats.fail("timeout", path)
            await conn.close()
        except OSError as exc:
            stats.fail(type(exc).__name__, str(exc))
            await conn.close()
        else:
            if status == 200:
                stats.ok += 1
                if body.isdigit():
                    stats.pids[int(body)] += 1
            else:
                stats.fail(f"http {status}", body[:80].decode(errors="replace"))
            if closing:
                await conn.close()
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await conn.close()


class Load:
    """`rate` requests/s spread over `clients` keep-alive connections, until stopped.

    Bounded: it stops by itself after `max_seconds` even if the test forgets to.
    """

    def __init__(self, port: int, rate: float = 150, clients: int = 6, path: str = "/pid",
                 max_seconds: float = 60):  # fmt: skip
        self.stats = Stats()
        self._stop = threading.Event()
        interval = clients / rate
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._run(port, path, clients, interval)), daemon=True
        )
        self._max_seconds = max_seconds

    async def _run(self, port: int, path: str, clients: int, interval: float) -> None:
        tasks = [_client(port, path, interval, self._stop, self.stats) for _ in range(clients)]
        stopper = asyncio.get_running_loop().call_later(self._max_seconds, self._stop.set)
        await asyncio.gather(*tasks)
        stopper.cancel()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Stats:
        self._stop.set()
        self._thread.join(15)
        return self.stats

    def wait_for_requests(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.stats.total < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"load reached only {self.stats.total} requests")
            time.sleep(0.02)
