"""Proxy headers: `forwarded.proxy_headers` must change a scope exactly as uvicorn's
ProxyHeadersMiddleware does. Every case runs through uvicorn's middleware once and
through ours three times (the later ones answered from what it kept), under several
--forwarded-allow-ips values, and the app must see the same scope; then what ours hands
the server, and what it keeps. Real requests to a worker: tests/e2e/test_proxy_headers.py."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from typing import Any

import pytest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from asgi_supervise.worker import forwarded

PROXY = ("127.0.0.1", 50000)
OUTSIDE = ("203.0.113.9", 50000)
XFF = (b"x-forwarded-for", b"198.51.100.7")
PROTO = (b"x-forwarded-proto", b"https")
HOST = (b"host", b"example.test")

CASES = {  # name: (scope type, client, headers)
    "no forwarded headers, trusted client": ("http", PROXY, [HOST]),
    "no headers at all": ("http", PROXY, []),
    "x-forwarded-for from a trusted client": ("http", PROXY, [HOST, XFF]),
    "x-forwarded-proto from a trusted client": ("http", PROXY, [PROTO, HOST]),
    "both, repeated x-forwarded-for": ("http", PROXY, [XFF, PROTO, (XFF[0], b"10.9.9.9")]),
    "both from an untrusted client": ("http", OUTSIDE, [XFF, PROTO]),
    "a chain of hops, the last ones trusted": (
        "http",
        PROXY,
        [(XFF[0], b"198.51.100.7, 10.1.2.3, 127.0.0.1")],
    ),
    "host:port and [ipv6]:port in x-forwarded-for": (
        "http",
        PROXY,
        [(XFF[0], b"[2001:db8::1]:4711, 198.51.100.7:8080")],
    ),
    "an empty x-forwarded-for": ("http", PROXY, [(XFF[0], b"")]),
    "a scheme uvicorn does not accept": ("http", PROXY, [(PROTO[0], b"ftp")]),
    "wss on a plain http request": ("http", PROXY, [(PROTO[0], b" wss ")]),
    "a scheme in upper case": ("http", PROXY, [(PROTO[0], b"HTTPS")]),
    "two x-forwarded-proto, the last counts": ("http", PROXY, [PROTO, (PROTO[0], b"http")]),
    "lifespan": ("lifespan", PROXY, [PROTO, XFF]),
    "names not lower-case (as uvicorn: ignored)": (
        "http",
        PROXY,
        [(b"X-Forwarded-For", b"1.2.3.4")],
    ),
    "websocket: https becomes wss": ("websocket", PROXY, [PROTO, XFF]),
    "websocket without forwarded headers": ("websocket", PROXY, [HOST]),
    "headers as a tuple, not a list": ("http", PROXY, ((XFF[0], XFF[1]),)),
    "no client": ("http", None, [XFF]),
    "an ipv6 client": ("http", ("::1", 50000), [XFF, PROTO]),
}
TRUSTED = {  # what --forwarded-allow-ips may say
    "loopback": ["127.0.0.1"],
    "a network and ipv6": ["10.0.0.0/8", "::1", "127.0.0.1"],
    "everyone": ["*"],
    "a literal": ["unix-socket"],
}


def recording_app(seen: list[dict[str, Any]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> str:
        seen.append(dict(scope))
        return "returned"

    return app


def seen_through(
    wrapping: Any, kind: str, client: Any, headers: Any, times: int = 1
) -> tuple[Any, ...]:
    """(scheme, client) of the scopes the app behind `wrapping(app)` was called with, for
    `times` requests alike: ours answers the later ones from what it kept."""
    seen: list[dict[str, Any]] = []
    wrapped = wrapping(recording_app(seen))

    async def serve() -> Any:  # as uvicorn's protocols call the app
        scheme = "ws" if kind == "websocket" else "http"
        scope = {"type": kind, "scheme": scheme, "headers": list(headers)}
        if client is not None:
            scope["client"] = client
        return await wrapped(scope, None, None)

    for _ in range(times):
        assert asyncio.run(serve()) == "returned"
    answers = {(scope["scheme"], scope.get("client")) for scope in seen}
    assert len(seen) == times and len(answers) == 1, answers
    return answers.pop()


@pytest.mark.parametrize(("case", "trust"), list(itertools.product(CASES, TRUSTED)))
def test_the_app_sees_what_uvicorns_middleware_would_give_it(case: str, trust: str) -> None:
    trusted = TRUSTED[trust]
    expected = seen_through(lambda app: ProxyHeadersMiddleware(app, trusted), *CASES[case])
    ours = seen_through(lambda app: forwarded.proxy_headers(app, trusted), *CASES[case], times=3)
    assert ours == expected


def test_forwarded_headers_are_applied_only_from_trusted_clients() -> None:
    """The table above is only worth something if uvicorn's middleware does change scopes."""

    def ours(app: Any) -> Any:
        return forwarded.proxy_headers(app, ["127.0.0.1"])

    assert seen_through(ours, "http", OUTSIDE, [XFF, PROTO]) == ("http", OUTSIDE)
    assert seen_through(ours, "http", PROXY, [XFF, PROTO]) == ("https", ("198.51.100.7", 0))


