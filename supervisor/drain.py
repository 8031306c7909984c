"""How long a drain may take, from SIGTERM to the last process gone: one pure account.

The worker ends streams after ``stream_drain_grace``, cancels what still runs at
``graceful_timeout`` (its requests get `CANCEL_WAIT` to unwind), runs the app's lifespan
shutdown for at most ``shutdown_timeout``, and exits by itself. The master steps in only
`EXIT_MARGIN` after that: SIGABRT (the stack of a blocked loop), then SIGKILL after
`KILL_GRACE`. `Plan` states the worst case (`plan`, `config`); the Helm chart's
``terminationGracePeriodSeconds`` must be at least that.

Imported by the master and by sizing; pure, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CANCEL_WAIT = 1.0  # seconds cancelled requests get to unwind (worker.server uses the same)
EXIT_MARGIN = 2.0  # seconds the master waits past a worker's own bound before SIGABRT
KILL_GRACE = 2.0  # seconds a worker told to stop now (SIGQUIT, SIGABRT) gets before SIGKILL


@dataclass(frozen=True)
class DrainTimes:
    drain_delay: float
    stream_grace: float
    graceful_timeout: float
    shutdown_timeout: float

    @property
    def worker_bound(self) -> float:
        """Seconds after its SIGTERM by which a worker whose loop runs has exited."""
        return self.graceful_timeout + CANCEL_WAIT + self.shutdown_timeout

    @property
    def abort_after(self) -> float:
        """Seconds after its SIGTERM at which the master aborts a worker still there."""
        return self.worker_bound + EXIT_MARGIN

    @property
    def worst_case(self) -> float:
        """SIGTERM to the master's exit at worst: the drain delay, then a worker whose
        loop is blocked, aborted and then killed."""
        return self.drain_delay + self.abort_after + KILL_GRACE

    @property
    def streams_closed(self) -> float:
        """When streaming responses have been told to end (their handlers then return)."""
        return self.drain_delay + min(self.stream_grace, self.graceful_timeout)

    def describe(self) -> str:
        return (
            f"{_s(self.worst_case)} at worst from SIGTERM: drain delay {_s(self.drain_delay)}"
            f" + graceful timeout {_s(self.graceful_timeout)} + cancel {_s(CANCEL_WAIT)}"
            f" + shutdown {_s(self.shutdown_timeout)} + kill margin"
            f" {_s(EXIT_MARGIN + KILL_GRACE)}; streams end {_s(self.stream_grace)} after the"
            " drain delay"
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "worst_case_s": self.worst_case,
            "worker_bound_s": self.worker_bound,
            "streams_closed_s": self.streams_closed,
        }


def of(settings: Any) -> DrainTimes:
    """The drain times a settings object (the model, or a worker's plain copy) sets."""
    s = settings
    return DrainTimes(s.drain_delay, s.stream_drain_grace, s.graceful_timeout, s.shutdown_timeout)


def _s(seconds: float) -> str:
    return f"{seconds:g}s"
