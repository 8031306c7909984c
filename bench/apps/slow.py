"""hello's routes plus `/sleep?s=N`: asyncio.sleep(N) (0..60 s), then 200.

It does not watch for http.disconnect: it stands for work the server must let finish.
"""

import asyncio
import os
from urllib.parse import parse_qs

from apps.hello import app as hello
from apps.hello import lifespan, respond


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] == "http" and scope["path"] == "/sleep":
        query = parse_qs(scope.get("query_string", b"").decode())
        try:
            seconds = min(60.0, max(0.0, float(query.get("s", ["3"])[-1])))
        except ValueError:
            seconds = 3.0
        await asyncio.sleep(seconds)
        return await respond(send, f"slept {seconds} in {os.getpid()}".encode())
    return await hello(scope, receive, send)
