"""Which workers stop accepting so long-lived connections spread evenly. Pure.

With one shared accept queue the busiest worker keeps winning accepts (its loop is awake
when a connection arrives, and it accepts a whole burst): 40 streams over 2 workers end
up 31/9. The master knows every serving worker's open connections from its beats; a
worker holding clearly more than the average is paused (it stops accepting, the others
take the queue) until it is back at the average. The least loaded worker always accepts.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

MIN_SLACK = 3  # connections above the average before pausing: no churn at low counts
SLACK_SHARE = 0.1  # ... or this share of the average, whichever is larger


def pause_threshold(average: float) -> float:
    """A worker holding more than this many connections is paused."""
    return average + max(MIN_SLACK, SLACK_SHARE * average)


def paused(connections: Mapping[K, int], now_paused: frozenset[K] | set[K]) -> set[K]:
    """The serving workers that should not accept, from their open connections.

    Above `pause_threshold` a worker pauses; a paused one resumes once at or below the
    average (the gap keeps it from flapping). Never all: the least loaded one accepts.
    """
    if len(connections) < 2:
        return set()
    average = sum(connections.values()) / len(connections)
    high = pause_threshold(average)
    result = {
        key
        for key, count in connections.items()
        if count > high or (key in now_paused and count > average)
    }
    if len(result) >= len(connections):
        result.discard(min(connections, key=lambda key: connections[key]))
    return result
