"""X-Forwarded-Proto/For: uvicorn's rules, without uvicorn's coroutine on every request.

With proxy headers on, uvicorn wraps the app in its ProxyHeadersMiddleware, an `async
def` around every request that checks the client's address against the trusted ones
and, behind a proxy, parses X-Forwarded-For every time. The worker turns uvicorn's off
and wraps the app with `proxy_headers` instead, a plain function: one pass over the
header names, then the app's own awaitable is returned, so the server awaits the app
with no frame in between. What a request's X-Forwarded-* headers change in its scope
depends only on the scope type, the client's host and those headers, so `_resolve`
works it out once and the answer is kept for the next request with the same ones
(behind a proxy: every request of the same end client).

Which addresses are trusted (--forwarded-allow-ips) and how X-Forwarded-For is parsed
stay uvicorn's code (its middleware's `trusted_hosts`); `_resolve` is the rest of the
middleware's body, and tests/unit/test_forwarded.py runs every case through both. The
uvicorn versions this was checked against are pinned in pyproject.toml.
"""

from __future__ import annotations

from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

SCHEMES = frozenset(("http", "https", "ws", "wss"))  # what uvicorn accepts in the header
KEPT = 4096  # answers kept; all are dropped when full
LONGEST = 256  # bytes of X-Forwarded-For in an answer kept: no huge keys pinned


def proxy_headers(app: Any, trusted: list[str]) -> Any:
    """`app` with uvicorn's proxy-headers rules, trusting `trusted` addresses."""
    hosts = ProxyHeadersMiddleware(app, trusted_hosts=trusted).trusted_hosts
    answers: dict[tuple[Any, ...], tuple[str | None, Any]] = {}

    def forwarded(scope: Any, receive: Any, send: Any) -> Any:  # not async: see above
        proto = hops = None
        for name, value in scope.get("headers", ()):  # lifespan has none
            if name == b"x-forwarded-for":  # uvicorn reads lower-case names only
                hops = value if hops is None else hops + b", " + value
            elif name == b"x-forwarded-proto":
                proto = value  # the last one counts, as in uvicorn
        if proto is None and hops is None:
            return app(scope, receive, send)
        client = scope.get("client")
        key = scope["type"], client[0] if client else None, proto, hops
        answer = answers.get(key)
        if answer is None:
            answer = _resolve(hosts, *key)
            if hops is None or len(hops) <= LONGEST:
                if len(answers) >= KEPT:
                    answers.clear()
                answers[key] = answer
        scheme, address = answer
        if scheme is not None:
            scope["scheme"] = scheme
        if address is not None:
            scope["client"] = address
        return app(scope, receive, send)

    forwarded.answers = answers  # type: ignore[attr-defined]  # for tests
    return forwarded


def _resolve(
    hosts: Any, kind: str, host: str | None, proto: bytes | None, hops: bytes | None
) -> tuple[str | None, Any]:
    """(scheme, client) uvicorn's ProxyHeadersMiddleware sets; None where it sets nothing."""
    if kind == "lifespan" or host not in hosts:
        return None, None
    scheme = address = None
    if proto is not None:
        text = proto.decode("latin1").strip()
        if text in SCHEMES:
            scheme = text.replace("http", "ws") if kind == "websocket" else text
    if hops is not None:
        forwarded_host, port = hosts.get_trusted_client_address(hops.decode("latin1"))
        if forwarded_host:  # an empty header gives no host: the client stays the proxy
            address = forwarded_host, port
    return scheme, address
