"""Raw ASGI test app: no framework, so tests measure the supervisor, not a router."""

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs

VERSION = os.environ.get("TESTAPP_VERSION", "1")
INFLIGHT = os.environ.get("TESTAPP_INFLIGHT_DIR")
# A file each request's X-Load-Id is appended to as the app starts handling it (one line
# a request, O_APPEND: workers may share it), so a test knows which requests the app saw.
STARTED = os.environ.get("TESTAPP_STARTED_FILE")
_hoard: list[bytes] = []
# Memory every worker holds from the start (touched, so it counts in RSS and the cgroup).
_ballast = b"x" * int(os.environ.get("TESTAPP_BALLAST_MB", "0")) * 1024 * 1024


async def _respond(send, status: int, body: bytes, headers=()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _note_started(scope) -> None:
    load_id = dict(scope["headers"]).get(b"x-load-id")
    if load_id:
        fd = os.open(STARTED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, load_id + b"\n")
        finally:
            os.close(fd)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": message.get("text") or ""})
    if STARTED:
        _note_started(scope)
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    path = scope["path"]
    if path == "/pid":
        return await _respond(send, 200, str(os.getpid()).encode())
    if path == "/client":  # what proxy-header handling left in the scope
        host = (scope.get("client") or ("-",))[0]
        return await _respond(send, 200, f"{scope['scheme']} {host}".encode())
    if path == "/version":
        return await _respond(send, 200, VERSION.encode())
    if path == "/sleep":  # in flight for s seconds; marks itself in INFLIGHT while running
        marker = Path(INFLIGHT, uuid.uuid4().hex) if INFLIGHT else None
        if marker:
            marker.touch()
        await asyncio.sleep(float(query.get("s", "1")))
        return await _respond(send, 200, b"slept")
    if path == "/block":  # blocks the event loop: what a sync call in async code does
        time.sleep(float(query.get("s", "5")))
        return await _respond(send, 200, b"unblocked")
    if path == "/grow":  # hold memory so RSS-based recycling has something to see
        _hoard.append(os.urandom(int(query.get("mb", "10")) * 1024 * 1024))
        return await _respond(send, 200, str(len(_hoard)).encode())
    if path == "/env":  # the variables this worker, and a process it starts, can see
        spawned = subprocess.run(["env"], capture_output=True, text=True).stdout.splitlines()
        names = {*os.environ, *(line.partition("=")[0] for line in spawned)}
        return await _respond(send, 200, " ".join(sorted(names)).encode())
    if path == "/orphan":  # leave a grandchild for the master (as PID 1) to reap
        subprocess.Popen(["sh", "-c", "sleep 0.3 &"]).wait()
        return await _respond(send, 200, b"orphaned")
    return await _respond(send, 200, b"hello")
