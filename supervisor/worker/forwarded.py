"""X-Forwarded-Proto/For: uvicorn's rules, without uvicorn's coroutine on every request.

With proxy headers on, uvicorn wraps the app in its ProxyHeadersMiddleware, an `async
def` around every request: a coroutine frame and a pass over the headers, even for a
request that carries no X-Forwarded-* header at all. The worker turns uvicorn's off and
wraps the app in `ProxyHeaders` instead: a plain method that looks for the two header
names and hands the request to uvicorn's middleware only when one is there. Without
them, it returns the app's own awaitable, so the server awaits the app with no frame in
between. Trust (--forwarded-allow-ips) and parsing stay uvicorn's code.
"""

from __future__ import annotations

from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

FORWARDING = (b"x-forwarded-for", b"x-forwarded-proto")  # the names uvicorn reads, as it does


class ProxyHeaders:
    """An ASGI app: `app` behind uvicorn's proxy-headers rules, trusting `trusted`."""

    __slots__ = ("app", "proxied")

    def __init__(self, app: Any, trusted: list[str]) -> None:
        self.app = app
        self.proxied = ProxyHeadersMiddleware(app, trusted_hosts=trusted)

    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        # Not `async`: the caller awaits what this returns, the app's own awaitable.
        for name, _ in scope.get("headers", ()):  # lifespan has none: nothing to change
            if name in FORWARDING:
                return self.proxied(scope, receive, send)
        return self.app(scope, receive, send)


def proxy_headers(app: Any, trusted: list[str]) -> ProxyHeaders:
    """`app` with uvicorn's proxy-headers rules, trusting `trusted` addresses."""
    return ProxyHeaders(app, trusted)