class Awaitable:
    """What an app returns; the server awaits it."""

    def __await__(self) -> Any:
        return iter(())


def test_the_server_awaits_the_apps_own_awaitable() -> None:
    """The point of a plain function: no coroutine of ours between the server and the app."""
    returned = Awaitable()
    wrapped = forwarded.proxy_headers(lambda scope, receive, send: returned, ["127.0.0.1"])
    assert not inspect.iscoroutinefunction(wrapped)
    for scope in (
        {"type": "http", "client": PROXY, "headers": [HOST]},
        {"type": "http", "client": OUTSIDE, "headers": []},
        {"type": "http", "client": PROXY, "headers": [HOST, XFF, PROTO]},
        {"type": "http", "client": OUTSIDE, "headers": [XFF]},
        {"type": "websocket", "client": PROXY, "headers": [HOST, PROTO]},
        {"type": "lifespan"},
    ):
        assert wrapped(scope, None, None) is returned, scope


def test_an_answer_kept_is_for_its_client_host_and_scope_type_only() -> None:
    wrapped = forwarded.proxy_headers(lambda scope, receive, send: None, ["127.0.0.1"])
    seen = []
    for kind, client in [("http", PROXY), ("http", OUTSIDE), ("websocket", PROXY)] * 2:
        scope = {"type": kind, "client": client, "scheme": "http", "headers": [XFF, PROTO]}
        wrapped(scope, None, None)
        seen.append((scope["scheme"], scope["client"]))
    expected = [("https", ("198.51.100.7", 0)), ("http", OUTSIDE), ("wss", ("198.51.100.7", 0))]
    assert seen == expected * 2


def test_the_answers_kept_are_bounded() -> None:
    wrapped = forwarded.proxy_headers(lambda scope, receive, send: None, ["127.0.0.1"])
    for i in range(5000):
        address = f"198.51.{i // 256}.{i % 256}".encode()
        wrapped({"type": "http", "client": PROXY, "headers": [(XFF[0], address)]}, None, None)
        assert len(wrapped.answers) == i % forwarded.KEPT + 1  # all dropped when full
    wrapped.answers.clear()
    long = (XFF[0], b", ".join([b"198.51.100.7"] * 30))  # more bytes than any kept
    for headers in ([long], [XFF]):
        scope = {"type": "http", "client": PROXY, "headers": headers, "scheme": "http"}
        wrapped(scope, None, None)
        assert scope["client"] == ("198.51.100.7", 0)
    assert list(wrapped.answers) == [("http", PROXY[0], None, XFF[1])]  # only the short one


def test_a_scope_without_a_type_fails_as_in_uvicorn() -> None:
    wrapped = forwarded.proxy_headers(recording_app([]), ["127.0.0.1"])
    with pytest.raises(KeyError):
        asyncio.run(wrapped({"client": PROXY, "headers": [XFF]}, None, None))
