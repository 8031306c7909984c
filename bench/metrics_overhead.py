"""Per-request cost of `RequestMetrics`, against prometheus_client observed directly.

    python bench/metrics_overhead.py [N]        # middleware calls, no server
    python bench/metrics_overhead.py --wrk [S [R [V]]]  # one uvicorn under wrk: off vs V
    python bench/metrics_overhead.py --instructions [V ...]  # callgrind, per request

The first calls the middleware N times around a no-op ASGI app inside one coroutine: its
own CPU per request, best of 5, next to prometheus_client in multiprocess mode (a
temporary PROMETHEUS_MULTIPROC_DIR). The second serves a hello-world app from one uvicorn
process (httptools, uvloop, delivering from ``on_tick`` once a second as the worker does)
with metrics off and on (or variant V), alternating, and reports wrk's requests/s and
the server's CPU per request; server and wrk run on different CPUs where there are two.
The third counts the server's instructions per request under valgrind's callgrind, which
does not depend on what else the machine is doing: one keep-alive client sends 500 and
then 2,500 requests; the difference is divided by 2,000.
Variants: `off`, `on` (the compiled meter where it was built), `python` (PythonMeter), and
two floors for any Python middleware: `layer` (an `async def` that awaits the app) and
`layer+send` (the same, passing a plain-function wrapper of `send`, which any middleware
that sees the status needs). Each runs behind uvicorn's ProxyHeadersMiddleware, as in
uvicorn by default; prefixed `worker` (`worker`, `worker+on`, ...), behind
`forwarded.proxy_headers` instead, as in asgi-supervise's workers; prefixed `bare`, behind
neither (`--no-proxy-headers`); suffixed `@xff`
(`off@xff`, ..., `--instructions` only), the requests carry an X-Forwarded-For header
(`bench/interleaved.py --header` does that under wrk). Under callgrind the
server runs with PYTHONHASHSEED=0: with random hashes, dict probing alone moves the count
by a few hundred per request.
"""

from __future__ import annotations

import asyncio
import functools
import json
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import cpu_seconds, free_port  # noqa: E402
from scenarios import parse_wrk  # noqa: E402

