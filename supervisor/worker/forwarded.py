"""X-Forwarded-Proto/For: uvicorn's rules, at a fraction of uvicorn's cost per request.

With proxy headers on, uvicorn wraps the app in its ProxyHeadersMiddleware, a coroutine
around every request: ~6% of a hello-world request's instructions with no such header,
~17% with X-Forwarded-For, which it parses and checks against the trusted addresses every
time. The worker turns uvicorn's off and wraps the app here instead (`_forwarded.c`):
a request without those headers goes straight to the app; with them, what uvicorn's
middleware would set depends only on the scope type, the client's host and those
headers, so `resolve` asks the middleware itself, on just those, and the answer is kept
for the next request with the same inputs. Trust (--forwarded-allow-ips) and parsing
stay uvicorn's code. Without the extension, uvicorn's middleware wraps every request, as
in uvicorn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

try:
    from asgi_supervise.worker._forwarded import Forwarded
except ImportError:  # no C compiler at install: uvicorn's middleware for every request
    Forwarded = None

COMPILED = Forwarded is not None
Resolve = Callable[[str, Any, tuple[tuple[bytes, bytes], ...]], tuple[str | None, Any]]


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    return None


def resolver(trusted: list[str]) -> Resolve:
    """resolve(type, client, headers) -> (scheme, client): what uvicorn's middleware sets
    in a scope with these, each None where it sets nothing."""
    middleware = ProxyHeadersMiddleware(_nothing, trusted_hosts=trusted)

    def resolve(kind: str, client: Any, headers: tuple[tuple[bytes, bytes], ...]) -> Any:
        scope = {"type": kind, "client": client, "headers": list(headers)}
        run = middleware(scope, None, None)  # type: ignore[arg-type]
        try:
            run.send(None)  # it awaits only _nothing, which returns at once
        except StopIteration:
            pass
        else:
            run.close()
            raise RuntimeError("uvicorn's ProxyHeadersMiddleware awaited something")
        forwarded = scope["client"] if scope["client"] is not client else None
        return scope.get("scheme"), forwarded

    return resolve


def proxy_headers(app: Any, trusted: list[str]) -> Any:
    """`app` with uvicorn's proxy-headers rules, trusting `trusted` addresses."""
    proxied = ProxyHeadersMiddleware(app, trusted_hosts=trusted)
    return proxied if Forwarded is None else Forwarded(app, proxied, resolver(trusted))
