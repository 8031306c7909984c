"""Worker count from the CPU, memory and database connections this process may really use.

Formulas built on ``os.cpu_count()`` start dozens of workers in a one-CPU pod, and
workers x pool size silently exhausts the database's ``max_connections``. This module
turns what `host.read_host` found (`facts.HostFacts`), plus the sizing settings, into an
explained `Plan`.
Everything here is pure: `sizing.make_plan` reads the machine and calls `plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from asgi_supervise import drain
from asgi_supervise.sizing.facts import GIB, MIB, Found, HostFacts

if TYPE_CHECKING:
    from asgi_supervise.config.settings import Settings

MASTER_RESERVE = 64 * MIB  # the master's own RSS, kept out of the workers' share
FORK_SERVER_RESERVE = 32 * MIB  # a fork server without --preload: interpreter and uvicorn


def fork_server_reserve(settings: Settings) -> int:
    """Room for a reload's new fork server beside the old generation's (whose pages its
    workers share, so it is counted in their estimate): with --preload it holds the app
    as a worker does; without, the interpreter and uvicorn. None in exec mode."""
    if settings.worker_start != "fork":
        return 0
    return settings.worker_memory_estimate * MIB if settings.preload else FORK_SERVER_RESERVE


def _kept(settings: Settings) -> tuple[int, str]:
    """What the memory budget keeps out of the workers' share, and how to say it."""
    forks = fork_server_reserve(settings)
    text = "64 MiB master" + (f" + {_size(forks)} fork server" if forks else "")
    return MASTER_RESERVE + forks, text


@dataclass(frozen=True)
class Budget:
    """How many workers one resource allows (None: no limit known), and why."""

    name: str
    allows: int | None
    detail: str


@dataclass(frozen=True)
class Plan:
    workers: int
    limited_by: str
    budgets: tuple[Budget, ...]
    forced: bool
    warnings: tuple[str, ...]
    reloads: str = ""  # how a reload replaces these workers, and what decides it
    worst_case_drain_s: float = 0.0  # SIGTERM to exit at worst (`drain.DrainTimes`)
    drain: str = ""  # ... and its parts
    memory_limit: int | None = None  # bytes the memory budget divides; None: unknown

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``plan --json`` and the /status endpoint."""
        data = asdict(self)
        return {**data, "budgets": list(data["budgets"]), "warnings": list(self.warnings)}

    def render(self) -> str:
        """A small aligned table, the decision, then the warnings."""
        rows = [("budget", "allows", "detail")]
        rows += [(b.name, str(b.allows or "-"), b.detail) for b in self.budgets]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        lines = [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
        noun = "worker" if self.workers == 1 else "workers"
        why = f"limited by {self.limited_by}"
        why = "as configured" if self.limited_by == "configured" else why
        lines.append(f"=> {self.workers} {noun}, {why}")
        if self.reloads:
            lines.append(f"reloads: {self.reloads}")
        if self.drain:
            lines.append(f"drain: {self.drain}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


Over = Callable[[int], str]  # explains why n workers exceed a budget
Rule = tuple[Budget, Over, list[str]]


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{_num(n / MIB)} MiB"


def _plural(n: float, word: str) -> str:
    return f"{_num(n)} {word}" + ("" if n == 1 else "s")


def usable_cpus(facts: HostFacts) -> Found:
    """The tightest of quota, cpuset, affinity and host count; a quota may be fractional."""
    options = [
        (facts.cpu_quota, facts.cpu_quota_source),
        (facts.cpuset_cpus, facts.cpuset_source),
        (facts.affinity_cpus, "sched_getaffinity"),
        (facts.host_cpus, "host CPU count"),
    ]
    return min(((v, s) for v, s in options if v is not None), key=lambda o: o[0])


def _cpu_rule(settings: Settings, facts: HostFacts) -> Rule:
    """Round down like Puma: 1.5 CPUs make 1 worker, because 2 would share 1.5 CPUs."""
    cpus, src = usable_cpus(facts)
    per_core = settings.cpu_workers_per_core
    allows = max(1, math.floor(cpus * per_core + 1e-9))
    usable = _plural(cpus, "usable CPU")
    detail = f"{usable} ({src})"
    if per_core != 1:
        detail += f" x {_num(per_core)} per core"
    if cpus * per_core != allows:
        detail += ", rounded down" if cpus * per_core > allows else ", at least 1"

    def over(n: int) -> str:
        if per_core == 1:
            return f"{_plural(n, 'worker')} > {usable} ({src})"
        return f"{_plural(n, 'worker')} > {allows} = {usable} ({src}) x {_num(per_core)} per core"

    return Budget("cpu", allows, detail), over, []


def memory_limit(facts: HostFacts) -> tuple[int | None, str]:
    """The memory the instance may use and where it was read: its cgroup limit, else the
    host's memory (a VM's, or a container's without a limit); None when neither is known."""
    if facts.memory_limit is not None:
        return facts.memory_limit, facts.memory_limit_source
    return facts.host_memory or None, "host memory, no cgroup limit"