from asgi_supervise.observe.metrics import HTTP_LABELS  # noqa: E402
from asgi_supervise.worker import forwarded  # noqa: E402
from asgi_supervise.worker.meter import (  # noqa: E402
    DURATION_BUCKETS,
    SIZE_BUCKETS,
    UNMATCHED,
    PythonMeter,
    RequestMetrics,
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
            labels = (method, scope.get("http_route", UNMATCHED), str(status))
            self.duration.labels(*labels).observe(time.perf_counter() - start)
            self.size.labels(*labels).observe(size)
            self.active.labels(method).dec()


async def calls(app: Any, n: int, routes: int = 1) -> None:
    scopes: list[Scope] = [
        {"type": "http", "method": "GET", "path": "/", "headers": [], "http_route": f"/r{i}"}
        for i in range(routes)
    ]
    for i in range(n):
        await app(scopes[i % routes], receive, send)


def delivered(message: Any) -> bool:
    json.dumps(message)  # what the control channel costs the worker
    return True


def best(app: Any, n: int, deliver: Any = None) -> float:
    runs = []
    for _ in range(5):
        begin = time.perf_counter()
        asyncio.run(calls(app, n))
        if deliver is not None:
            deliver(delivered)
        runs.append((time.perf_counter() - begin) / n * 1e6)
    return min(runs)


def micro(n: int) -> None:
    bare = best(hello, n)
    metrics = RequestMetrics(hello)
    ours = best(metrics.meter, n, metrics.deliver)
    direct = best(DirectMetrics(hello), n)
    asyncio.run(calls(metrics.meter, 10_000, routes=50))  # a busy second over 50 routes
    begin = time.perf_counter()
    metrics.deliver(delivered)
    took = (time.perf_counter() - begin) * 1e3
    print(f"N={n}, best of 5 (each includes asyncio.run and one delivery)")
    print(f"no metrics (bare app call)       {bare:6.2f} us/request")
    print(f"RequestMetrics (meter+delivery)  {ours:6.2f} us/request  (+{ours - bare:.2f})")
    print(f"prometheus_client, multiprocess  {direct:6.2f} us/request  (+{direct - bare:.2f})")
    print(f"delivery after 10k requests on 50 routes: {took:.1f} ms")


def layer(app: Any) -> Any:
    async def layer(scope: Scope, receive: Any, send: Any) -> None:
        await app(scope, receive, send)

    return layer


def layer_and_send(app: Any) -> Any:
    async def layer(scope: Scope, receive: Any, send: Any) -> None:
        def wrapper(message: Any) -> Any:
            return send(message)

        await app(scope, receive, wrapper)

    return layer


VARIANTS = {"off": lambda app: app, "on": RequestMetrics, "layer": layer}
VARIANTS["layer+send"] = layer_and_send
VARIANTS["python"] = functools.partial(RequestMetrics, meter=PythonMeter)


def serve(variant: str, port: int, every_second: bool) -> None:
    """Deliver once a second as a worker does, or (under callgrind, where a second is ~50x
    fewer requests) once at exit: then the count holds each sample's share of the
    bucketing, as at full speed, and not 50x the per-second fixed cost."""
    import uvicorn

    worker = variant.startswith("worker")  # proxy headers the worker's way
    bare = variant.startswith("bare")  # no proxy-headers handling at all
    inner = forwarded.proxy_headers(hello, ["127.0.0.1"]) if worker else hello
    app = VARIANTS[variant.removeprefix("worker").removeprefix("bare").lstrip("+") or "off"](inner)
    metrics = app if isinstance(app, RequestMetrics) else None
    if metrics:
        app = metrics.meter  # as the worker serves it

    class Server(uvicorn.Server):
        async def on_tick(self, counter: int) -> bool:
            if metrics and every_second:  # as the worker does
                metrics.fold()
                if counter % 10 == 0:
                    metrics.deliver(delivered)
            return await super().on_tick(counter)

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            if metrics:
                metrics.deliver(delivered)

    config = uvicorn.Config(
        app, port=port, http="httptools", loop="uvloop", lifespan="off",
        access_log=False, log_level="warning", interface="asgi3",
        proxy_headers=not (worker or bare),
    )  # fmt: skip
    Server(config).run()


def wrk(port: int, seconds: int) -> tuple[float, int]:
    """wrk on this process's CPUs (macro() pins them apart from the server's)."""
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    result = parse_wrk(out)
    return result["rps"], result["requests"]


def wait_listening(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def server_run(variant: str, seconds: int) -> tuple[float, float]:
    """wrk's requests/s, and the server's CPU microseconds per request."""
    port = free_port()
    serve = [sys.executable, __file__, "--serve", variant, str(port), "second"]
    proc = subprocess.Popen(harness.pinned(serve))
    try:
        wait_listening(port, 10)
        wrk(port, 2)  # warm-up
        before = cpu_seconds([proc.pid])
        rate, requests = wrk(port, seconds)
        return rate, (cpu_seconds([proc.pid]) - before) / requests * 1e6
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def macro(seconds: int = 8, rounds: int = 3, variant: str = "on") -> None:
    # With two CPUs or more, the server gets the last and wrk the others: on a small
    # machine they otherwise take each other's CPU, and the scheduler outweighs a 3% effect.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        harness.pin(f"{cpus[-1]}:{','.join(map(str, cpus[:-1]))}")
    runs: dict[str, list[tuple[float, float]]] = {"off": [], variant: []}
    for i in range(rounds):
        for name in ("off", variant) if i % 2 == 0 else (variant, "off"):
            runs[name].append(server_run(name, seconds))
    where = harness.SERVER_CPUS
    pins = f"server on CPU {where}, wrk on the others" if where else "not pinned"
    print(f"wrk -t1 -c32 -d{seconds}s, one uvicorn process, {rounds} rounds alternating, {pins}")
    rate, cpu = {}, {}
    for name, results in runs.items():
        rate[name] = statistics.median(r for r, _ in results)
        cpu[name] = statistics.median(c for _, c in results)
        each = ", ".join(f"{r:.0f}" for r, _ in results)
        print(f"{name:10s}  {rate[name]:8.0f} req/s  {cpu[name]:6.1f} us CPU/req  (runs: {each})")
    print(
        f"{variant}/off: throughput {rate[variant] / rate['off']:.3f}, CPU per request "
        f"{cpu[variant] / cpu['off']:.3f} (+{cpu[variant] - cpu['off']:.1f} us)"
    )


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
FORWARDED = b"GET / HTTP/1.1\r\nHost: bench\r\nX-Forwarded-For: 198.51.100.7\r\n\r\n"


def sequential(port: int, n: int, request: bytes = REQUEST) -> None:
    """n requests, one after another, on one keep-alive connection: the same path each."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for _ in range(n):
            conn.sendall(request)
            answer = b""
            while not answer.endswith(b"\r\n0\r\n\r\n"):  # the chunked body ends
                chunk = conn.recv(4096)
                assert chunk, "server closed the connection"
                answer += chunk


def instructions(variant: str, n: int) -> int:
    """The callgrind instruction count of one server's whole life serving n requests."""
    port = free_port()
    out = tempfile.mktemp(prefix="callgrind-", dir=DIRECTORY)
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    proc = subprocess.Popen(
        [
            *command,
            sys.executable,
            __file__,
            "--serve",
            variant.removesuffix("@xff"),
            str(port),
            "exit",
        ],
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    try:
        wait_listening(port, 120)
        sequential(port, n, FORWARDED if variant.endswith("@xff") else REQUEST)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    with open(out) as profile:
        totals = re.search(r"^totals:\s+(\d+)", profile.read(), re.MULTILINE)
    assert totals, f"no totals in {out}"
    return int(totals.group(1))


def per_request(variants: list[str]) -> None:
    print("callgrind instructions per request, one keep-alive client, (I(2500) - I(500)) / 2000")
    base = None
    for variant in variants or ["off", "on", "python", "layer", "layer+send"]:
        cost = (instructions(variant, 2500) - instructions(variant, 500)) / 2000
        base = base or cost
        print(f"{variant:12s} {cost:9,.0f}  {cost / base:.3f}x  (+{cost - base:,.0f})", flush=True)


def main(argv: list[str]) -> None:
    if SERVING:
        serve(argv[1], int(argv[2]), argv[3] == "second")
        return
    try:
        if argv[:1] == ["--wrk"]:
            numbers = [int(a) for a in argv[1:3]]
            macro(*numbers, *argv[3:4])
        elif argv[:1] == ["--instructions"]:
            per_request(argv[1:])
        else:
            micro(int(argv[0]) if argv else 100_000)
    finally:
        shutil.rmtree(DIRECTORY, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
