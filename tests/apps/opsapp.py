"""A Starlette app for the operations tests: routes, errors, slow answers, a WebSocket.

It refuses to start (at import, in a fresh worker) while the file named by
OPSAPP_BROKEN_FLAG exists: a reload then deploys "code" that cannot boot.
"""

import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute

_flag = os.environ.get("OPSAPP_BROKEN_FLAG")
if _flag and os.path.exists(_flag):
    raise RuntimeError("deployed broken on purpose: the flag file exists")


async def item(request):
    return PlainTextResponse(f"item {request.path_params['id']}")


async def fail(request):
    return PlainTextResponse("failed on purpose", status_code=500)


async def slow(request):
    await asyncio.sleep(float(request.query_params.get("s", "0.5")))
    return PlainTextResponse("slept")


async def pid(request):
    return PlainTextResponse(str(os.getpid()))


async def echo(websocket):
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(text)


app = Starlette(
    routes=[
        Route("/items/{id}", item),
        Route("/fail", fail),
        Route("/slow", slow),
        Route("/pid", pid),
        WebSocketRoute("/ws", echo),
    ]
)
