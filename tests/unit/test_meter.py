"""Request metrics: the worker's middleware driven through the ASGI interface, its
reports carried as JSON like the control channel does, and the master's totals."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import socket
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asgi_supervise.observe.metrics import RequestTotals, SupervisorMetrics, render
from asgi_supervise.protocol import Control
from asgi_supervise.worker import meter
from asgi_supervise.worker.meter import (
    MESSAGE_BYTES,
    UNMATCHED,
    RequestMetrics,
)
from conftest import c_compiler


class Exchange:
    """Drive one ASGI call the way a server does: scope, receive, send."""

    def __init__(self, app: Any, scope: dict[str, Any], incoming: list[Any] | None = None):
        self.app, self.scope = app, scope
        self.incoming: asyncio.Queue[Any] = asyncio.Queue()
        for message in incoming or [{"type": "http.request", "body": b""}]:
            self.incoming.put_nowait(message)
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> Any:
        return await self.incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def run(self) -> None:
        await self.app(self.scope, self.receive, self.send)


def http(path: str = "/", method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": []}


async def hello(scope: Any, receive: Any, send: Any) -> None:
    if scope["path"].startswith("/items/"):  # what a Starlette router leaves in the scope
        scope["route"] = SimpleNamespace(path="/items/{id:int}", path_format="/items/{id}")
    elif scope["path"].startswith("/plain/"):  # a route object with only a path
        scope["route"] = SimpleNamespace(path="/plain/{id}")
    elif scope["path"] == "/raw-routed":
        scope["http_route"] = "/raw-routed"
    elif scope["path"] == "/boom":
        raise RuntimeError("boom")
    status = 404 if scope["path"].startswith("/missing") else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"hello", "more_body": True})
    await send({"type": "http.response.body", "body": b", world"})


Metered = Callable[[Any], RequestMetrics]
METERS = {"python": meter.PythonMeter}
if meter.COMPILED:
    METERS["compiled"] = meter.Meter


@pytest.fixture(params=list(METERS))
def metered(request: pytest.FixtureRequest) -> Metered:
    """RequestMetrics over each meter: every test holds for the C one and its reference."""
    return functools.partial(RequestMetrics, meter=METERS[request.param])


def serve(metrics: RequestMetrics, *scopes: dict[str, Any]) -> list[Exchange]:
    exchanges = [Exchange(metrics, scope) for scope in scopes]

    async def main() -> None:
        for exchange in exchanges:
            await exchange.run()

    asyncio.run(main())
    return exchanges


class Master:
    """The master's side: reports cross as JSON and land in the real RequestTotals."""

    def __init__(self, pid: int = 101, supervisor: SupervisorMetrics | None = None) -> None:
        self.pid = pid
        self.supervisor = supervisor or SupervisorMetrics()
        self.totals: RequestTotals = self.supervisor.requests
        self.messages: list[bytes] = []
        self.accept = True

    def offer(self, message: dict[str, Any]) -> bool:
        if not self.accept:
            return False
        data = json.dumps(message).encode()
        self.messages.append(data)
        self.totals.add(self.pid, json.loads(data))
        return True

    def scrape(self) -> dict[str, Any]:
        body, _ = render(None, None, self.supervisor)
        return {f.name: f for f in text_string_to_metric_families(body.decode())}

    def sample(self, name: str, **labels: str) -> float | None:
        for family in self.scrape().values():
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return None

    def count(self, method: str, route: str, status: str) -> float | None:
        return self.sample(
            "http_server_request_duration_seconds_count",
            http_request_method=method, http_route=route, http_response_status_code=status,
        )  # fmt: skip


def test_buckets_count_values_up_to_and_including_their_bound(metered: Metered) -> None:
    async def sized(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * int(scope["path"][1:])})

    metrics, master = metered(sized), Master()
    serve(metrics, *(http(f"/{n}") for n in (0, 100, 101, 1000, 20_000_000)))
    metrics.deliver(master.offer)
    labels = {"http_request_method": "GET", "http_route": UNMATCHED}
    labels["http_response_status_code"] = "200"
    name = "http_server_response_body_size_bytes"
    cumulative = {"100.0": 2, "1000.0": 4, "1e+07": 4, "+Inf": 5}
    for le, count in cumulative.items():
        assert master.sample(f"{name}_bucket", **labels, le=le) == count, le
    assert master.sample(f"{name}_sum", **labels) == 20_001_201
    seconds = master.sample("http_server_request_duration_seconds_sum", **labels)
    assert seconds is not None and 0 < seconds < 5


