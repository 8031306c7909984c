"""Raw ASGI app for request-timing tests: reads whole request bodies, answers slowly."""

import asyncio
from urllib.parse import parse_qs


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].replace("lifespan.", "")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    size = 0
    while True:  # the whole body, however slowly it comes
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/sleep":
        await asyncio.sleep(float(query.get("s", "1")))
    body = str(size).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
