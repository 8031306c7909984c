"""Ending streaming responses at a drain: the client sees a complete body, not a cut.

uvicorn has no notion of "this response is a stream": these read its request cycles
(httptools' and h11's) for a started, chunked, unfinished response, and end it the way a
client leaving would, except that the body is finished properly.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class StreamEnder:
    """Ends streaming responses the way a client going away would, but finishes them well.

    A streaming response (started, body not finished, chunked) gets `http.disconnect`
    from `receive()`: what Starlette's StreamingResponse, sse-starlette and FastAPI wait
    for. The cycle is marked disconnected, as uvicorn's `connection_lost` does, so the
    handler's further sends are dropped; when the handler returns, the last chunk is
    written and the connection closed: the client sees a complete chunked body. A
    response with a Content-Length is left to finish: cutting it short is never clean.
    """

    def __init__(self, http: type) -> None:
        self.http = http
        self.count = 0
        self._ended: set[int] = set()

    def end_streams(self, state: Any) -> None:
        streams = []
        for connection in list(state.connections):
            if not isinstance(connection, self.http):
                continue
            cycle = connection.cycle
            if cycle is not None and id(cycle) not in self._ended and _is_streaming(cycle):
                streams.append(cycle)
        if not streams:
            return
        tasks = _tasks_by_cycle(state.tasks)
        for cycle in streams:
            task = tasks.get(id(cycle))
            if task is None:
                continue
            self._ended.add(id(cycle))
            self.count += 1
            cycle.keep_alive = False
            cycle.disconnected = True  # receive() answers http.disconnect; sends are dropped
            cycle.message_event.set()
            task.add_done_callback(lambda _, c=cycle: _finish_body(c))


def _is_streaming(cycle: Any) -> bool:
    if not cycle.response_started or cycle.response_complete or cycle.disconnected:
        return False
    if hasattr(cycle, "chunked_encoding"):  # httptools
        return bool(cycle.chunked_encoding)
    writer = getattr(getattr(cycle, "conn", None), "_writer", None)  # h11
    return type(writer).__name__ == "ChunkedWriter"


def _tasks_by_cycle(tasks: Any) -> dict[int, asyncio.Task[Any]]:
    """Each request's task runs `cycle.run_asgi(app)`: its frame knows the cycle."""
    found = {}
    for task in tasks:
        frame = getattr(task.get_coro(), "cr_frame", None)
        cycle = frame.f_locals.get("self") if frame is not None else None
        if cycle is not None:
            found[id(cycle)] = task
    return found


def _finish_body(cycle: Any) -> None:
    """The handler returned after its disconnect: end the chunked body, then close."""
    transport = cycle.transport
    if transport.is_closing():
        return  # the handler failed and uvicorn closed it, or the client left
    if hasattr(cycle, "chunked_encoding"):
        transport.write(b"0\r\n\r\n")
    else:
        import h11  # only with --http h11, where it is loaded already

        with contextlib.suppress(h11.LocalProtocolError):
            transport.write(cycle.conn.send(h11.EndOfMessage()))
    cycle.response_complete = True
    transport.close()
