"""Per-request cost of `RequestMetrics`, against prometheus_client observed directly.

    python bench/metrics_overhead.py [N]        # middleware calls, no server
    python bench/metrics_overhead.py --wrk [S [R]]  # one uvicorn under wrk: R rounds of S s

Both run in prometheus_client multiprocess mode (a temporary PROMETHEUS_MULTIPROC_DIR set
before prometheus_client is imported, as in a worker). The first calls the middleware N
times around a no-op ASGI app inside one coroutine: the middleware's own CPU per request,
best of 5. The second serves a hello-world app from one uvicorn process (httptools,
uvloop, flushing from ``on_tick`` once a second as the worker does) with metrics off and
on, alternating, and reports wrk's requests/s.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SERVING = sys.argv[1:2] == ["--serve"]  # a server child: uses its parent's directory
if not SERVING:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-bench-")
DIRECTORY = os.environ["PROMETHEUS_MULTIPROC_DIR"]  # set before prometheus_client loads

from prometheus_client import Gauge, Histogram  # noqa: E402

from asgi_supervise.metrics import (  # noqa: E402
    DURATION_BUCKETS,
    HTTP_LABELS,
    SIZE_BUCKETS,
    RequestMetrics,
    route_of,
)

Scope = dict[str, Any]
HEADERS = [(b"content-type", b"text/plain")]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
BODY = {"type": "http.response.body", "body": b"Hello, world!"}


async def hello(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send(START)
        await send(BODY)


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    return None


class DirectMetrics:
    """The obvious middleware: one prometheus_client call per observation."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.duration = Histogram(
            "direct_duration_seconds", "d", HTTP_LABELS, registry=None, buckets=DURATION_BUCKETS
        )
        self.size = Histogram(
            "direct_size_bytes", "s", HTTP_LABELS, registry=None, buckets=SIZE_BUCKETS
        )
        self.active = Gauge(
            "direct_active", "a", ("m",), registry=None, multiprocess_mode="livesum"
        )

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        status, size = 500, 0

        async def counting_send(message: Any) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        method = scope["method"]
        self.active.labels(method).inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            labels = (method, route_of(scope), str(status))
            self.duration.labels(*labels).observe(time.perf_counter() - start)
            self.size.labels(*labels).observe(size)
            self.active.labels(method).dec()


async def calls(app: Any, n: int, routes: int = 1) -> float:
    scopes: list[Scope] = [
        {"type": "http", "method": "GET", "path": "/", "headers": [], "http_route": f"/r{i}"}
        for i in range(routes)
    ]
    begin = time.perf_counter()
    for i in range(n):
        await app(scopes[i % routes], receive, send)
    return (time.perf_counter() - begin) / n * 1e6


def best(app: Any, n: int, flush: Any = None) -> float:
    runs = []
    for _ in range(5):
        runs.append(asyncio.run(calls(app, n)))
        if flush is not None:
            flush()
    return min(runs)


def micro(n: int) -> None:
    bare = best(hello, n)
    metrics = RequestMetrics(hello)
    ours = best(metrics, n, metrics.flush)
    direct = best(DirectMetrics(hello), n)
    flushes = []
    for _ in range(2):  # the first flush creates the label sets' mmap entries
        asyncio.run(calls(metrics, 10_000, routes=50))  # a busy second over 50 routes
        begin = time.perf_counter()
        metrics.flush()
        flushes.append((time.perf_counter() - begin) * 1e3)
    print(f"N={n}, multiprocess mode, best of 5")
    print(f"no metrics (bare app call)   {bare:6.2f} us/request")
    print(f"RequestMetrics (dict+flush)  {ours:6.2f} us/request  (+{ours - bare:.2f})")
    print(f"prometheus_client directly   {direct:6.2f} us/request  (+{direct - bare:.2f})")
    first, then = flushes
    print(f"flush() after 10k requests on 50 routes: first {first:.1f} ms, then {then:.2f} ms")


def serve(metrics_on: bool, port: int) -> None:
    import uvicorn

    app = RequestMetrics(hello) if metrics_on else hello

    class Server(uvicorn.Server):
        async def on_tick(self, counter: int) -> bool:
            if metrics_on and counter % 10 == 0:
                app.flush()  # type: ignore[union-attr]
            return await super().on_tick(counter)

    config = uvicorn.Config(
        app, port=port, http="httptools", loop="uvloop", lifespan="off",
        access_log=False, log_level="warning",
    )  # fmt: skip
    Server(config).run()


def wrk(port: int, seconds: int) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    assert rate and total, out
    return float(rate.group(1)), int(total.group(1))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def server_run(metrics_on: bool, seconds: int) -> tuple[float, float]:
    """wrk's requests/s, and the server's CPU microseconds per request."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flag = "on" if metrics_on else "off"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", flag, str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        wrk(port, 2)  # warm-up
        before = cpu_seconds(proc.pid)
        rate, requests = wrk(port, seconds)
        return rate, (cpu_seconds(proc.pid) - before) / requests * 1e6
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def macro(seconds: int = 8, rounds: int = 3) -> None:
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(rounds):
        for metrics_on in (False, True) if i % 2 == 0 else (True, False):
            runs[metrics_on].append(server_run(metrics_on, seconds))
    print(f"wrk -t1 -c32 -d{seconds}s, one uvicorn process, {rounds} rounds alternating")
    rate, cpu = {}, {}
    for metrics_on, name in ((False, "off"), (True, "on ")):
        rate[metrics_on] = statistics.median(r for r, _ in runs[metrics_on])
        cpu[metrics_on] = statistics.median(c for _, c in runs[metrics_on])
        each = ", ".join(f"{r:.0f}" for r, _ in runs[metrics_on])
        print(
            f"metrics {name}  {rate[metrics_on]:8.0f} req/s  {cpu[metrics_on]:6.1f} us CPU/req"
            f"  (runs: {each})"
        )
    print(
        f"on/off: throughput {rate[True] / rate[False]:.3f}, CPU per request "
        f"{cpu[True] / cpu[False]:.3f} (+{cpu[True] - cpu[False]:.1f} us)"
    )


def main(argv: list[str]) -> None:
    if SERVING:
        serve(argv[1] == "on", int(argv[2]))
        return
    try:
        if argv[:1] == ["--wrk"]:
            macro(*(int(a) for a in argv[1:3]))
        else:
            micro(int(argv[0]) if argv else 100_000)
    finally:
        shutil.rmtree(DIRECTORY, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
