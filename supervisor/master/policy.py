"""Pure decisions of the master: respawn backoff, when a crash loop has to stop, when a
worker is overdue, and how replacements proceed.

Kept free of processes and clocks (time is passed in) so every rule is tested directly.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from asgi_supervise.drain import KILL_GRACE as KILL_GRACE  # re-exported for the deadlines

BACKOFF_BASE = 0.5  # seconds before the second respawn of a slot
# A ready worker that reported a request, or stayed up this long, served: its death is not
# part of a crash loop (a kill from outside, one bad request), so its slot respawns at once.
SERVED_AFTER = 1.0


def respawn_delay(crashes: int, cap: float) -> float:
    """0 for the first crash, then 0.5 s doubling per consecutive crash, capped.

    The first replacement is immediate because a single crash is usually a one-off
    (OOM kill, a segfault in an extension); a repeat means something is wrong and
    respawning at full speed only burns CPU and floods logs.
    """
    if crashes <= 0:
        return 0.0
    # The exponent is capped: 2**1024 overflows a float after ~8 h of crashing at the cap.
    return min(cap, BACKOFF_BASE * 2 ** min(crashes - 1, 64))


def served(uptime: float, requests: int) -> bool:
    """Whether a worker that was ready for `uptime` s (0: never ready) served before dying.

    Requests arrive with the once-a-second heartbeat, so a worker that lived a second past
    ready counts as having served even if its first report did not make it.
    """
    return uptime > 0 and (requests > 0 or uptime >= SERVED_AFTER)


@dataclass
class SlotHealth:
    """Crash history of one worker slot."""

    crashes: int = 0  # consecutive workers of this slot that died young (a crash loop)
    not_before: float = 0.0  # monotonic time before which the slot must not respawn

    def crashed(
        self, now: float, uptime: float, cap: float, *, requests: int = 0, alone: bool = False
    ) -> float:
        """Record a worker that died unasked after `uptime` s of being ready (0: it never
        was); return the respawn delay.

        Backoff is for workers that die young: a worker that served (`served`) is no crash
        loop, so its slot's count resets and it is replaced at once, however often workers
        are killed from outside. `alone`: no other worker serves and the app is known to
        boot; a delay would leave the instance with no worker while clients wait on the
        socket, so the slot respawns now (its count still grows, for the next crash).
        """
        if served(uptime, requests):
            self.crashes = 0
            delay = 0.0
        else:
            delay = respawn_delay(self.crashes, cap)
            self.crashes += 1
        if alone:
            delay = 0.0
        self.not_before = now + delay
        return delay


def slots_to_fill(empty: Mapping[int, float], now: float, live: int, app_boots: bool) -> list[int]:
    """Which empty slots (slot -> not_before) start a worker now.

    Those whose backoff is over; and, whatever the backoff, the soonest one when no worker
    is left at all (`live` counts workers serving or booting) while the app is known to
    boot: no backoff leaves the instance with nothing to answer the socket.
    """
    due = sorted(slot for slot, not_before in empty.items() if now >= not_before)
    if not due and empty and live == 0 and app_boots:
        due = [min(empty, key=lambda slot: (empty[slot], slot))]
    return due


class BootExit(enum.Enum):
    APP_FAILED = "app failed"  # counts toward --boot-failure-limit
    KILLED = "killed"  # from outside (OOM killer, an operator): respawn, do not count


# A worker dying of these before ready crashed in its own code (a C extension, abort()).
CRASH_SIGNALS = frozenset({"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGSYS", "SIGTRAP"})


def boot_exit(signal_name: str | None, boot_error: str | None, killed_by_master: bool) -> BootExit:
    """Why a worker died before it became ready; `signal_name` is the signal that ended
    it (None if it exited by itself).

    The app failed: it said so (an exception, a failed lifespan: `boot_error`), it exited
    by itself, it crashed (a fatal signal of its own), or the master killed it (the
    ready timeout). Any other signal came from outside the app (SIGKILL from the OOM
    killer or an operator, SIGTERM): that says nothing about whether the app can start.
    """
    if boot_error or killed_by_master or signal_name is None or signal_name in CRASH_SIGNALS:
        return BootExit.APP_FAILED
    return BootExit.KILLED


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


# --- recycling and rolling replacement -------------------------------------------------

MEMORY_STRIKES = 3  # consecutive RSS samples over the limit before a worker is recycled


def worker_limits(
    max_requests: int | None,
    requests_jitter: int,
    max_lifetime: float | None,
    lifetime_jitter: float,
    rng: random.Random,
) -> tuple[int | None, float | None]:
    """Per-worker limits with jitter, drawn once at spawn so workers never recycle together."""
    requests = None if max_requests is None else max_requests + rng.randint(0, requests_jitter)
    lifetime = None if max_lifetime is None else max_lifetime + rng.uniform(0, lifetime_jitter)
    return requests, lifetime


def recycle_reason(
    requests: int,
    request_limit: int | None,
    uptime: float,
    lifetime_limit: float | None,
    memory_strikes: int,
) -> str | None:
    """Why a healthy worker should be replaced now, if it should."""
    if memory_strikes >= MEMORY_STRIKES:
        return "memory"
    if request_limit is not None and requests >= request_limit:
        return "max-requests"
    if lifetime_limit is not None and uptime >= lifetime_limit:
        return "lifetime"
    return None


@dataclass(frozen=True)
class Candidate:
    """What the rolling planner needs to know about one serving worker that is due."""

    pid: int
    slot: int
    reason: str  # reload, max-requests, memory, lifetime
    replacement: str | None = None  # None, "booting" or "ready"


@dataclass(frozen=True)
class Step:
    action: str  # "spawn": start a replacement; "stop": drain the old one; "drain-first"
    pid: int
    reason: str


def in_transition(live: list[tuple[int, bool]], slots: Iterable[int]) -> int:
    """How many workers the instance is away from one serving worker per slot.

    `live` holds (slot, serving) for every live worker; serving means ready and not
    stopping. Every slot without a serving worker counts (empty, refilling, drained
    first), and so does every worker beyond one per slot (a replacement booting beside
    the old worker, an old worker still draining) or outside the slots (leaving after a
    scale-down). This is what `--reload-surge` bounds: replacements never take a second
    slot out of service, nor add more workers than the surge.
    """
    slots = set(slots)
    serving = {slot for slot, is_serving in live if is_serving}
    occupied = {slot for slot, _ in live}
    return len(slots - serving) + len(live) - len(occupied & slots)


def plan_replacements(due: list[Candidate], extra: int, surge: int, room: int) -> list[Step]:
    """Replacement first, at most `surge` workers beyond the target at a time, in slot order.

    `extra` is `in_transition`: replacements booting, old workers still draining (they hold
    their memory and database connections until they exit), and slots refilling. A due
    worker whose replacement is ready is drained; otherwise a replacement is started while
    `extra` is below `surge`, so the instance never holds more than target + surge
    workers. `room` is how many more workers the budgets hold now (memory, database
    connections): past it, the old worker is drained first and its slot refilled after
    (it says so); the next waits until that slot serves again.
    """
    steps = []
    for worker in sorted(due, key=lambda c: c.slot):
        if worker.replacement == "ready":
            steps.append(Step("stop", worker.pid, worker.reason))
        elif worker.replacement is None and extra < surge:
            action = "spawn" if room > 0 else "drain-first"
            steps.append(Step(action, worker.pid, worker.reason))
            extra += 1
            room -= 1
    return steps


# --- deadlines ----------------------------------------------------------------------


class Overdue(enum.Enum):
    """Why a worker must be killed now."""

    DRAIN = "drain deadline"  # did not exit by itself after its graceful timeout and shutdown
    KILL = "kill deadline"  # already told to die (SIGQUIT, SIGABRT) and still here
    BOOT = "ready timeout"  # not ready within --ready-timeout
    SILENT = "event loop blocked"  # no heartbeat for --worker-timeout


def overdue(
    state: str,
    now: float,
    started: float,
    last_beat: float,
    kill_at: float | None,
    killed: bool,
    ready_timeout: float,
    worker_timeout: float,
) -> Overdue | None:
    """The deadline a worker has passed, if any. `state` is booting, ready or draining;
    `killed` says the master already signalled it to die for a failure."""
    if kill_at is not None and now >= kill_at:
        return Overdue.DRAIN if state == "draining" and not killed else Overdue.KILL
    if killed:
        return None  # its kill deadline is pending
    if state == "booting" and now - started > ready_timeout:
        return Overdue.BOOT
    if state == "ready" and now - last_beat > worker_timeout:
        return Overdue.SILENT
    return None


# --- fork servers ----------------------------------------------------------------------


class ForkServerNeed(enum.StrEnum):
    """What the current code generation needs of the fork servers now."""

    NONE = "none"  # the newest one (up or booting) is of this generation already
    KEEP = "keep"  # the current one forks this generation too: it holds no app code
    WAIT = "wait"  # none is left and the last died young: its backoff runs
    START = "start"  # a new one, for this generation


def fork_server_need(
    generation: int,
    newest: int | None,
    current_up: bool,
    booting: bool,
    preload: bool,
    now: float,
    not_before: float,
) -> ForkServerNeed:
    """`newest`: the generation of the newest fork server (booting or up), None if none.

    Without --preload a fork server imports only uvicorn and our code, which a reload
    does not change: it is kept for the new generation, whose forks import the new app.
    With --preload it holds the old app, so a reload needs a new one.
    """
    if newest is not None and newest >= generation:
        return ForkServerNeed.NONE
    if current_up and not booting and not preload:
        return ForkServerNeed.KEEP
    if newest is None and now < not_before:
        return ForkServerNeed.WAIT
    return ForkServerNeed.START


class PreloadFailure(enum.StrEnum):
    """What an app that fails to import in the fork server (--preload) leads to."""

    ABORT_RELOAD = "abort_reload"  # new code: the old workers and fork server stay
    WAIT_FOR_SAVE = "wait_for_save"  # --reload: the next save tries again
    EXIT = "exit"  # exit 3: every worker would import the same failing code


def preload_failure(for_reload: bool, dev_reload: bool) -> PreloadFailure:
    """Not retried like a worker's boot failure: the import ran once for every worker,
    and only new code (a save, a deploy and SIGHUP) can change its outcome."""
    if for_reload:
        return PreloadFailure.ABORT_RELOAD
    return PreloadFailure.WAIT_FOR_SAVE if dev_reload else PreloadFailure.EXIT
