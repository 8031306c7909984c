"""A header-read timeout (Go's ReadHeaderTimeout, nginx's client_header_timeout).

uvicorn times out nothing before a request's headers are in: a connection that sends
nothing, or trickles its headers (slowloris), holds its place in --limit-concurrency for
ever.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("asgi_supervise.worker")
ABSENT = object()  # an attribute a connection does not have


class HeaderTimeout:
    """Closes HTTP connections whose request headers take longer than `limit` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.closed = 0  # connections closed for it, reported in every beat
        self._awaiting: dict[Any, tuple[Any, float]] = {}  # connection: cycle, since

    def check(self, connections: Any, now: float) -> None:
        """Close the connections past the limit; called every tick (0.1 s), so a wait is
        seen to within one.

        A connection awaits headers from when it was accepted, and again from the first
        byte after a response: until that byte, uvicorn's keep-alive timer runs
        (--timeout-keep-alive), and any byte cancels it. A request whose headers are in
        (its body uploading, the app answering) is not awaiting headers. A request cycle
        is told from the next by its identity.
        """
        awaiting: dict[Any, tuple[Any, float]] = {}
        limit = self.limit
        for connection in connections:
            # uvicorn's HTTP/1 connections (h11, httptools, zttp) have both; WebSocket and
            # HTTP/2 ones do not, and are left alone
            cycle = getattr(connection, "cycle", ABSENT)
            if getattr(connection, "timeout_keep_alive_task", ABSENT) is not None:
                continue  # idle under the keep-alive timer, or not HTTP/1
            if cycle is ABSENT or (cycle is not None and not cycle.response_complete):
                continue  # a request in progress: its headers are in
            if connection.transport.is_closing():
                continue
            noted = self._awaiting.get(connection)
            since = noted[1] if noted is not None and noted[0] is cycle else now
            if now - since < limit:
                awaiting[connection] = cycle, since
                continue
            connection.transport.close()  # uvicorn's connection_lost does the rest
            self.closed += 1
            log.debug("closed a connection: no request headers within %gs", limit)
        self._awaiting = awaiting
