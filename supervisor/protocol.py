"""What the master and a worker say to each other, and the shapes both sides share.

The channel is a SOCK_SEQPACKET socket pair, so every send is one message: first the
master's spec (its pid and the validated settings, never in argv or environ, as they may
hold secrets), then the worker's messages, each a JSON object whose ``t`` names it:

- ``ready``: the lifespan startup is done and the worker accepts; ``meter`` names its meter;
- ``beat``: once a second from the event loop, with ``requests`` and ``connections``, and
  ``header_timeouts`` (connections closed by --timeout-request-header), totals since the
  worker started, so a beat the channel refused loses nothing;
- ``metrics``: request histograms since the last delivery (`worker.meter`), or the count
  of app metric samples dropped since the last one (`APP_SAMPLES_DROPPED`,
  `worker.promfiles`);
- ``boot_error``: why it could not start, just before exiting with `Exit.BOOT_FAILURE`;
- ``drained``: how its drain ended: ``streams_ended`` (told to end at the stream grace),
  ``cut`` (requests cancelled at the graceful timeout), ``lifespan`` (done, timeout,
  skipped). A worker that cut requests exits with `Exit.UNCLEAN`.

Beats come once a second, within a tick of a change in ``connections`` and within 20 ms of
a new connection: the master balances long-lived connections on them. After the spec the
master says:

- ``pause``: the worker holds clearly more than its share of open connections: stop
  accepting (the others take the queue);
- ``resume``: back near the average: accept again.

Both processes import this module, so it imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import enum
import json
import select
import socket
from bisect import bisect_left
from typing import Any


class Exit(enum.IntEnum):
    """Exit codes of the master (README documents them); a worker that never became ready
    exits with BOOT_FAILURE too."""

    OK = 0  # drained cleanly
    UNCLEAN = 1  # stopped now, or workers killed at the graceful timeout
    USAGE = 2  # bad configuration: a flag, env var, file or profile value, a taken port
    BOOT_FAILURE = 3  # the app could not start: import error, lifespan failure, ...


SPEC_BYTES = 1 << 20  # the largest spec a worker reads
READ_BYTES = 1 << 16  # what the master reads of one worker message
MESSAGE_BYTES = 48 * 1024  # a worker's metrics message stays below READ_BYTES
APP_SAMPLES_DROPPED = "app_samples_dropped"  # key of a metrics message: a count

# OpenTelemetry HTTP semantic conventions, as Prometheus buckets.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
SIZE_BUCKETS = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def decode(data: bytes) -> dict[str, Any]:
    """One message; ValueError when it is not a JSON object."""
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def readable(sock: socket.socket) -> bool:
    """Whether a message (or the end of the channel) waits on `sock`, without waiting:
    poll, not select(), which cannot watch a descriptor above 1023 (a master with many
    open gets channels numbered higher)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class Control:
    """The worker's end of the master's channel. Message boundaries come from SEQPACKET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive(self) -> dict[str, Any]:
        return json.loads(self.sock.recv(SPEC_BYTES))

    def poll(self) -> tuple[list[dict[str, Any]], bool]:
        """The master's messages waiting now, without blocking; True once it is gone."""
        messages = []
        while True:
            try:
                data = self.sock.recv(READ_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return messages, False
            except OSError:
                return messages, True
            if not data:
                return messages, True
            with contextlib.suppress(ValueError):
                messages.append(decode(data))

    def send(self, kind: str, **fields: Any) -> None:
        """For what must arrive (ready, boot errors): may wait while the channel is full."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.send(encode({"t": kind, **fields}))

    def offer(self, message: dict[str, Any], timeout: float = 0.0) -> bool:
        """Send unless the channel stays full for `timeout`: the event loop never stalls
        on a busy or stopped master. False if the message was not sent."""
        data = encode(message)
        try:
            if timeout <= 0:
                self.sock.send(data, socket.MSG_DONTWAIT)
                return True
            self.sock.settimeout(timeout)
            try:
                self.sock.send(data)
            finally:
                self.sock.settimeout(None)
        except OSError:  # full, gone, or too large: the caller keeps what it offered
            return False
        return True


class Buckets:
    """A histogram in plain Python: per-bucket counts (the last one +Inf) and a sum.

    PythonMeter observes requests into them, RequestMetrics adds up what its meter
    measured, and the master adds up what workers send and observes its own durations.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total: float = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value

    def add(self, counts: list[int], total: float) -> None:
        for index, count in enumerate(counts):
            self.counts[index] += count
        self.total += total
