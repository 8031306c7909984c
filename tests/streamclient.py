"""Clients of long-lived responses that record how each one ended.

An SSE client reads the chunked body itself, so it can tell a clean end of stream (the
last chunk, then the server closing) from a cut (EOF mid-body, which httpx reports as
"incomplete chunked read") or a reset. A WebSocket client records the close code. All
run on one event loop in a thread, so a test opens many, signals the server, and reads
the outcomes, polling with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import websockets

PID = re.compile(rb"data: (\d+)")


@dataclass
class Stream:
    kind: str  # sse, ws
    path: str
    pid: int | None = None  # the worker that serves it (its first event says)
    events: int = 0
    outcome: str | None = None  # clean, cut, reset, 1012, ... ; None while open
    detail: str = ""
    opened_at: float = 0.0
    ended_at: float | None = None
    history: list[tuple[int | None, str]] = field(default_factory=list)  # reconnecting: ended


@dataclass
class StreamClients:
    port: int
    streams: list[Stream] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks: list[asyncio.Future[None]] = []

    # --- opening ---------------------------------------------------------------------

    def open_sse(self, path: str = "/sse") -> Stream:
        stream = Stream("sse", path, opened_at=time.monotonic())
        self.streams.append(stream)
        self.tasks.append(asyncio.run_coroutine_threadsafe(self._sse(stream), self.loop))
        return stream

    def open_reconnecting_sse(self, path: str = "/sse") -> Stream:
        """Like EventSource: a stream that ended cleanly is opened again, until `close`.
        `history` holds each ended connection's (worker pid, outcome)."""
        stream = Stream("sse", path, opened_at=time.monotonic())
        self.streams.append(stream)
        self.tasks.append(asyncio.run_coroutine_threadsafe(self._reconnecting(stream), self.loop))
        return stream

    def open_ws(self, path: str = "/ws") -> Stream:
        stream = Stream("ws", path, opened_at=time.monotonic())
        self.streams.append(stream)
        self.tasks.append(asyncio.run_coroutine_threadsafe(self._ws(stream), self.loop))
        return stream

    # --- reading ---------------------------------------------------------------------

    def open_count(self) -> int:
        """Streams that have received their first event and not ended."""
        return sum(s.pid is not None and s.outcome is None for s in self.streams)

    def ended(self) -> bool:
        return all(s.outcome is not None for s in self.streams)

    def outcomes(self, kind: str | None = None) -> Counter[str]:
        return Counter(s.outcome or "open" for s in self.streams if kind in (None, s.kind))

    def per_worker(self) -> Counter[int | None]:
        return Counter(s.pid for s in self.streams if s.outcome is None)

    def close(self) -> None:
        """Close every client still open (on its loop, so each ends properly) and stop."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    # --- clients ---------------------------------------------------------------------

    async def _sse(self, stream: Stream) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            stream.outcome, stream.detail = "refused", repr(exc)
            return
        try:
            request = f"GET {stream.path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream"
            writer.write(f"{request}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split()[1])
            if status != 200 or b"transfer-encoding: chunked" not in head.lower():
                stream.outcome, stream.detail = f"status {status}", head.decode("latin-1")
                return
            stream.outcome = await self._read_chunks(stream, reader)
        except (asyncio.IncompleteReadError, EOFError):
            stream.outcome = "cut"
        except ConnectionResetError as exc:
            stream.outcome, stream.detail = "reset", repr(exc)
        except OSError as exc:
            stream.outcome, stream.detail = "error", repr(exc)
        finally:
            stream.ended_at = time.monotonic()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _reconnecting(self, stream: Stream) -> None:
        while True:
            await self._sse(stream)
            stream.history.append((stream.pid, stream.outcome or "?"))
            if stream.outcome != "clean":
                return  # anything else is for the test to see
            stream.pid = stream.outcome = stream.ended_at = None
            stream.events = 0

    async def _read_chunks(self, stream: Stream, reader: asyncio.StreamReader) -> str:
        """The chunked body to its last chunk; then the server must close the connection."""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readexactly(2)  # the empty trailer
                rest = await reader.read()  # the server closes: Connection: close was implied
                return "clean" if not rest else "clean+junk"
            chunk = await reader.readexactly(size + 2)
            stream.events += chunk.count(b"\n\n")
            if stream.pid is None:
                found = PID.search(chunk)
                if found:
                    stream.pid = int(found.group(1))

    async def _ws(self, stream: Stream) -> None:
        try:
            async with websockets.connect(
                f"ws://127.0.0.1:{self.port}{stream.path}", open_timeout=30, ping_interval=None
            ) as ws:
                stream.pid = int(await ws.recv())
                with contextlib.suppress(websockets.ConnectionClosed):
                    while True:
                        await ws.recv()
                stream.outcome = str(ws.close_code)
        except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
            stream.outcome, stream.detail = "error", repr(exc)
        finally:
            stream.ended_at = time.monotonic()