def test_route_label_is_the_template(metered: Metered) -> None:
    metrics, master = metered(hello), Master()
    serve(metrics, http("/items/1"), http("/items/2"), http("/plain/3"), http("/raw-routed"))
    assert master.count("GET", "/items/{id}", "200") is None  # nothing delivered yet
    assert metrics.deliver(master.offer)
    assert master.count("GET", "/items/{id}", "200") == 2
    assert master.count("GET", "/plain/{id}", "200") == 1
    assert master.count("GET", "/raw-routed", "200") == 1
    assert master.count("GET", "/items/1", "200") is None


def test_unmatched_paths_share_one_label(metered: Metered) -> None:
    metrics, master = metered(hello), Master()
    serve(metrics, *(http(f"/missing/{n}") for n in range(20)), http("/"))
    metrics.deliver(master.offer)
    assert master.count("GET", UNMATCHED, "404") == 20
    assert master.count("GET", UNMATCHED, "200") == 1
    family = master.scrape()["http_server_request_duration_seconds"]
    assert {s.labels["http_route"] for s in family.samples} == {UNMATCHED}


def test_sizes_methods_buckets_and_the_response_untouched(metered: Metered) -> None:
    metrics, master = metered(hello), Master()
    exchanges = serve(metrics, http("/items/1", "POST"), http("/items/1", "BREW"))
    assert [m["type"] for m in exchanges[0].sent] == [
        "http.response.start", "http.response.body", "http.response.body",
    ]  # fmt: skip
    metrics.deliver(master.offer)
    assert master.count("POST", "/items/{id}", "200") == 1
    assert master.count("_OTHER", "/items/{id}", "200") == 1  # no free-form method labels
    labels = {"http_request_method": "POST", "http_route": "/items/{id}"}
    labels["http_response_status_code"] = "200"
    size = master.sample("http_server_response_body_size_bytes_sum", **labels)
    assert size == len(b"hello, world")
    assert master.sample("http_server_response_body_size_bytes_bucket", **labels, le="100.0") == 1
    assert master.sample("http_server_request_duration_seconds_bucket", **labels, le="5.0") == 1


def test_each_observation_is_delivered_once(metered: Metered) -> None:
    metrics, master = metered(hello), Master()
    serve(metrics, http("/items/1"))
    metrics.deliver(master.offer)
    metrics.deliver(master.offer)
    serve(metrics, http("/items/1"))
    metrics.deliver(master.offer)
    assert master.count("GET", "/items/{id}", "200") == 2


def test_what_the_channel_refuses_is_kept_and_sent_later(metered: Metered) -> None:
    metrics, master = metered(hello), Master()
    serve(metrics, http("/items/1"), http("/missing"))
    master.accept = False
    assert not metrics.deliver(master.offer)
    serve(metrics, http("/items/2"))
    assert not metrics.deliver(master.offer)
    master.accept = True
    assert metrics.deliver(master.offer)
    assert master.count("GET", "/items/{id}", "200") == 2
    assert master.count("GET", UNMATCHED, "404") == 1


def test_many_routes_split_into_messages_the_master_can_read(metered: Metered) -> None:
    async def routed(scope: Any, receive: Any, send: Any) -> None:
        scope["http_route"] = scope["path"] + "/{id}" + "x" * 200
        await hello({**scope, "path": "/"}, receive, send)

    metrics, master = metered(routed), Master()
    serve(metrics, *(http(f"/r{n}") for n in range(1500)))
    assert metrics.deliver(master.offer)
    assert len(master.messages) > 1
    assert all(len(data) <= MESSAGE_BYTES + 1024 for data in master.messages)
    family = master.scrape()["http_server_request_duration_seconds"]
    assert sum(s.value for s in family.samples if s.name.endswith("_count")) == 1500


def test_an_app_error_counts_as_500_and_propagates(metered: Metered) -> None:
    metrics, master = metered(hello), Master()
    with pytest.raises(RuntimeError):
        serve(metrics, http("/boom"))
    metrics.deliver(master.offer)
    assert master.count("GET", UNMATCHED, "500") == 1
    assert master.sample("http_server_active_requests", http_request_method="GET") is None


