"""A Starlette app with route templates, for the route label of the request metrics."""

import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def item(request):
    return PlainTextResponse(f"item {request.path_params['id']}")


async def pid(request):
    return PlainTextResponse(str(os.getpid()))


app = Starlette(routes=[Route("/items/{id}", item), Route("/pid", pid)])
