"""Proxy headers: uvicorn's ProxyHeadersMiddleware decides; `_forwarded.Forwarded` skips it
for scopes it could not change and keeps its answer for the others. Every case runs
through uvicorn's middleware alone and twice through ours, and the app must see the same
scope; then the dispatch and what is kept; then real requests to a worker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from asgi_supervise.worker import forwarded
from conftest import c_compiler

PROXY = ("127.0.0.1", 50000)
OUTSIDE = ("203.0.113.9", 50000)
XFF = (b"x-forwarded-for", b"198.51.100.7")
PROTO = (b"x-forwarded-proto", b"https")
HOST = (b"host", b"example.test")

CASES = {  # name: (scope type, client, headers)
    "no forwarded headers, trusted client": ("http", PROXY, [HOST]),
    "x-forwarded-for from a trusted client": ("http", PROXY, [HOST, XFF]),
    "x-forwarded-proto from a trusted client": ("http", PROXY, [PROTO, HOST]),
    "both, repeated x-forwarded-for": ("http", PROXY, [XFF, PROTO, (XFF[0], b"10.9.9.9")]),
    "both from an untrusted client": ("http", OUTSIDE, [XFF, PROTO]),
    "names not lower-case (as uvicorn: ignored)": (
        "http",
        PROXY,
        [(b"X-Forwarded-For", b"1.2.3.4")],
    ),
    "websocket: https becomes wss": ("websocket", PROXY, [PROTO, XFF]),
    "headers as a tuple, not a list": ("http", PROXY, ((XFF[0], XFF[1]),)),
    "no client": ("http", None, [XFF]),
}


def recording_app(seen: list[dict[str, Any]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> str:
        seen.append(dict(scope))
        return "returned"

    return app


def seen_through(wrapped: Wrapped, kind: str, client: Any, headers: Any) -> tuple[Any, ...]:
    """(scheme, client) of the scope the app behind `wrapped` was called with."""
    seen = wrapped.seen
    scope = {"type": kind, "scheme": "ws" if kind == "websocket" else "http", "headers": headers}
    if client is not None:
        scope["client"] = client
    assert asyncio.run(wrapped(scope, None, None)) == "returned"
    (scope_seen,) = seen
    seen.clear()
    return scope_seen["scheme"], scope_seen.get("client")


class Wrapped:
    """An app behind some proxy-headers wrapping, and the scopes the app was called with."""

    def __init__(self, app: Any, seen: list[dict[str, Any]]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        return await self.app(scope, receive, send)


def ours() -> Wrapped:
    seen: list[dict[str, Any]] = []
    wrapped = forwarded.proxy_headers(recording_app(seen), ["127.0.0.1"])
    return Wrapped(wrapped, seen)


def uvicorns() -> Wrapped:
    seen: list[dict[str, Any]] = []
    return Wrapped(ProxyHeadersMiddleware(recording_app(seen), trusted_hosts=["127.0.0.1"]), seen)


@pytest.mark.parametrize("case", CASES)
def test_the_app_sees_what_uvicorns_middleware_would_give_it(case: str) -> None:
    expected = seen_through(uvicorns(), *CASES[case])
    wrapped = ours()
    assert seen_through(wrapped, *CASES[case]) == expected
    assert seen_through(wrapped, *CASES[case]) == expected  # again: from what was kept


def test_forwarded_headers_are_applied_only_from_trusted_clients() -> None:
    """The table above is only worth something if uvicorn's middleware does change scopes."""
    wrapped = ours()
    assert seen_through(wrapped, "http", OUTSIDE, [XFF, PROTO]) == ("http", OUTSIDE)
    assert seen_through(wrapped, "http", PROXY, [XFF, PROTO]) == ("https", ("198.51.100.7", 0))
    assert seen_through(wrapped, "http", OUTSIDE, [XFF, PROTO]) == ("http", OUTSIDE)


compiled_only = pytest.mark.skipif(not forwarded.COMPILED, reason="the extension was not built")


