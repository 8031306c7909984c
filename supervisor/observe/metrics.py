"""Prometheus metrics, as the master serves them.

One ``/metrics`` (served by the master, see ``health.py``) shows three sources together:
the master's facts about its workers, the request totals the workers ship to it
(``worker.meter``), and whatever the app itself wrote into the prometheus_client
multiprocess directory the master owns (``multiproc``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from asgi_supervise.observe.multiproc import MultiprocDir
from asgi_supervise.protocol import DURATION_BUCKETS, SIZE_BUCKETS, Buckets

HTTP_LABELS = ("http_request_method", "http_route", "http_response_status_code")

# The master's own metrics.
EXIT_REASONS = (
    "crash", "timeout", "memory", "requests", "lifetime", "reload", "scale", "boot-failure",
)  # fmt: skip
NOT_A_RESTART = "shutdown"
RELOAD_OUTCOMES = ("completed", "aborted")  # what master.rollout.Rollout.finish reports
STATES = ("booting", "ready", "draining")
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SLOT_GAUGES = (  # label `slot`, not pid: a recycled worker continues its slot's series
    ("worker_resident_memory_bytes", "RSS of the worker in a slot."),
    ("worker_cpu_ratio", "CPU use of the worker in a slot (1.0 = one core)."),
    ("worker_requests", "Requests served by the worker now in a slot."),
)


class RequestTotals:
    """The workers' request metrics added up: what ``worker.meter.RequestMetrics`` ships.

    Counters and histograms are deltas and simply add up, so they survive worker deaths
    and recycling without any files. Gauges (requests in flight, open WebSockets) are each
    worker's latest value, forgotten when it exits.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], tuple[Buckets, Buckets]] = {}
        self.active: dict[int, dict[str, int]] = {}  # by worker pid, then method
        self.ws_active: dict[int, int] = {}
        self.ws_opened = 0

    def add(self, pid: int, report: Mapping[str, Any]) -> None:
        """One "metrics" message; a malformed one raises ValueError and changes nothing."""
        try:
            entries = [_entry(entry) for entry in report.get("http", ())]
            active = {str(m): int(n) for m, n in report.get("active", {}).items()}
            ws_active, ws_opened = int(report.get("ws_active", 0)), int(report.get("ws_opened", 0))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"unreadable metrics report: {exc}") from None
        for key, durations, duration_sum, sizes, size_sum in entries:
            histograms = self.requests.get(key)
            if histograms is None:
                histograms = Buckets(DURATION_BUCKETS), Buckets(SIZE_BUCKETS)
                self.requests[key] = histograms
            histograms[0].add(durations, duration_sum)
            histograms[1].add(sizes, size_sum)
        if "active" in report:
            self.active[pid] = active
            self.ws_active[pid] = ws_active
        self.ws_opened += ws_opened

    def worker_gone(self, pid: int) -> None:
        self.active.pop(pid, None)
        self.ws_active.pop(pid, None)

    def collect(self) -> Iterator[Metric]:
        duration = HistogramMetricFamily(
            "http_server_request_duration_seconds", "Duration of HTTP server requests.",
            labels=HTTP_LABELS,
        )  # fmt: skip
        size = HistogramMetricFamily(
            "http_server_response_body_size_bytes", "Size of HTTP server response bodies.",
            labels=HTTP_LABELS,
        )  # fmt: skip
        for key, (durations, sizes) in sorted(self.requests.items()):
            duration.add_metric(key, _cumulative(durations), durations.total)
            size.add_metric(key, _cumulative(sizes), sizes.total)
        active = GaugeMetricFamily(
            "http_server_active_requests", "HTTP server requests in flight.",
            labels=("http_request_method",),
        )  # fmt: skip
        by_method: dict[str, int] = {}
        for counts in self.active.values():
            for method, number in counts.items():
                by_method[method] = by_method.get(method, 0) + number
        for method, number in sorted(by_method.items()):
            active.add_metric((method,), number)
        yield duration
        yield size
        yield active
        yield GaugeMetricFamily(
            "websocket_server_active_connections", "Accepted WebSocket connections open.",
            sum(self.ws_active.values()),
        )  # fmt: skip
        yield CounterMetricFamily(
            "websocket_server_connections", "WebSocket connections accepted.", self.ws_opened
        )


