"""testapp plus prometheus_client metrics of its own with a series per route, so its
multiprocess files grow with every new path, as per-endpoint metrics do.

``/r/<anything>`` counts and times a series of its own; ``/fill`` writes a file into
``PROMROUTES_FILL_DIR`` until the filesystem is full (a test's small tmpfs), the way logs
or uploads sharing a disk with the metrics fill it.
"""

import errno
import os

from prometheus_client import Counter, Histogram
from testapp import _respond
from testapp import app as testapp

HITS = Counter("app_route_hits", "Requests per route.", ["route"])
LATENCY = Histogram("app_route_seconds", "Time per route.", ["route"])
FILL_LIMIT = 16 * 1024 * 1024  # a test's tmpfs is far smaller: never more, on any disk


def _fill(directory: str) -> bytes:
    written = 0
    with open(os.path.join(directory, f"filler-{os.getpid()}"), "ab", buffering=0) as fh:
        while written < FILL_LIMIT:
            try:
                written += fh.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    return b"full"
                raise
    return b"not full"


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/r/"):
        HITS.labels(scope["path"]).inc()
        LATENCY.labels(scope["path"]).observe(0.001)
        return await _respond(send, 200, b"counted")
    if scope["type"] == "http" and scope["path"] == "/fill":
        return await _respond(send, 200, _fill(os.environ["PROMROUTES_FILL_DIR"]))
    await testapp(scope, receive, send)
