"""The load generator of the benchmarks and the tests: HTTP/1.1 over loopback, every
failure named and counted.

Clients reuse their connection like urllib3 or nginx do: a connection the server closed
while it sat idle is not reused, and `Connection: close` is obeyed. So any failure
counted here is one a real client would have seen.

- `get()`: one request that never raises; its outcome names what went wrong.
- `open_loop()`: request i starts at i/rate whatever earlier ones did (bench scenarios).
- `Load`: paced keep-alive clients on a thread, counting into `Stats`, until stopped
  (the tests, and anything that needs load running beside blocking code).

Throughput is measured with wrk where it is installed; this module is for correctness
under load and for timing individual requests.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"

# --- one request ----------------------------------------------------------------------


def failure_kind(exc: BaseException, phase: str) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, (asyncio.IncompleteReadError, EOFError)):
        return "eof"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "connect_timeout" if phase == "connect" else "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, "oserror").lower()
    return type(exc).__name__


def _dropped(writer: asyncio.StreamWriter) -> bool:
    """Whether the server closed (or wrote unasked on) an idle connection, asked of the
    socket itself, as urllib3's `is_connection_dropped` does with a zero-timeout poll.

    The stream's own flags lag: they change only when the event loop next handles the
    FIN, and a client that reuses the connection before then sends into a dead socket.
    """
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class Pool:
    """Idle keep-alive connections, newest first. Like urllib3 and nginx, a connection the
    server closed while it sat idle (or sent unasked-for bytes on) is skipped."""

    def __init__(self) -> None:
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        while self.idle:
            reader, writer = self.idle.pop()
            if not (reader.at_eof() or reader._buffer or writer.is_closing() or _dropped(writer)):
                return reader, writer
            writer.close()
        return None

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def get(
    port: int,
    path: str = "/pid",
    timeout: float = 5.0,
    pool: Pool | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """One GET; never raises. outcome: ok, http_NNN, refused, reset, eof, timeout,
    connect_timeout, or stale_keepalive (a reused connection that failed before any
    byte of a response: the keep-alive close race). `request_id` is sent as X-Load-Id, so
    an app can say which requests it saw; `got_bytes` says whether any of a response came."""
    r: dict[str, Any] = {"t0": time.monotonic(), "outcome": None, "body": None, "reused": False}
    phase, got_bytes, writer = "connect", False, None
    tag = b"X-Load-Id: %s\r\n" % request_id.encode() if request_id is not None else b""
    try:
        async with asyncio.timeout(timeout):
            conn = pool.take() if pool is not None else None
            if conn is None:
                conn = await asyncio.open_connection(HOST, port)
            else:
                r["reused"] = True
            reader, writer = conn
            phase = "request"
            keep = b"keep-alive" if pool is not None else b"close"
            writer.write(
                b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: %s\r\n%s\r\n"
                % (path.encode(), HOST.encode(), keep, tag)
            )
            await writer.drain()
            phase = "response"
            status_line = await reader.readuntil(b"\r\n")
            got_bytes = True
            status = int(status_line.split()[1])
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n"):
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip().lower()
            if b"content-length" in headers:
                r["body"] = await reader.readexactly(int(headers[b"content-length"]))
            else:
                r["body"] = await reader.read()
            r["outcome"] = "ok" if status == 200 else f"http_{status}"
            if pool is not None and headers.get(b"connection") != b"close":
                pool.idle.append((reader, writer))
                writer = None
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        r["outcome"] = failure_kind(exc, phase)
        if r["reused"] and not got_bytes and r["outcome"] in ("eof", "reset"):
            r["outcome"] = "stale_keepalive"
    finally:
        if writer is not None:
            writer.close()
    r["t1"] = time.monotonic()
    r["ok"] = r["outcome"] == "ok"
    r["got_bytes"] = got_bytes
    return r


def pid_of(r: dict[str, Any]) -> int | None:
    if r["ok"] and r["body"] and r["body"].isdigit():
        return int(r["body"])
    return None


# --- open-loop load (bench) ------------------------------------------------------------


async def open_loop(
    port: int,
    rate: float,
    duration: float,
    keepalive: bool = False,
    events: dict[float, Any] | None = None,
    timeout: float = 5.0,
) -> list[dict[str, Any]]:
    """Request i starts at i/rate whatever earlier ones did: exactly rate*duration requests,
    each bounded by `timeout`. `events` maps an offset in seconds to a callable run then."""
    pool = Pool() if keepalive else None
    start = time.monotonic()
    tasks = []
    pending = sorted((events or {}).items())
    for i in range(int(rate * duration)):
        due = start + i / rate
        while pending and pending[0][0] <= due - start:
            await asyncio.sleep(max(0.0, start + pending[0][0] - time.monotonic()))
            pending.pop(0)[1]()
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.ensure_future(get(port, "/pid", timeout, pool)))
    for _, fn in pending:
        fn()
    results = list(await asyncio.gather(*tasks))
    if pool:
        pool.close()
    return results


# --- paced keep-alive clients on a thread (tests) --------------------------------------


@dataclass
class Stats:
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    pids: collections.Counter[int] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    # With Load(tagged=True): each request's X-Load-Id -> (outcome, reused, got_bytes).
    by_id: dict[str, tuple[str, bool, bool]] = field(default_factory=dict)

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


async def _client(port: int, path: str, interval: float, stop: threading.Event, stats: Stats,
                  tag: str | None = None):  # fmt: skip
    """One keep-alive client: a request every `interval` s (later if one is slow). With a
    `tag`, request n carries X-Load-Id `tag-n` and its outcome is kept in `stats.by_id`."""
    pool = Pool()
    next_at = time.monotonic()
    sent = 0
    while not stop.is_set():
        request_id = None if tag is None else f"{tag}-{sent}"
        sent += 1
        r = await get(port, path, 5.0, pool, request_id)
        if request_id is not None:
            stats.by_id[request_id] = (r["outcome"], r["reused"], r["got_bytes"])
        if r["ok"]:
            stats.ok += 1
            pid = pid_of(r)
            if pid is not None:
                stats.pids[pid] += 1
        else:
            detail = (r["body"] or b"")[:80].decode(errors="replace")
            stats.fail(r["outcome"], f"{path} {'reused' if r['reused'] else 'new'} {detail}")
        next_at = max(next_at + interval, time.monotonic() - interval)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    pool.close()


class Load:
    """`rate` requests/s spread over `clients` keep-alive connections, until stopped.

    Failure kinds are `get()`'s outcomes (refused, reset, eof, timeout, stale_keepalive,
    http_NNN ...). Bounded: it stops by itself after `max_seconds` even if the caller
    forgets to. `tagged`: every request carries a unique X-Load-Id, and `stats.by_id` keeps
    each one's outcome (so a test can match them with the requests its app saw).
    """

    def __init__(self, port: int, rate: float = 150, clients: int = 6, path: str = "/pid",
                 max_seconds: float = 60, tagged: bool = False):  # fmt: skip
        self.stats = Stats()
        self._stop = threading.Event()
        interval = clients / rate
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._run(port, path, clients, interval, tagged)),
            daemon=True,
        )
        self._max_seconds = max_seconds

    async def _run(self, port: int, path: str, clients: int, interval: float,
                   tagged: bool) -> None:  # fmt: skip
        tasks = [
            _client(port, path, interval, self._stop, self.stats, f"c{i}" if tagged else None)
            for i in range(clients)
        ]
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

    def wait_for_requests(self, count: int, timeout: float = 30) -> None:
        """Until `count` requests completed (a count: a deadline only against a hang)."""
        deadline = time.monotonic() + timeout
        while self.stats.total < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"load reached only {self.stats.total} requests")
            if not self._thread.is_alive():
                raise AssertionError(f"load stopped at {self.stats.total} requests")
            time.sleep(0.02)
