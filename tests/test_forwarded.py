"""Proxy headers: uvicorn's ProxyHeadersMiddleware decides, and `_forwarded.Forwarded` only
skips it for scopes it could not change. Every case runs through our wrapping and through
uvicorn's middleware alone, and the app must see the same scope; then real requests."""

from __future__ import annotations

import asyncio
import http.client
from typing import Any

import pytest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from asgi_supervise import forwarded
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


async def seen_by_app(wrap: Any, kind: str, client: Any, headers: Any) -> tuple[Any, ...]:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> str:
        seen.append(dict(scope))
        return "returned"

    scope = {"type": kind, "scheme": "ws" if kind == "websocket" else "http", "headers": headers}
    if client is not None:
        scope["client"] = client
    result = await wrap(app)(scope, None, None)
    assert result == "returned"
    (scope_seen,) = seen
    return scope_seen["scheme"], scope_seen.get("client")


def ours(app: Any) -> Any:
    return forwarded.proxy_headers(app, ["127.0.0.1"])


def uvicorns(app: Any) -> Any:
    return ProxyHeadersMiddleware(app, trusted_hosts=["127.0.0.1"])


@pytest.mark.parametrize("case", CASES)
def test_the_app_sees_what_uvicorns_middleware_would_give_it(case: str) -> None:
    expected = asyncio.run(seen_by_app(uvicorns, *CASES[case]))
    assert asyncio.run(seen_by_app(ours, *CASES[case])) == expected


def test_forwarded_headers_are_applied_only_from_trusted_clients() -> None:
    """The table above is only worth something if uvicorn's middleware does change scopes."""
    trusted = asyncio.run(seen_by_app(ours, "http", PROXY, [XFF, PROTO]))
    assert trusted == ("https", ("198.51.100.7", 0))
    assert asyncio.run(seen_by_app(ours, "http", OUTSIDE, [XFF, PROTO])) == ("http", OUTSIDE)


@pytest.mark.skipif(not forwarded.COMPILED, reason="the extension was not built")
def test_a_scope_without_forwarded_headers_skips_the_middleware() -> None:
    calls: list[str] = []

    def app(scope: Any, receive: Any, send: Any) -> str:
        calls.append("app")
        return "app"

    def proxied(scope: Any, receive: Any, send: Any) -> str:
        calls.append("proxied")
        return "proxied"

    wrapped = forwarded.Forwarded(app, proxied)
    assert wrapped({"type": "http", "headers": [HOST]}, None, None) == "app"
    assert wrapped({"type": "lifespan"}, None, None) == "app"
    assert wrapped({"type": "http", "headers": [HOST, XFF]}, None, None) == "proxied"
    assert wrapped({"type": "http", "headers": [(b"x", 1)]}, None, None) == "app"
    assert (
        wrapped({"type": "http", "headers": [[b"x-forwarded-for", b"a"]]}, None, None) == "proxied"
    )
    assert calls == ["app", "app", "proxied", "app", "proxied"]
    with pytest.raises(TypeError):
        wrapped({"type": "http"}, None)


def test_the_forwarded_dispatch_is_compiled_wherever_there_is_a_c_compiler() -> None:
    if c_compiler() is None:
        pytest.skip("no C compiler: uvicorn's middleware runs for every request")
    assert forwarded.COMPILED, "asgi_supervise._forwarded did not build; see pip's output"


def client_seen(port: int, headers: dict[str, str]) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/client", headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


FORWARDED = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}


def test_workers_apply_proxy_headers_from_allowed_addresses_only(supervisor: Any) -> None:
    default = supervisor("testapp:app", "--workers", "1")
    elsewhere = supervisor("testapp:app", "--workers", "1", "--forwarded-allow-ips", "10.0.0.1")
    off = supervisor("testapp:app", "--workers", "1", "--no-proxy-headers")
    for server in (default, elsewhere, off):
        server.wait_ready()
    assert client_seen(default.port, FORWARDED) == "https 198.51.100.7"  # 127.0.0.1 trusted
    assert client_seen(default.port, {}) == "http 127.0.0.1"
    assert client_seen(elsewhere.port, FORWARDED) == "http 127.0.0.1"
    assert client_seen(off.port, FORWARDED) == "http 127.0.0.1"
