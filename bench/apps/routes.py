"""A Starlette app with 50 parametrised routes, for the `/metrics` scrape benchmark.

`/r{i}/{id}` for i in 0..49 answers the serving worker's pid, so a client can tell which
worker saw which route; `/pid` does the same for the harness's readiness probe. Starlette
leaves the matched route in ``scope["route"]``, so asgi-supervise's request metrics label
each request with its template (`/r7/{id}`): 51 route label values in all.

Like many production apps it also keeps a prometheus_client metric of its own (a counter
per route, 51 series): in a worker those land in the master's multiprocess directory, so
the scrape reads files too, and recycling shows whether they pile up.
"""

import os

from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

ROUTES = 50
SERVED = Counter("app_served", "Requests the app answered, by route.", ["route"])


async def pid(request):
    SERVED.labels(request.scope["route"].path).inc()
    return PlainTextResponse(str(os.getpid()))


app = Starlette(routes=[Route("/pid", pid), *(Route(f"/r{i}/{{id}}", pid) for i in range(ROUTES))])
