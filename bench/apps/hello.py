"""`/` -> "Hello, world!"; `/pid` -> the serving worker's pid (how scenarios count workers)."""

import os

HEADERS = [(b"content-type", b"text/plain")]


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond(send, body: bytes, status: int = 200) -> None:
    headers = [*HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] != "http":
        return None
    if scope["path"] == "/":
        return await respond(send, b"Hello, world!")
    if scope["path"] == "/pid":
        return await respond(send, str(os.getpid()).encode())
    return await respond(send, b"not found", 404)
