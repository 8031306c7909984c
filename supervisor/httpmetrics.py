"""HTTP request metrics, measured in each worker and shipped to the master.

A request only appends its duration and body size to two lists of its label set. Every
tick (0.1 s) the worker sorts the lists into bucket counts; once a second it sends the
counts to the master over the control channel, and the master adds them up
(``metrics.RequestTotals``) and serves them.

Why not prometheus_client in the worker: a multiprocess observation takes a lock and
writes an mmap (2-3 us, four per request), and every scrape re-parses every live worker's
files (~49,000 entries for 8 workers x 50 routes). Here a request's bookkeeping is a dict
lookup and two list appends, and a scrape reads the master's totals. What remains per
request is mostly the ASGI layer and the `send` wrapper any status-reading middleware
needs (bench/metrics_overhead.py --instructions). This module imports nothing heavy: it
runs in every worker.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

# OpenTelemetry HTTP semantic conventions, as Prometheus names and buckets.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
SIZE_BUCKETS = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
OTHER_METHOD = "_OTHER"  # OTel: arbitrary methods must not become label values
UNMATCHED = "unmatched"  # the one route label of everything no router claimed
MAX_ROUTE = 256  # characters of a route label; longer templates are cut
MESSAGE_BYTES = 48 * 1024  # per control message: the master reads 64 KiB at a time

perf_counter = time.perf_counter
Key = tuple[str, str, str]  # method, route template, status code
Samples = tuple[list[float], list[int]]  # durations, body sizes
Offer = Callable[[dict[str, Any]], bool]  # sends one message without blocking


def bucket_counts(values: list[float] | list[int], bounds: tuple[float, ...]) -> list[int]:
    """Per-bucket (not cumulative) counts, the last one +Inf; `le`: value <= bound.

    One sort and a bisect per bound instead of a bisect per observation.
    """
    values.sort()
    counts, below = [], 0
    for bound in bounds:
        upto = bisect_right(values, bound)
        counts.append(upto - below)
        below = upto
    counts.append(len(values) - below)
    return counts


class Buckets:
    """A histogram in plain Python: per-bucket counts (the last one +Inf) and a sum.

    The worker fills them from its samples, the master adds up what workers send and
    observes its own durations into them.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total: float = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value

    def add(self, counts: list[int], total: float) -> None:
        for index, count in enumerate(counts):
            self.counts[index] += count
        self.total += total

    def add_samples(self, values: list[float] | list[int]) -> None:
        self.add(bucket_counts(values, self.bounds), sum(values))


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def label_set(method: str, route: Any, status: Any) -> Key:
    """The label values a request is counted under; every one of them bounded."""
    route = route[:MAX_ROUTE] if isinstance(route, str) and route else UNMATCHED
    return method_label(method), route, str(status)


class RequestMetrics:
    """ASGI middleware: request durations, statuses and sizes by route template.

    The route label is the template a Starlette or FastAPI router leaves in
    ``scope["route"]`` (or a string another framework puts in ``scope["http_route"]``),
    never the raw path. Observations since the last delivery die with a killed worker.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._samples: dict[tuple[str, Any, int], Samples] = {}
        self._started: list[str] = []
        self._counts: Counter[str] = Counter()  # requests started minus finished, by method
        self._undelivered: dict[Key, tuple[Buckets, Buckets]] = {}  # durations, sizes
        self._ws_active = 0
        self._ws_opened = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Every line here runs per request: see bench/metrics_overhead.py before adding one.
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                return await self._websocket(scope, receive, send)
            return await self.app(scope, receive, send)  # lifespan, and anything newer
        status = 500  # what the server answers if the app fails before responding
        size = 0

        def tap(message: Any) -> Any:  # sync: hands back send's awaitable, no extra frame
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                size += len(message.get("body", b""))
            return send(message)

        method = scope["method"]
        self._started.append(method)
        start = perf_counter()
        try:
            await self.app(scope, receive, tap)
        finally:
            seconds = perf_counter() - start
            route = scope.get("route")
            if route is None:
                template = scope.get("http_route")
            else:  # Starlette's Route: `path_format` is the template without converters
                template = getattr(route, "path_format", None) or getattr(route, "path", None)
            samples = self._samples.get((method, template, status))
            if samples is None:
                samples = self._samples[method, template, status] = ([], [])
            samples[0].append(seconds)
            samples[1].append(size)

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
        """Bucket the samples since the last fold into what awaits delivery.

        The worker folds every tick (0.1 s): folding a whole second of 20,000 requests at
        once would hold its event loop for ~4 ms (measured on a 2-core test machine).
        """
        samples, self._samples = self._samples, {}
        started, self._started = self._started, []
        counts = self._counts
        for method, number in Counter(started).items():
            counts[method_label(method)] += number
        for (method, template, status), observed in samples.items():
            key = label_set(method, template, status)
            totals = self._undelivered.get(key)
            if totals is None:
                totals = self._undelivered[key] = Buckets(DURATION_BUCKETS), Buckets(SIZE_BUCKETS)
            durations, sizes = observed
            counts[key[0]] -= len(durations)
            totals[0].add_samples(durations)
            totals[1].add_samples(sizes)

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
