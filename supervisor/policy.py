"""Pure decisions of the master: respawn backoff, and when a crash loop has to stop.

Kept free of processes and clocks (time is passed in) so every rule is tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKOFF_BASE = 0.5  # seconds before the second respawn of a slot
STABLE_AFTER = 30.0  # a worker ready this long has "recovered": its slot's crash count resets


def respawn_delay(crashes: int, cap: float) -> float:
    """0 for the first crash, then 0.5 s doubling per consecutive crash, capped.

    The first replacement is immediate because a single crash is usually a one-off
    (OOM kill, a segfault in an extension); a repeat means something is wrong and
    respawning at full speed only burns CPU and floods logs.
    """
    if crashes <= 0:
        return 0.0
    return min(cap, BACKOFF_BASE * 2 ** (crashes - 1))


@dataclass
class SlotHealth:
    """Crash history of one worker slot."""

    crashes: int = 0  # consecutive crashes of workers that had become ready
    not_before: float = 0.0  # monotonic time before which the slot must not respawn

    def crashed(self, now: float, uptime: float, cap: float) -> float:
        """Record a crash of a worker that was up `uptime` s; return the respawn delay."""
        if uptime >= STABLE_AFTER:
            self.crashes = 0
        delay = respawn_delay(self.crashes, cap)
        self.crashes += 1
        self.not_before = now + delay
        return delay


@dataclass
class BootBudget:
    """Consecutive workers that died before becoming ready, across all slots.

    Any worker reaching ready resets it: the app can boot, so failures are transient.
    """

    limit: int
    failures: int = 0
    last_error: str | None = None

    def failed(self, error: str | None) -> bool:
        """Record a boot failure; True when the limit is reached and the master must stop."""
        self.failures += 1
        self.last_error = error or self.last_error
        return self.failures >= self.limit

    def succeeded(self) -> None:
        self.failures = 0
