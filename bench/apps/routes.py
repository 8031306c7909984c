"""A Starlette app with 50 parametrised routes, for the `/metrics` scrape benchmark.

`/r{i}/{id}` for i in 0..49 answers the serving worker's pid, so a client can tell which
worker saw which route; `/pid` does the same for the harness's readiness probe. Starlette
leaves the matched route in ``scope["route"]``, so asgi-supervise's request metrics label
each request with its template (`/r7/{id}`): 51 route label values in all.
"""

import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

ROUTES = 50


async def pid(request):
    return PlainTextResponse(str(os.getpid()))


app = Starlette(routes=[Route("/pid", pid), *(Route(f"/r{i}/{{id}}", pid) for i in range(ROUTES))])