def test_active_requests_while_in_flight_per_worker(metered: Metered) -> None:
    release = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await hello(scope, receive, send)

    supervisor = SupervisorMetrics()
    metrics, master, other = metered(slow), Master(1, supervisor), Master(2, supervisor)

    async def main() -> None:
        requests = [asyncio.create_task(Exchange(metrics, http()).run()) for _ in range(3)]
        await asyncio.sleep(0)
        metrics.deliver(master.offer)
        metrics.deliver(other.offer)  # as if a second worker had three in flight too
        assert master.sample("http_server_active_requests", http_request_method="GET") == 6
        supervisor.requests.worker_gone(2)
        assert master.sample("http_server_active_requests", http_request_method="GET") == 3
        release.set()
        await asyncio.gather(*requests)
        metrics.deliver(master.offer)
        assert master.sample("http_server_active_requests", http_request_method="GET") is None
        assert master.count("GET", UNMATCHED, "200") == 3

    asyncio.run(main())


def test_websocket_connections(metered: Metered) -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await receive()
        await send({"type": "websocket.close", "code": 1000})

    metrics, master = metered(echo), Master()
    scope = {"type": "websocket", "path": "/ws", "headers": []}

    async def main() -> None:
        exchange = Exchange(metrics, scope, [{"type": "websocket.connect"}])
        task = asyncio.create_task(exchange.run())
        await asyncio.sleep(0)
        metrics.deliver(master.offer)
        assert master.sample("websocket_server_active_connections") == 1
        exchange.incoming.put_nowait({"type": "websocket.receive", "text": "hi"})
        await task

    asyncio.run(main())
    metrics.deliver(master.offer)
    metrics.deliver(master.offer)
    assert master.sample("websocket_server_active_connections") == 0
    assert master.sample("websocket_server_connections_total") == 1


def test_lifespan_passes_through_untouched(metered: Metered) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Any:
        return {}

    async def send(message: Any) -> None:
        return None

    scope = {"type": "lifespan"}
    asyncio.run(metered(app)(scope, receive, send))
    assert seen == [(scope, receive, send)]


@pytest.mark.parametrize(
    "report",
    [
        {"http": [["GET", "/", "200", [1, 2], 0.1, [0] * 7, 5]]},  # wrong bucket count
        {"http": [["GET", "/", "200"]]},
        {"http": [["GET", "/", "200", ["x"] * 15, 0.1, [0] * 7, 5]]},
        {"http": "nonsense"},
        {"active": {"GET": "many"}},
    ],
)
def test_a_malformed_report_is_refused_whole(report: dict[str, Any]) -> None:
    totals = RequestTotals()
    good = ["GET", "/", "200", [1] + [0] * 14, 0.001, [1] + [0] * 6, 5]
    with pytest.raises(ValueError):
        totals.add(7, {"http": [good], **report})
    assert totals.requests == {} and totals.active == {}


