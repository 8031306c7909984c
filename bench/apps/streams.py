"""Long-lived responses for bench/streams_drain.py: SSE with Starlette's StreamingResponse
(which ends when receive() says http.disconnect) and echoing WebSockets."""

import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def pid(request):
    return PlainTextResponse(str(os.getpid()))


async def sse(request):
    async def events():
        yield f"event: hello\ndata: {os.getpid()}\n\n"
        n = 0
        while True:
            await asyncio.sleep(0.5)
            n += 1
            yield f"data: {n}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def ws(websocket: WebSocket):
    await websocket.accept()
    await websocket.send_text(str(os.getpid()))
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[Route("/pid", pid), Route("/sse", sse), WebSocketRoute("/ws", ws)])
