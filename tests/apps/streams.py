"""A FastAPI app with the long-lived responses real services have: SSE with Starlette's
StreamingResponse and with sse-starlette, and WebSockets. Its lifespan shutdown writes a
marker file per worker (STREAMS_MARKER_DIR), so tests see it ran.

STREAMS_MODE changes how it behaves at shutdown:
- ``ignore``: /ignore streams forever and never listens for http.disconnect;
- ``block``: the lifespan shutdown blocks the event loop (a sync call that never returns);
- ``hang``: the lifespan shutdown awaits forever (the loop runs).
"""

import asyncio
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, StreamingResponse
from sse_starlette.sse import EventSourceResponse

MARKERS = os.environ.get("STREAMS_MARKER_DIR")
MODE = os.environ.get("STREAMS_MODE", "")


@asynccontextmanager
async def lifespan(app):
    yield
    if MODE == "block":
        time.sleep(3600)  # a shutdown handler that blocks the loop: only a signal ends it
    if MODE == "hang":
        await asyncio.sleep(3600)  # the worker's --shutdown-timeout ends it
    if MARKERS:
        Path(MARKERS, f"shutdown-{os.getpid()}").write_text("done")


app = FastAPI(lifespan=lifespan)


@app.get("/pid", response_class=PlainTextResponse)
async def pid():
    return str(os.getpid())


@app.get("/slow", response_class=PlainTextResponse)
async def slow(seconds: float = 3.0):
    if MARKERS:  # the test signals once the request is in flight
        Path(MARKERS, f"slow-{os.getpid()}").write_text("started")
    await asyncio.sleep(seconds)
    return f"slept {seconds} in {os.getpid()}"


@app.get("/sse")
async def sse(request: Request):
    """Starlette's StreamingResponse: it ends when receive() says http.disconnect."""

    async def events():
        yield f"event: hello\ndata: {os.getpid()}\n\n"
        n = 0
        while True:
            await asyncio.sleep(0.2)
            n += 1
            yield f"data: {n}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/sse-starlette")
async def sse_starlette(request: Request):
    async def events():
        yield {"event": "hello", "data": str(os.getpid())}
        n = 0
        while True:
            await asyncio.sleep(0.2)
            n += 1
            yield {"data": str(n)}

    return EventSourceResponse(events(), ping=5)


async def ignore_disconnect(scope, receive, send):
    """Raw ASGI: streams forever, never calls receive()."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    await send({"type": "http.response.body", "body": f"data: {os.getpid()}\n\n".encode(),
                "more_body": True})  # fmt: skip
    while True:
        await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b"data: tick\n\n", "more_body": True})


app.mount("/ignore", ignore_disconnect)


@app.websocket("/ws")
async def ws(websocket: WebSocket):
    await websocket.accept()
    await websocket.send_text(str(os.getpid()))
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(text)
    except WebSocketDisconnect:
        pass