def test_offers_to_a_full_channel_return_instead_of_blocking() -> None:
    """A stalled master must never stall a worker's event loop: it keeps the data."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with master, worker:
        control = Control(worker)
        message = {"t": "metrics", "http": [], "pad": "x" * 4000}
        offered = 0
        while control.offer(message):
            offered += 1
            assert offered < 10_000, "the channel never filled up"
        assert not control.offer(message, timeout=0.2)  # gives up (pytest-timeout if not)
        assert json.loads(master.recv(1 << 16)) == message  # the master takes one ...
        assert control.offer(message)  # ... and there is room again
        # A timed offer waits for room rather than failing at once: the master reading
        # the queue, whether before or during the wait, lets it through.
        sent: list[bool] = []
        offering = threading.Thread(target=lambda: sent.append(control.offer(message, 30)))
        offering.start()
        master.settimeout(0.1)
        for _ in range(100_000):  # the kernel wakes a blocked sender once most is read
            if sent:
                break
            with contextlib.suppress(TimeoutError):  # all read: the sender's is next
                assert json.loads(master.recv(1 << 16)) == message
        offering.join(30)
        assert sent == [True]


def test_openmetrics_scrape_of_the_request_totals_parses(metered: Metered) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse

    metrics, master = metered(hello), Master()
    serve(metrics, http("/items/1"), http("/missing"))
    metrics.deliver(master.offer)
    accept = "application/openmetrics-text;version=1.0.0"
    body, content_type = render(accept, None, master.supervisor)
    assert content_type.startswith("application/openmetrics-text")
    got = {f.name: f for f in parse(body.decode())}
    duration = got["http_server_request_duration_seconds"]
    counts = {
        (s.labels["http_route"], s.labels["http_response_status_code"]): s.value
        for s in duration.samples
        if s.name.endswith("_count")
    }
    assert counts == {("/items/{id}", "200"): 1, (UNMATCHED, "404"): 1}
    assert got["websocket_server_connections"].type == "counter"


def taken(metrics: RequestMetrics) -> tuple[dict[tuple[str, str, str], int], dict[str, int]]:
    """Requests recorded by label set, and those still active, after a fold."""
    metrics.fold()
    recorded = {key: sum(durations.counts) for key, (durations, _) in metrics._undelivered.items()}
    return recorded, metrics.active()


def test_a_cancelled_request_is_recorded_and_the_cancellation_propagates(
    metered: Metered,
) -> None:
    started = asyncio.Event()

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await asyncio.Event().wait()

    metrics = metered(stuck)

    async def main() -> None:
        task = asyncio.create_task(Exchange(metrics, http()).run())
        await started.wait()
        assert taken(metrics) == ({}, {"GET": 1})
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert taken(metrics) == ({("GET", UNMATCHED, "200"): 1}, {})


def test_an_app_that_handles_a_thrown_exception_goes_on_to_answer(metered: Metered) -> None:
    started = asyncio.Event()

    async def stubborn(scope: Any, receive: Any, send: Any) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # awaits again after the throw: still the same request
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"bye"})

    metrics = metered(stubborn)

    async def main() -> list[dict[str, Any]]:
        exchange = Exchange(metrics, http())
        task = asyncio.create_task(exchange.run())
        await started.wait()
        task.cancel()
        await task
        return exchange.sent

    assert [m["type"] for m in asyncio.run(main())] == ["http.response.start", "http.response.body"]
    assert taken(metrics) == ({("GET", UNMATCHED, "503"): 1}, {})


def test_an_error_after_the_response_started_keeps_its_status(metered: Metered) -> None:
    async def late(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        raise ValueError("late")

    with pytest.raises(ValueError, match="late"):
        serve(metrics := metered(late), http(method="PUT"))
    assert taken(metrics) == ({("PUT", UNMATCHED, "201"): 1}, {})


def test_apps_that_fail_on_call_or_return_other_awaitables(metered: Metered) -> None:
    class Answer:
        """An awaitable that is not a coroutine, as some frameworks return."""

        def __init__(self, send: Any) -> None:
            self.send = send

        def __await__(self) -> Any:
            yield from self.send({"type": "http.response.start", "status": 204}).__await__()
            return "result"

    def plain(scope: Any, receive: Any, send: Any) -> Any:
        if scope["path"] == "/sync-error":
            raise LookupError("before any await")
        return Answer(send)

    metrics = metered(plain)

    async def main() -> Any:
        with pytest.raises(LookupError):
            await metrics(http("/sync-error"), Exchange.receive, Exchange(None, {}).send)
        return await metrics(http(), Exchange.receive, Exchange(None, {}).send)

    assert asyncio.run(main()) == "result"  # what the app returned reaches the server
    assert taken(metrics) == ({("GET", UNMATCHED, "500"): 1, ("GET", UNMATCHED, "204"): 1}, {})


def test_a_request_dropped_unfinished_is_recorded_when_collected(metered: Metered) -> None:
    async def waits(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.get_running_loop().create_future()

    metrics = metered(waits)

    async def main() -> None:
        awaitable = metrics(http(), Exchange.receive, Exchange(None, {}).send)
        step = awaitable.__await__()
        next(step)  # suspended inside the app: the request is in flight
        assert taken(metrics) == ({}, {"GET": 1})
        del awaitable, step
        gc.collect()

    asyncio.run(main())
    assert taken(metrics) == ({("GET", UNMATCHED, "500"): 1}, {})


def test_the_meter_is_compiled_wherever_there_is_a_c_compiler() -> None:
    """A broken build falls back to PythonMeter silently; this makes it loud."""
    if c_compiler() is None:
        pytest.skip("no C compiler: the pure-Python meter is expected")
    assert meter.COMPILED, "asgi_supervise.worker._meter did not build; see pip's output"
