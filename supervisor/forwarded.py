"""X-Forwarded-Proto/For: uvicorn's handling, paid only by requests that carry them.

With proxy headers on, uvicorn wraps the app in its ProxyHeadersMiddleware, a coroutine
around every request: ~6% of a hello-world request's instructions, spent even when there
is no such header and nothing changes. The worker turns uvicorn's off and wraps the app
here instead: `_forwarded.Forwarded` (C) sends a scope with an X-Forwarded-Proto or
X-Forwarded-For header to that same middleware, which decides trust (the
--forwarded-allow-ips addresses) and rewrites `scheme` and `client` exactly as uvicorn
does, and any other scope straight to the app. Without the extension, uvicorn's
middleware wraps every request, as in uvicorn.
"""

from __future__ import annotations

from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

try:
    from asgi_supervise._forwarded import Forwarded
except ImportError:  # no C compiler at install: uvicorn's middleware for every request
    Forwarded = None

COMPILED = Forwarded is not None


def proxy_headers(app: Any, trusted: list[str]) -> Any:
    """`app` behind uvicorn's ProxyHeadersMiddleware, trusting `trusted` addresses."""
    proxied = ProxyHeadersMiddleware(app, trusted_hosts=trusted)
    return proxied if Forwarded is None else Forwarded(app, proxied)