class Recorder:
    """The three callables Forwarded is given; each notes its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def app(self, scope: Any, receive: Any, send: Any) -> str:
        self.calls.append("app")
        return "app"

    def proxied(self, scope: Any, receive: Any, send: Any) -> str:
        self.calls.append("proxied")
        return "proxied"

    def resolve(self, kind: str, client: Any, headers: Any) -> tuple[Any, Any]:
        self.calls.append(f"resolve {kind} {client} {headers}")
        return "https", ("10.1.1.1", 0)


@compiled_only
def test_only_forwarded_headers_are_resolved_and_each_input_once() -> None:
    seen = Recorder()
    wrapped = forwarded.Forwarded(seen.app, seen.proxied, seen.resolve)
    assert wrapped({"type": "http", "headers": [HOST]}, None, None) == "app"
    assert wrapped({"type": "lifespan"}, None, None) == "app"
    assert seen.calls == ["app", "app"]

    seen.calls.clear()
    for _ in range(3):
        scope = {"type": "http", "client": PROXY, "headers": [HOST, XFF], "scheme": "http"}
        assert wrapped(scope, None, None) == "app"
        assert (scope["scheme"], scope["client"]) == ("https", ("10.1.1.1", 0))
    assert seen.calls == [f"resolve http {PROXY} ({XFF},)", "app", "app", "app"]
    wrapped({"type": "http", "client": OUTSIDE, "headers": [XFF]}, None, None)  # another host
    wrapped({"type": "websocket", "client": PROXY, "headers": [XFF]}, None, None)
    assert [c for c in seen.calls if c.startswith("resolve")][1:] == [
        f"resolve http {OUTSIDE} ({XFF},)",
        f"resolve websocket {PROXY} ({XFF},)",
    ]


@compiled_only
def test_shapes_it_does_not_know_go_to_uvicorns_middleware_whole() -> None:
    seen = Recorder()
    wrapped = forwarded.Forwarded(seen.app, seen.proxied, seen.resolve)
    odd = [
        {"type": "http", "headers": [[b"x-forwarded-for", b"a"]]},  # a list, not a tuple
        {"type": "http", "headers": ((b"x-forwarded-for", b"a"),)},  # a tuple of headers
        {"type": "http", "headers": [(b"x-forwarded-for", "text")]},  # a str value
        {"type": "http", "client": ["127.0.0.1", 1], "headers": [XFF]},  # a list client
        {"headers": [XFF]},  # no type: uvicorn's middleware raises its KeyError
    ]
    for scope in odd:
        assert wrapped(scope, None, None) == "proxied"
    assert seen.calls == ["proxied"] * len(odd)
    with pytest.raises(TypeError):
        wrapped({"type": "http"}, None)


@compiled_only
def test_the_answers_kept_are_bounded() -> None:
    wrapped = forwarded.proxy_headers(Recorder().app, ["127.0.0.1"])
    for i in range(5000):
        address = f"198.51.{i // 256}.{i % 256}".encode()
        wrapped({"type": "http", "client": PROXY, "headers": [(XFF[0], address)]}, None, None)
        assert len(wrapped.cache) == i % 4096 + 1  # kept, until all are dropped at 4096
    wrapped.cache.clear()
    long = (XFF[0], b", ".join([b"198.51.100.7"] * 30))  # more bytes than any kept
    many = [(XFF[0], b"")] * 4 + [XFF]  # more headers than any kept
    for headers in ([long], many, [XFF]):
        scope = {"type": "http", "client": PROXY, "headers": headers, "scheme": "http"}
        wrapped(scope, None, None)
        assert scope["client"] == ("198.51.100.7", 0)
    assert list(wrapped.cache) == [("http", PROXY[0], (XFF,))]  # only the short one


def test_the_forwarded_dispatch_is_compiled_wherever_there_is_a_c_compiler() -> None:
    if c_compiler() is None:
        pytest.skip("no C compiler: uvicorn's middleware runs for every request")
    assert forwarded.COMPILED, "asgi_supervise.worker._forwarded did not build; see pip's output"