def _memory_rule(settings: Settings, facts: HostFacts) -> Rule:
    """Leave room for the master and for replacements: a reload starts the new worker first."""
    limit, src = memory_limit(facts)
    est, spare = settings.worker_memory_estimate * MIB, settings.reload_surge
    if not limit:
        return Budget("memory", None, "memory size unknown"), str, []
    kept, kept_text = _kept(settings)
    fits = max(0, (limit - kept) // est)
    allows = max(1, fits - spare)
    detail = (
        f"{_size(limit)} limit ({src}), 64 MiB kept for the master"
        + (
            f" and {_size(kept - MASTER_RESERVE)} for a fork server"
            if kept > MASTER_RESERVE
            else ""
        )
        + f", {_size(est)} per worker, {spare} spare for replacements"
    )
    warnings = []
    if fits - spare < 1:
        what = "1 worker" if fits < 1 else f"1 worker + {spare} replacement for reloads"
        warnings.append(
            f"memory: {what} of {_size(est)} each + {kept_text} > {_size(limit)} ({src})"
        )

    def over(n: int) -> str:
        need = (n + spare) * est + kept
        return (
            f"{_plural(n, 'worker')} x {_size(est)} + {spare} spare + {kept_text} = {_size(need)}"
            f" > {_size(limit)} limit ({src})"
        )

    return Budget("memory", allows, detail), over, warnings


def db_share(settings: Settings) -> int | None:
    """The connections a reload may hold: (max - reserved) / replicas. None without a db
    budget, or under --reload: a save must never leave the developer without a server for
    a production budget that a shared config file carried into development."""
    most, pool = settings.db_max_connections, settings.db_pool_size
    if most is None or pool is None or settings.reload:
        return None
    return max(0, most - settings.db_reserved_connections) // settings.replicas


def _db_rule(settings: Settings) -> Rule:
    """Every worker of every replica may hold a full pool; the database has one budget."""
    most, pool = settings.db_max_connections, settings.db_pool_size
    reserved, replicas = settings.db_reserved_connections, settings.replicas
    if most is None or pool is None:
        unset = [k for k, v in (("db_max_connections", most), ("db_pool_size", pool)) if v is None]
        half = f"{unset[0]} is not set: a database connection budget needs both db settings"
        warnings = [half] if len(unset) == 1 else []
        return Budget("db", None, f"not configured (set {' and '.join(unset)})"), str, warnings
    available = most - reserved
    raw = max(0, available) // (replicas * pool)
    reps = _plural(replicas, "replica")
    detail = f"({most} max - {reserved} reserved) / ({reps} x {pool} per worker)"

    def over(n: int) -> str:
        total = n * pool * replicas
        return (
            f"{_plural(n, 'worker')} x {pool} connections x {reps} = {total} > {available}"
            f" available (db_max_connections {most} - reserved {reserved})"
        )

    warnings = [f"db: even {over(1)}"] if raw == 0 else []
    return Budget("db", max(1, raw), detail), over, warnings


@dataclass(frozen=True)
class Room:
    """How many more workers one budget holds now, and its account for the log."""

    name: str  # memory, db
    left: int
    taken: str  # what holds it, of how much


def fits(used: int, each: int, budget: int) -> int:
    """How many more of `each` fit in what is left of `budget` (memory, connections)."""
    return max(0, (budget - used) // each)


def reload_room(surge: int, rooms: list[Room]) -> tuple[int, Room | None]:
    """How many replacements may start beside the old workers: the surge, or fewer when a
    budget holds fewer; with the budget that limits it (None: the surge does)."""
    tight = min(rooms, key=lambda room: room.left, default=None)
    if tight is None or tight.left >= surge:
        return surge, None
    return tight.left, tight


def planned_rooms(settings: Settings, facts: HostFacts, workers: int) -> list[Room]:
    """The rooms a reload of `workers` will find, from the estimates (`Rollout` measures)."""
    rooms = []
    limit, est = facts.memory_limit, settings.worker_memory_estimate * MIB
    if limit is not None:
        kept, kept_text = _kept(settings)
        taken = f"{_plural(workers, 'worker')} x {_size(est)} + {kept_text}"
        account = f"{taken} of {_size(limit)} ({facts.memory_limit_source})"
        rooms.append(Room("memory", fits(workers * est + kept, est, limit), account))
    share, pool = db_share(settings), settings.db_pool_size
    if share is not None and pool is not None:
        taken = f"{_plural(workers, 'worker')} x {pool} connections"
        rooms.append(
            Room("db", fits(workers * pool, pool, share), f"{taken} of this instance's {share}")
        )
    return rooms


def describe_reloads(settings: Settings, facts: HostFacts, workers: int) -> str:
    """How a reload will replace `workers`: beside the old ones while the memory limit and
    the database share hold more, else by draining each first."""
    if settings.engine == "gunicorn":  # gunicorn starts a whole new set beside the old one
        room, tight = reload_room(workers, planned_rooms(settings, facts, workers))
        both = f"gunicorn: all {workers} new workers at once beside the old ones"
        if tight is None:
            return both
        return f"{both}, though the {tight.name} budget holds {room} more ({tight.taken})"
    surge = settings.reload_surge
    room, tight = reload_room(surge, planned_rooms(settings, facts, workers))
    if tight is None:
        return f"replacement first, {surge} at a time (--reload-surge)"
    budget = f"the {tight.name} budget"
    if room == 0:
        return f"drain first, {surge} at a time: {budget} holds no more ({tight.taken})"
    return f"replacement first, {room} at a time: {budget} holds {room} more ({tight.taken})"


def over_budgets(settings: Settings, facts: HostFacts, workers: int) -> list[str]:
    """Each budget `workers` exceeds, named, with its numbers (scaling past the plan)."""
    rules = [_cpu_rule(settings, facts), _memory_rule(settings, facts), _db_rule(settings)]
    return [
        f"the {budget.name} budget allows {budget.allows}: {over(workers)}"
        for budget, over, _ in rules
        if budget.allows is not None and workers > budget.allows
    ]


def plan(settings: Settings, facts: HostFacts) -> Plan:
    """Decide the worker count: the smallest budget for ``auto``, else the user's number."""
    rules = [_cpu_rule(settings, facts), _memory_rule(settings, facts), _db_rule(settings)]
    budgets = tuple(budget for budget, _, _ in rules)
    warnings = [*facts.notes, *(w for _, _, ws in rules for w in ws)]
    bound = [(b.allows, b.name, over) for b, over, _ in rules if b.allows is not None]
    if settings.workers != "auto":
        n = settings.workers
        warnings += [over(n) for allows, _, over in bound if n > allows]
        reloads = describe_reloads(settings, facts, n)
        return Plan(
            n, "configured", budgets, True, tuple(warnings), reloads, *_drain(settings),
            memory_limit=memory_limit(facts)[0],
        )  # fmt: skip
    n, limited_by, _ = min(bound, key=lambda b: b[0])
    forced = False
    if n < settings.min_workers:
        n, limited_by, forced = settings.min_workers, "min-workers", True
        warnings += [
            f"min_workers {n} overrides the {name} budget: {over(n)}"
            for allows, name, over in bound
            if n > allows
        ]
    elif settings.max_workers is not None and n > settings.max_workers:
        n, limited_by = settings.max_workers, "max-workers"
    reloads = describe_reloads(settings, facts, n)
    return Plan(
        n, limited_by, budgets, forced, tuple(warnings), reloads, *_drain(settings),
        memory_limit=memory_limit(facts)[0],
    )  # fmt: skip


def _drain(settings: Settings) -> tuple[float, str]:
    """The worst-case drain time, for the plan (and the Helm chart's grace period)."""
    times = drain.of(settings)
    return times.worst_case, times.describe()
