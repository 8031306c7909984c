"""Replacing workers while serving: rolling reloads and recycling, replacement first.

A reload (SIGHUP or a file change) bumps the generation: every worker of an older one is
due. Recycling marks a worker due by requests, memory or lifetime. Either way a new worker
starts in the same slot and the old one drains only once the new one is ready. At most
`--reload-surge` workers are in transition at a time: old ones still draining count, and
so do slots without a serving worker (`policy.in_transition`, `policy.plan_replacements`).

A rollout reads the worker table and changes it only through `Lifecycle`: the arbiter's
start, stop and reporting, so the table has one owner.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Protocol

from asgi_supervise import drain, sizing
from asgi_supervise.config.values import Values
from asgi_supervise.master import policy
from asgi_supervise.master.table import WorkerTable
from asgi_supervise.master.workers import State, Worker
from asgi_supervise.sizing.budgets import Room, fits
from asgi_supervise.sizing.facts import MIB

log = logging.getLogger("asgi_supervise.master")

SAMPLE_INTERVAL = 1.0  # seconds between RSS/CPU samples of the workers


class Lifecycle(Protocol):
    """What a rollout asks of the arbiter."""

    def start_worker(self, slot: int) -> Worker | None: ...

    def can_spawn(self, generation: int | None = None) -> bool: ...

    def stop_worker(self, worker: Worker, reason: str, grace: float) -> None: ...

    def report_boot_error(self, worker: Worker, attempt: str) -> str: ...

    def reload_finished(self, seconds: float, outcome: str) -> None: ...


class Rollout:
    def __init__(
        self,
        table: WorkerTable,
        lifecycle: Lifecycle,
        settings: Values,
        memory_limit: int | None,
    ):
        self.table = table
        self.lifecycle = lifecycle
        self.settings = settings
        self.memory_limit = memory_limit  # the instance's (cgroup) limit, for surge decisions
        self.db_share = sizing.db_share(settings)  # connections this instance may hold
        self.generation = 0
        self.reload_started: float | None = None
        self.last_sample = time.monotonic()  # the first sample a second after the start
        self.master_rss = 0
        self.fork_servers_memory = 0  # their PSS, set by the arbiter (fork mode)
        self.rng = random.Random()

    @property
    def in_progress(self) -> bool:
        return self.reload_started is not None

    def limits_for_new_worker(self) -> tuple[int | None, float | None]:
        s = self.settings
        return policy.worker_limits(
            s.max_requests,
            s.max_requests_jitter,
            s.max_worker_lifetime,
            s.max_worker_lifetime_jitter,
            self.rng,
        )

    def failed(self, worker: Worker) -> None:
        """The old worker keeps serving. A failed reload is abandoned, unless a newer one
        began while this replacement started; recycling retries."""
        old = self.table.get(worker.replaces)
        reason = self.due_reason(old) if old else None
        if old is not None:
            old.replaced_by = None
        headline = self.lifecycle.report_boot_error(worker, f"replacing pid {worker.replaces}")
        if reason == "reload" and worker.generation < self.generation:
            log.warning(
                "%s was started for an earlier reload; the newer one goes on", worker.tag()
            )  # a fix deployed (SIGHUP) while the broken code's worker was still starting
            return
        if reason == "reload":
            self.abort(headline)
            return
        cap = self.settings.restart_backoff_max
        delay = self.table.slots[worker.slot].crashed(time.monotonic(), 0.0, cap)
        log.error("%s: retrying its %s replacement in %.1fs", worker.tag(), reason, delay)

    def abort(self, headline: str) -> None:
        """The new code failed to start: the old workers are the current generation again."""
        for live in self.table.live():
            live.generation = self.generation
        self.finish("aborted")
        log.error(
            "reload aborted: the new code failed to start (%s); the old workers keep serving",
            headline,
            extra={"event": "reload_aborted", "error": headline},
        )

    def sample(self) -> bool:
        """Once a second: RSS and CPU of every worker (memory strikes come from these), and
        the master's own RSS, which the memory room counts."""
        now = time.monotonic()
        if now - self.last_sample < SAMPLE_INTERVAL:
            return False
        self.last_sample = now
        limit = self.settings.max_worker_memory
        max_rss = None if limit is None else limit * MIB
        forked = self.settings.worker_start == "fork"
        for worker in self.table.live():
            worker.sample(max_rss, pss=forked)
        import psutil  # imported here, a second after the start: not before the first workers

        self.master_rss = psutil.Process().memory_info().rss
        return True

    def mark_recycling(self) -> None:
        """Every pass (request counts arrive with each heartbeat): who is due, and why."""
        now = time.monotonic()
        for worker in self.table.live():
            if worker.state is not State.READY or worker.recycle or worker.stop_reason:
                continue
            worker.recycle = policy.recycle_reason(
                worker.requests,
                worker.request_limit,
                worker.uptime(now),
                worker.lifetime_limit,
                worker.memory_strikes,
            )
            if worker.recycle:
                log.info(
                    "%s due for recycling: %s (%d requests, %.0f MiB, up %.0fs)",
                    worker.tag(), worker.recycle, worker.requests, worker.rss / MIB,
                    worker.uptime(now), extra=worker.extra("recycle", reason=worker.recycle),
                )  # fmt: skip

    def due_reason(self, worker: Worker) -> str | None:
        if worker.generation < self.generation:
            return "reload"
        return worker.recycle

    def step(self) -> None:
        """Replacement first: start the new worker, drain the old one once the new is ready."""
        now = time.monotonic()
        due = []
        for worker in self.table.live():
            reason = self.due_reason(worker)
            if reason is None or worker.state is not State.READY or worker.stop_reason:
                continue
            if worker.replaced_by is None and now < self.table.slots[worker.slot].not_before:
                continue  # its last replacement failed: back off
            new = self.table.get(worker.replaced_by)
            progress = None if new is None else new.state.value
            due.append(policy.Candidate(worker.pid, worker.slot, reason, progress))
        if not due:
            if self.reload_started is not None and not self.old_generation_alive():
                self.finish("completed")
            return
        if not self.lifecycle.can_spawn(self.generation):
            return  # the new generation's fork server is still booting
        room, tight = sizing.reload_room(self.settings.reload_surge, self.rooms())
        steps = policy.plan_replacements(due, self.extra(), self.settings.reload_surge, room)
        grace = drain.of(self.settings).abort_after
        for step in steps:
            old = self.table.workers[step.pid]
            if step.action == "spawn":
                new = self.lifecycle.start_worker(old.slot)
                if new is None:
                    return
                new.replaces, old.replaced_by = old.pid, new.pid
            elif step.action == "stop":
                self.lifecycle.stop_worker(old, step.reason, grace)
            else:
                full = tight.taken if tight else "room"
                log.warning(
                    "%s: no %s for a replacement beside it: draining it first",
                    old.tag(), full, extra=old.extra("drain_first", reason=step.reason),
                )  # fmt: skip
                old.hold_slot = True
                self.lifecycle.stop_worker(old, step.reason, grace)

    def old_generation_alive(self) -> bool:
        """A reload is complete once the last old worker has drained and exited."""
        return any(w.generation < self.generation for w in self.table.live())

    def extra(self) -> int:
        """`policy.in_transition`. A worker still draining counts, as it holds its memory and
        database connections until it exits; not with --reload, where a save must not wait
        for the previous worker's idle keep-alive clients."""
        live = self.table.live()
        if self.settings.reload:
            live = [w for w in live if w.stop_reason is None]
        serving = [(w.slot, w.state is State.READY and w.stop_reason is None) for w in live]
        return policy.in_transition(serving, self.table.slots)

    def rooms(self) -> list[Room]:
        """What the budgets hold now: memory under the cgroup limit, as measured, and this
        instance's share of the database connections (`sizing.db_share`). Every live worker
        holds its pool (a draining one until it exits), and so will each empty slot's
        refill. Every worker counts as the largest sampled: one that just became ready was
        last sampled while it booted, before it held its full size. Forked workers count
        their PSS: their RSS counts the pages they share (with --preload, the app) in full
        for each of them."""
        live, refills = self.table.live(), len(self.table.empty_slots())
        rooms = []
        if self.memory_limit is not None:
            sampled = [w.pss or w.rss for w in live if w.rss]
            each = max(sampled) if sampled else self.settings.worker_memory_estimate * MIB
            used = (len(live) + refills) * each + self.master_rss + self.fork_servers_memory
            taken = f"memory ({used // MIB} of {self.memory_limit // MIB} MiB taken)"
            rooms.append(Room("memory", fits(used, each, self.memory_limit), taken))
        pool = self.settings.db_pool_size
        if self.db_share is not None and pool is not None:
            holders = len(live) + refills
            taken = f"database connections ({holders} x {pool} of {self.db_share} held)"
            rooms.append(Room("db", fits(holders * pool, pool, self.db_share), taken))
        return rooms

    def finish(self, outcome: str) -> None:
        if self.reload_started is None:
            return
        took = time.monotonic() - self.reload_started
        self.reload_started = None
        self.lifecycle.reload_finished(took, outcome)
        if outcome == "completed":
            log.info(
                "reload complete in %.2fs: %d workers on the new code",
                took,
                sum(w.generation == self.generation for w in self.table.live()),
                extra={"event": "reload_done", "duration_s": took, "outcome": outcome},
            )

    def start(self, why: str) -> None:
        """Replace every worker, new code first (SIGHUP, or a file change with --reload)."""
        if self.reload_started is not None and not self.old_generation_alive():
            self.finish("completed")  # its last old worker exited in this same batch
        self.generation += 1
        restarting = self.reload_started is not None
        self.reload_started = self.reload_started or time.monotonic()
        log.info(
            "%s: rolling reload%s, %d at a time",
            why,
            " restarted from the current state" if restarting else "",
            self.settings.reload_surge,
            extra={"event": "reload", "generation": self.generation},
        )