def _entry(entry: Any) -> tuple[tuple[str, str, str], list[int], float, list[int], float]:
    method, route, status, durations, duration_sum, sizes, size_sum = entry
    if len(durations) != len(DURATION_BUCKETS) + 1 or len(sizes) != len(SIZE_BUCKETS) + 1:
        raise ValueError("bucket counts do not match the buckets")
    key = (str(method), str(route), str(status))
    durations, sizes = [int(n) for n in durations], [int(n) for n in sizes]
    return key, durations, float(duration_sum), sizes, float(size_sum)


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
        self.boot = Buckets(SECONDS_BUCKETS)
        self.drain = Buckets(SECONDS_BUCKETS)
        self.reload = Buckets(SECONDS_BUCKETS)
        self.reloads = dict.fromkeys(RELOAD_OUTCOMES, 0)
        self.samples: dict[int, tuple[float, float, float]] = {}
        self.plan: dict[str, Any] | None = None
        self.draining = False
        self.readiness: Callable[[], bool] | None = None  # /readyz's own verdict
        self.dropped = 0  # app metric samples workers could not write: see app_samples_dropped
        self.requests = RequestTotals()
        self.header_timeouts_gone = 0  # closed by workers that have exited
        self.header_timeouts_live: dict[int, int] = {}  # by live worker pid: its total so far
        self.fork_server: dict[str, Any] | None = None  # the current one's facts (fork mode)
        self.registry.register(self)
        self.registry.register(self.requests)
        ProcessCollector(registry=self.registry)  # the master's own CPU, memory, fds

    def worker_started(self) -> None:
        self.starts += 1

    def worker_ready(self, boot_seconds: float) -> None:
        self.observe_boot(boot_seconds)

    def observe_boot(self, seconds: float) -> None:
        self.boot.observe(seconds)

    def worker_exited(self, reason: str) -> None:
        if reason != NOT_A_RESTART:  # reasons as `master.workers.Worker.exit_reason` names them
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

    def header_timeouts_seen(self, pid: int, total: int) -> None:
        """A live worker's count of connections closed by --timeout-request-header."""
        self.header_timeouts_live[pid] = max(total, self.header_timeouts_live.get(pid, 0))

    def header_timeouts_final(self, pid: int, total: int) -> None:
        """An exited worker's last count: it keeps counting towards the total."""
        self.header_timeouts_gone += max(total, self.header_timeouts_live.pop(pid, 0))

    def forget_slot(self, slot: int) -> None:
        self.samples.pop(slot, None)

    def set_fork_server(self, facts: dict[str, Any] | None) -> None:
        """The current fork server (generation, starts, rss, pss); None in exec mode."""
        self.fork_server = facts

    def set_plan(self, plan: Mapping[str, Any]) -> None:
        """From ``sizing.Plan.to_dict()``."""
        self.plan = dict(plan)

    def set_draining(self, draining: bool) -> None:
        self.draining = draining

    def set_readiness(self, verdict: Callable[[], bool]) -> None:
        """What /readyz answers, asked at each scrape: `asgi_supervise_ready` cannot
        disagree with the probe (--min-ready included), as a rule over the worker states
        and `draining` would."""
        self.readiness = verdict

    def app_samples_dropped(self, count: Any) -> None:
        """Writes to the app's own prometheus_client metrics that a worker dropped because
        the multiprocess directory had no room (``worker.promfiles``): a count since its
        last report. ValueError for anything but a count."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"unreadable count of dropped app metric samples: {count!r}")
        self.dropped += count

    def collect(self) -> Iterator[Metric]:
        counter, gauge, prefix = CounterMetricFamily, GaugeMetricFamily, "asgi_supervise_"
        yield counter(prefix + "worker_starts", "Worker processes spawned.", self.starts)
        yield counter(
            prefix + "header_timeouts",
            "Connections closed without complete request headers (--timeout-request-header).",
            self.header_timeouts_gone + sum(self.header_timeouts_live.values()),
        )
        yield _family(counter, "worker_restarts", "Worker exits, by reason.", self.restarts)
        yield _family(gauge, "workers", "Workers by state.", self.states, "state")
        yield _histogram("worker_boot_seconds", "Spawn to ready.", self.boot)
        yield _histogram("worker_drain_seconds", "Stop request to exit.", self.drain)
        yield _histogram("reload_duration_seconds", "Rolling reloads.", self.reload)
        yield _family(counter, "reloads", "Reloads by outcome.", self.reloads, "outcome")
        yield gauge(prefix + "draining", "1 once the master drains.", int(self.draining))
        if self.readiness is not None:
            yield gauge(
                prefix + "ready",
                "1 when /readyz answers 200 (--min-ready workers ready, not draining), else 0.",
                int(self.readiness()),
            )
        yield counter(
            prefix + "app_metric_samples_dropped",
            "Writes to the app's prometheus_client metrics dropped: no room for their files.",
            self.dropped,
        )
        if self.fork_server is not None:
            fs = self.fork_server
            yield gauge(
                prefix + "fork_server_generation",
                "Code generation of the fork server workers start from (-1: none up).",
                fs["generation"],
            )
            yield counter(prefix + "fork_server_starts", "Fork servers started.", fs["starts"])
            memory = {"rss": fs["rss"], "pss": fs["pss"]}
            yield _family(
                gauge, "fork_server_memory_bytes", "The fork server's memory.", memory, "kind"
            )
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
            if plan.get("memory_limit") is not None:  # no series, not +Inf, when unknown
                yield gauge(
                    prefix + "memory_limit_bytes",
                    "The memory limit the sizing plan divides: the cgroup limit, else the "
                    "host's memory.",
                    plan["memory_limit"],
                )


def _limit(allows: int | None) -> float:
    return float("inf") if allows is None else allows  # +Inf: no limit was found


def _family(
    kind: Any, name: str, doc: str, values: Mapping[str, float], label: str = "reason"
) -> Metric:
    family = kind("asgi_supervise_" + name, doc, labels=(label,))
    for value, number in values.items():
        family.add_metric((value,), number)
    return family


def _histogram(name: str, doc: str, buckets: Buckets) -> Metric:
    return HistogramMetricFamily(
        "asgi_supervise_" + name, doc, buckets=_cumulative(buckets), sum_value=buckets.total
    )


def _cumulative(buckets: Buckets) -> list[tuple[str, float]]:
    """Prometheus histogram buckets: cumulative counts under their `le` labels."""
    running, out = 0, []
    for bound, count in zip((*buckets.bounds, float("inf")), buckets.counts, strict=True):
        running += count
        out.append((floatToGoString(bound), running))
    return out


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
