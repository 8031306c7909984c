"""X-Forwarded-Proto/For: uvicorn's rules, without uvicorn's coroutine on every request.

With proxy headers on, uvicorn wraps the app in its ProxyHeadersMiddleware, an `async
def` around every request: a coroutine frame the server awaits before it reaches the
app. The worker turns uvicorn's off and wraps the app with `proxy_headers` instead, a
plain function: it applies the same rules to the scope and returns the app's own
awaitable, so the server awaits the app with no frame in between. A request without
either header is passed on after one look at the header names.

Which addresses are trusted (--forwarded-allow-ips) and how X-Forwarded-For is parsed
stay uvicorn's code (its middleware's `trusted_hosts`); `_apply` is the middleware's
body, and tests/unit/test_forwarded.py runs every case through both. The uvicorn
versions this was checked against are pinned in pyproject.toml.
"""

from __future__ import annotations

from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

SCHEMES = frozenset(("http", "https", "ws", "wss"))  # what uvicorn accepts in the header


def proxy_headers(app: Any, trusted: list[str]) -> Any:
    """`app` with uvicorn's proxy-headers rules, trusting `trusted` addresses."""
    hosts = ProxyHeadersMiddleware(app, trusted_hosts=trusted).trusted_hosts

    def forwarded(scope: Any, receive: Any, send: Any) -> Any:  # not async: see above
        for name, _ in scope.get("headers", ()):  # lifespan has none
            if name in (b"x-forwarded-for", b"x-forwarded-proto"):  # as uvicorn: lower-case
                _apply(hosts, scope)
                break
        return app(scope, receive, send)

    return forwarded


def _apply(hosts: Any, scope: Any) -> None:
    """What uvicorn's ProxyHeadersMiddleware does to `scope` before calling the app."""
    if scope["type"] == "lifespan":
        return
    client = scope.get("client")
    if (client[0] if client else None) not in hosts:
        return
    proto: bytes | None = None
    hops: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-proto":
            proto = value
        elif name == b"x-forwarded-for":
            hops.append(value)
    if proto is not None:
        scheme = proto.decode("latin1").strip()
        if scheme in SCHEMES:
            websocket = scope["type"] == "websocket"
            scope["scheme"] = scheme.replace("http", "ws") if websocket else scheme
    if hops:
        host, port = hosts.get_trusted_client_address(b", ".join(hops).decode("latin1"))
        if host:  # an empty header gives no host: the client stays the proxy
            scope["client"] = (host, port)
