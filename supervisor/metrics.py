"""Prometheus metrics: request metrics in the workers, supervisor metrics in the master.

One ``/metrics`` (served by the master, see ``health.py``) shows two sources together:
what the workers wrote into a prometheus_client multiprocess directory (our request
metrics and the app's own metrics), and the master's in-memory facts about its workers.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from asgi_supervise.multiproc import MultiprocDir

log = logging.getLogger("asgi_supervise.master")
perf_counter = time.perf_counter


# OpenTelemetry HTTP semantic conventions, as Prometheus names.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
SIZE_BUCKETS = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
UNMATCHED = "unmatched"  # the one route label of everything no router claimed
HTTP_LABELS = ("http_request_method", "http_route", "http_response_status_code")

# The master's own metrics.
EXIT_REASONS = (
    "crash", "timeout", "memory", "requests", "lifetime", "reload", "scale", "boot-failure",
)  # fmt: skip
NOT_A_RESTART = "shutdown"
RELOAD_OUTCOMES = ("completed", "aborted")  # what rolling.Rollout.finish reports
STATES = ("booting", "ready", "draining")
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SLOT_GAUGES = (  # label `slot`, not pid: a recycled worker continues its slot's series
    ("worker_resident_memory_bytes", "RSS of the worker in a slot."),
    ("worker_cpu_ratio", "CPU use of the worker in a slot (1.0 = one core)."),
    ("worker_requests", "Requests served by the worker now in a slot."),
)


# --- request metrics, in each worker -------------------------------------------------------


class _Buckets:
    """A histogram in plain Python: bucket counts (last one +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((floatToGoString(bound), running))
        return out

    def add_to(self, child: Histogram) -> None:
        """Bulk-add into a prometheus_client histogram: one file write per bucket touched.

        prometheus_client has no public bulk observe; `_sum` and `_buckets` (per-bucket,
        not cumulative, counts) are its storage, and the unit tests would notice a change.
        """
        for index, count in enumerate(self.counts):
            if count:
                child._buckets[index].inc(count)
        child._sum.inc(self.total)


class _Pending:
    """One label set's observations since the last flush."""

    __slots__ = ("duration", "size")

    def __init__(self) -> None:
        self.duration = _Buckets(DURATION_BUCKETS)
        self.size = _Buckets(SIZE_BUCKETS)


def route_of(scope: Mapping[str, Any]) -> str:
    """The route template, never the raw path: raw paths make unbounded label sets.

    Starlette-based routers (FastAPI) leave the matched route in ``scope["route"]``;
    other apps may set ``scope["http_route"]``; everything else shares one label.
    """
    route = scope.get("route")
    if route is not None:
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if isinstance(template, str):
            return template
    template = scope.get("http_route")
    return template if isinstance(template, str) else UNMATCHED


class RequestMetrics:
    """ASGI middleware: OpenTelemetry-named request metrics, cheap on the request path.

    A prometheus_client observation in multiprocess mode takes a lock and writes an mmap,
    about 2-3 us each, and a request needs four (see ``bench/metrics_overhead.py``). So a
    request only touches plain dicts here; `flush` moves the totals into prometheus_client
    once a second and at shutdown. Observations since the last flush die with a killed
    worker; in-flight gauges lag by up to a flush interval.
    """

    def __init__(self, app: Any, registry: CollectorRegistry | None = None) -> None:
        self.app = app
        self._pending: dict[tuple[str, str, int], _Pending] = {}
        self._active: dict[str, int] = {}
        self._ws_active = 0
        self._ws_opened = 0
        self._children: dict[tuple[str, str, int], tuple[Histogram, Histogram]] = {}
        self.duration = Histogram(
            "http_server_request_duration_seconds", "Duration of HTTP server requests.",
            HTTP_LABELS, registry=registry, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.size = Histogram(
            "http_server_response_body_size_bytes", "Size of HTTP server response bodies.",
            HTTP_LABELS, registry=registry, buckets=SIZE_BUCKETS,
        )  # fmt: skip
        self.active = Gauge(
            "http_server_active_requests", "HTTP server requests in flight.",
            ("http_request_method",), registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.ws_active = Gauge(
            "websocket_server_active_connections", "Accepted WebSocket connections open.",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.ws_total = Counter(
            "websocket_server_connections", "WebSocket connections accepted.", registry=registry
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # inline below: every coroutine level costs ~0.1 us
            if scope["type"] == "websocket":
                return await self._websocket(scope, receive, send)
            return await self.app(scope, receive, send)  # lifespan, and anything newer
        method = scope["method"]
        if method not in KNOWN_METHODS:
            method = "_OTHER"  # OTel: arbitrary methods must not become label values
        active = self._active
        active[method] = active.get(method, 0) + 1
        status = 500  # what the server answers if the app fails before responding
        size = 0

        def counting_send(message: Any) -> Any:  # sync: hands back send's awaitable, no frame
            nonlocal status, size
            if message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        start = perf_counter()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            active[method] -= 1
            self._record((method, route_of(scope), status), perf_counter() - start, size)

    def _record(self, key: tuple[str, str, int], seconds: float, size: int) -> None:
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        duration, body = pending.duration, pending.size  # _Buckets.observe, inlined
        duration.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        duration.total += seconds
        body.counts[bisect_left(SIZE_BUCKETS, size)] += 1
        body.total += size

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

    def flush(self) -> None:
        """Move what the requests recorded into prometheus_client (the mmap files)."""
        pending, self._pending = self._pending, {}
        for key, observed in pending.items():
            children = self._children.get(key)
            if children is None:
                labels = (key[0], key[1], str(key[2]))
                children = (self.duration.labels(*labels), self.size.labels(*labels))
                self._children[key] = children
            observed.duration.add_to(children[0])
            observed.size.add_to(children[1])
        for method, count in self._active.items():
            self.active.labels(method).set(count)
        self.ws_active.set(self._ws_active)
        if self._ws_opened:
            self.ws_total.inc(self._ws_opened)
            self._ws_opened = 0


# --- supervisor metrics, in the master -----------------------------------------------------


class SupervisorMetrics:
    """The master's facts about its workers, as a collector on a private registry.

    Plain Python state rendered at scrape time, never prometheus_client metric objects:
    those turn into mmap files when ``PROMETHEUS_MULTIPROC_DIR`` is set in the master's
    own environment, and would then be scraped twice.

    ``asgi_supervise_worker_restarts_total`` counts every worker exit while the master
    keeps running; exits with reason ``shutdown`` are the master stopping, not churn.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.starts = 0
        self.restarts = dict.fromkeys(EXIT_REASONS, 0)
        self.states = dict.fromkeys(STATES, 0)
        self.boot = _Buckets(SECONDS_BUCKETS)
        self.drain = _Buckets(SECONDS_BUCKETS)
        self.reload = _Buckets(SECONDS_BUCKETS)
        self.reloads = dict.fromkeys(RELOAD_OUTCOMES, 0)
        self.samples: dict[int, tuple[float, float, float]] = {}
        self.plan: dict[str, Any] | None = None
        self.draining = False
        self.registry.register(self)
        ProcessCollector(registry=self.registry)  # the master's own CPU, memory, fds

    def worker_started(self, slot: int) -> None:
        self.starts += 1

    def worker_ready(self, slot: int, boot_seconds: float) -> None:
        self.observe_boot(boot_seconds)

    def observe_boot(self, seconds: float) -> None:
        self.boot.observe(seconds)

    def worker_exited(self, slot: int, reason: str) -> None:
        if reason != NOT_A_RESTART:  # reasons as `process.Worker.exit_reason` names them
            self.restarts[reason] = self.restarts.get(reason, 0) + 1

    def set_worker_states(self, counts: Mapping[str, int]) -> None:
        self.states = {**dict.fromkeys(STATES, 0), **counts}

    def observe_reload(self, seconds: float, outcome: str) -> None:
        self.reload.observe(seconds)
        self.reloads[outcome] = self.reloads.get(outcome, 0) + 1

    def observe_drain(self, seconds: float) -> None:
        """Seconds one worker took from the stop request to its exit."""
        self.drain.observe(seconds)

    def sample_worker(self, slot: int, rss_bytes: float, cpu_percent: float, requests: int) -> None:
        self.samples[slot] = (rss_bytes, cpu_percent / 100.0, requests)

    def forget_slot(self, slot: int) -> None:
        self.samples.pop(slot, None)

    def set_plan(self, plan: Mapping[str, Any]) -> None:
        """From ``sizing.Plan.to_dict()``."""
        self.plan = dict(plan)

    def set_draining(self, draining: bool) -> None:
        self.draining = draining

    def collect(self) -> Iterator[Metric]:
        counter, gauge, prefix = CounterMetricFamily, GaugeMetricFamily, "asgi_supervise_"
        yield counter(prefix + "worker_starts", "Worker processes spawned.", self.starts)
        yield _family(counter, "worker_restarts", "Worker exits, by reason.", self.restarts)
        yield _family(gauge, "workers", "Workers by state.", self.states, "state")
        yield _histogram("worker_boot_seconds", "Spawn to ready.", self.boot)
        yield _histogram("worker_drain_seconds", "Stop request to exit.", self.drain)
        yield _histogram("reload_duration_seconds", "Rolling reloads.", self.reload)
        yield _family(counter, "reloads", "Reloads by outcome.", self.reloads, "outcome")
        yield gauge(prefix + "draining", "1 once the master drains.", int(self.draining))
        per_slot = sorted(self.samples.items())
        for index, (name, doc) in enumerate(SLOT_GAUGES):
            values = {str(slot): sample[index] for slot, sample in per_slot}
            yield _family(gauge, name, doc, values, "slot")
        if self.plan is not None:
            plan = self.plan
            yield gauge(prefix + "planned_workers", "Workers the plan chose.", plan["workers"])
            allows = {b["name"]: _limit(b["allows"]) for b in plan.get("budgets", ())}
            yield _family(gauge, "plan_budget", "Workers each budget allows.", allows, "budget")
            limited = {str(plan.get("limited_by")): 1}
            yield _family(gauge, "plan_limited_by", "The deciding budget.", limited, "budget")


def _limit(allows: int | None) -> float:
    return float("inf") if allows is None else allows  # +Inf: no limit was found


def _family(
    kind: Any, name: str, doc: str, values: Mapping[str, float], label: str = "reason"
) -> Metric:
    family = kind("asgi_supervise_" + name, doc, labels=(label,))
    for value, number in values.items():
        family.add_metric((value,), number)
    return family


def _histogram(name: str, doc: str, buckets: _Buckets) -> Metric:
    return HistogramMetricFamily(
        "asgi_supervise_" + name, doc, buckets=buckets.cumulative(), sum_value=buckets.total
    )


# --- exposition ----------------------------------------------------------------------------


class _Together:
    """Several registries as one collector, for one exposition."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self.registries = registries

    def collect(self) -> Iterator[Metric]:
        for registry in self.registries:
            yield from registry.collect()


def render(
    accept: str | None, multiproc: MultiprocDir | None, supervisor: SupervisorMetrics
) -> tuple[bytes, str]:
    """The body and content type of one scrape; OpenMetrics when the scraper asks for it."""
    encode, content_type = choose_encoder(accept or "")
    registries = [supervisor.registry]
    if multiproc is not None:
        registries.append(multiproc.collect_registry())
    return encode(_Together(*registries)), content_type
