"""HTTP request metrics, measured in each worker and shipped to the master.

A request only counts its duration and body size into two histograms of its label set.
Every tick (0.1 s) the worker takes them; once a second it sends what it took to the
master over the control channel, and the master adds them up (``metrics.RequestTotals``)
and serves them.

Why not prometheus_client in the worker: a multiprocess observation takes a lock and
writes an mmap (2-3 us, four per request), and every scrape re-parses every live worker's
files (~49,000 entries for 8 workers x 50 routes). Here a request's bookkeeping is two
bucket increments, and a scrape reads the master's totals.

The per-request part, the Meter, is compiled (`_meter.c`): in Python, the coroutine frame
and `send` wrapper any status-reading middleware needs cost more than all the rest
(bench/metrics_overhead.py --instructions). PythonMeter is the same in Python, used where
no C compiler built the extension. This module imports nothing heavy: it runs in every
worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from asgi_supervise.protocol import DURATION_BUCKETS, MESSAGE_BYTES, SIZE_BUCKETS, Buckets

KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
OTHER_METHOD = "_OTHER"  # OTel: arbitrary methods must not become label values
UNMATCHED = "unmatched"  # the one route label of everything no router claimed
MAX_ROUTE = 256  # characters of a route label; longer templates are cut

perf_counter = time.perf_counter
Key = tuple[str, str, str]  # method, route template, status code
Tallies = dict[tuple[str, Any, int], tuple[list[int], float, list[int], float]]
Offer = Callable[[dict[str, Any]], bool]  # sends one message without blocking


def method_label(method: str | None) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def label_set(method: str, route: Any, status: Any) -> Key:
    """The label values a request is counted under; every one of them bounded."""
    route = route[:MAX_ROUTE] if isinstance(route, str) and route else UNMATCHED
    return method_label(method), route, str(status)


def route_template(scope: Mapping[str, Any]) -> Any:
    """The template a router left in the scope, unchecked: `label_set` bounds it."""
    route = scope.get("route")
    if route is None:
        return scope.get("http_route")
    # Starlette's Route: `path_format` is the template without converters
    return getattr(route, "path_format", None) or getattr(route, "path", None)


class PythonMeter:
    """The per-request part of RequestMetrics in Python: `_meter.Meter` compiled.

    An ASGI app that counts each HTTP request's duration and body size into two
    histograms of its label set, and hands them over with ``take()``. This is the
    reference for what the compiled one does, and what runs where it could not be built.
    """

    def __init__(
        self, app: Any, websocket: Any, durations: tuple[float, ...], sizes: tuple[float, ...]
    ) -> None:
        self.app, self.websocket = app, websocket
        self.bounds = durations, sizes
        self.tallies: dict[tuple[str, Any, int], tuple[Buckets, Buckets]] = {}
        self.started: Counter[str] = Counter()

    def take(self) -> tuple[Tallies, dict[str | None, int]]:
        """What was measured since the last take(); measuring starts afresh.

        Also the requests begun by method (the compiled meter counts unknown ones as None).
        """
        tallies = {k: (d.counts, d.total, s.counts, s.total) for k, (d, s) in self.tallies.items()}
        started, self.tallies, self.started = dict(self.started), {}, Counter()
        return tallies, started

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                return await self.websocket(scope, receive, send)
            return await self.app(scope, receive, send)  # lifespan, and anything newer
        status = None  # until the start
        size = 0

        def tap(message: Any) -> Any:  # sync: hands back send's awaitable, no extra frame
            nonlocal status, size
            if status is None and "status" in message:  # the start: ASGI's first message,
                status = message["status"]  # and the only one with a status
            else:
                size += len(message.get("body", b""))
            return send(message)

        method = scope["method"]
        self.started[method] += 1
        keys = len(scope)
        start = perf_counter()
        try:  # what the app returns goes through: the server warns unless it is None
            return await self.app(scope, receive, tap)
        finally:
            seconds = perf_counter() - start
            # A router adds keys to the scope: one that gained none was not routed.
            template = route_template(scope) if len(scope) > keys else None
            key = method, template, 500 if status is None else status  # 500: the app failed
            tally = self.tallies.get(key)
            if tally is None:
                tally = self.tallies[key] = Buckets(self.bounds[0]), Buckets(self.bounds[1])
            tally[0].observe(seconds)
            tally[1].observe(size)


try:
    from asgi_supervise.worker._meter import Meter
except ImportError:  # built without a C compiler: the same, at ~6x the cost per request
    Meter = PythonMeter  # type: ignore[assignment,misc]
COMPILED = Meter is not PythonMeter

# The uvicorn series the compiled meter was tested under; pyproject.toml pins uvicorn to
# it, and tests/unit/test_uvicorn_pin.py fails when either moves without the other.
TESTED_UVICORN = "0.54"
log = logging.getLogger("asgi_supervise.worker")


def uvicorn_tested(version: str) -> bool:
    return version == TESTED_UVICORN or version.startswith(TESTED_UVICORN + ".")


def meter_for(uvicorn_version: str) -> Callable[..., Any]:
    """The compiled meter under a uvicorn of the tested series, else PythonMeter.

    The compiled meter is no coroutine: it hands the server an awaitable of its own and
    drives the app's coroutine by hand (send, throw, close, finalisation when a task is
    dropped). That holds for a server that simply awaits the app, as uvicorn 0.54's
    protocols do, and its tests drive it that way; a uvicorn that drives apps otherwise
    could make it miscount, or crash the worker from C. PythonMeter is an ordinary
    coroutine that measures the same, at a few microseconds more per request: a worker
    under an untested uvicorn keeps serving and measuring, and says so.
    """
    if uvicorn_tested(uvicorn_version) or not COMPILED:
        return Meter
    log.warning(
        "uvicorn %s is not a release asgi-supervise was tested with (%s.x): request "
        "metrics use the Python meter instead of the compiled one",
        uvicorn_version,
        TESTED_UVICORN,
    )
    return PythonMeter


class RequestMetrics:
    """Request durations, statuses and sizes by route template, folded and delivered.

    The route label is the template a Starlette or FastAPI router puts in
    ``scope["route"]`` (or a string another framework puts in ``scope["http_route"]``)
    while the app runs, never the raw path. Serve ``self.meter``, the ASGI app that
    measures; calling this object calls it too. Observations since the last delivery die
    with a killed worker.
    """

    def __init__(self, app: Any, meter: Callable[..., Any] | None = None) -> None:
        if meter is None:  # the worker's: the compiled one where it was built and tested
            from uvicorn import __version__

            meter = meter_for(__version__)
        self.app = app
        self.meter = meter(app, self._websocket, DURATION_BUCKETS, SIZE_BUCKETS)
        self._counts: Counter[str] = Counter()  # requests started minus finished, by method
        self._undelivered: dict[Key, tuple[Buckets, Buckets]] = {}  # durations, sizes
        self._ws_active = 0
        self._ws_opened = 0

    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        return self.meter(scope, receive, send)

    async def _websocket(self, scope: Any, receive: Any, send: Any) -> None:
        accepted = False

        async def watching_send(message: Any) -> None:
            nonlocal accepted
            if message["type"] == "websocket.accept" and not accepted:
                accepted = True
                self._ws_active += 1
                self._ws_opened += 1
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            if accepted:
                self._ws_active -= 1

    def fold(self) -> None:
        """Add what the meter measured since the last fold to what awaits delivery.

        The worker folds every tick (0.1 s): it costs per label set, not per request.
        """
        tallies, started = self.meter.take()
        counts = self._counts
        for method, number in started.items():
            counts[method_label(method)] += number
        for (method, template, status), (durations, seconds, sizes, size) in tallies.items():
            key = label_set(method, template, status)
            totals = self._undelivered.get(key)
            if totals is None:
                totals = self._undelivered[key] = Buckets(DURATION_BUCKETS), Buckets(SIZE_BUCKETS)
            counts[key[0]] -= sum(durations)
            totals[0].add(durations, seconds)
            totals[1].add(sizes, size)

    def active(self) -> dict[str, int]:
        """Requests in flight by method, as of the last fold."""
        return {method: n for method, n in self._counts.items() if n}

    def deliver(self, offer: Offer) -> bool:
        """Send everything not yet delivered; keep what the channel did not take.

        Totals are deltas, so a message is dropped from here only once it was sent.
        """
        self.fold()
        first: dict[str, Any] = {
            "active": self.active(), "ws_active": self._ws_active, "ws_opened": self._ws_opened,
        }  # fmt: skip
        for message in _messages(self._undelivered, first):
            if not offer(message):
                return False
            for entry in message["http"]:
                del self._undelivered[entry[0], entry[1], entry[2]]
            if "ws_opened" in message:
                self._ws_opened -= message["ws_opened"]
        return True


def _messages(
    totals: Mapping[Key, tuple[Buckets, Buckets]], first: dict[str, Any]
) -> list[dict[str, Any]]:
    """Entries in messages of at most about MESSAGE_BYTES; `first` rides on the first."""
    groups: list[list[list[Any]]] = [[]]
    size = len(json.dumps(first))
    for (method, route, status), (durations, sizes) in totals.items():
        entry = [
            method,
            route,
            status,
            durations.counts,
            durations.total,
            sizes.counts,
            sizes.total,
        ]
        length = len(json.dumps(entry)) + 2
        if groups[-1] and size + length > MESSAGE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += length
    messages = [{"t": "metrics", "http": group} for group in groups]
    messages[0].update(first)
    return messages
