"""The master's worker table: every process it started, and the slots they fill.

The arbiter owns it and is the only one to add or remove workers; the rollout reads it
(`Rollout` gets this table, not the arbiter), and `/status` shows it.
"""

from __future__ import annotations

from collections.abc import Iterator

from asgi_supervise.master.policy import SlotHealth
from asgi_supervise.master.workers import State, Worker


class WorkerTable:
    def __init__(self, slots: int) -> None:
        self.workers: dict[int, Worker] = {}  # pid -> worker, until it is reaped
        self.slots = {slot: SlotHealth() for slot in range(1, slots + 1)}

    def __iter__(self) -> Iterator[Worker]:
        return iter(self.workers.values())

    def get(self, pid: int | None) -> Worker | None:
        return None if pid is None else self.workers.get(pid)

    def add(self, worker: Worker) -> None:
        self.workers[worker.pid] = worker

    def remove(self, worker: Worker) -> None:
        del self.workers[worker.pid]

    @property
    def target(self) -> int:
        """Workers wanted: one per slot (scaling adds and removes slots)."""
        return len(self.slots)

    def live(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.alive]

    def ready_count(self) -> int:
        return sum(w.state is State.READY for w in self.workers.values())

    def empty_slots(self) -> set[int]:
        """Slots without a live worker: the arbiter refills them."""
        return set(self.slots) - {w.slot for w in self.live()}

    def add_slot(self) -> int:
        slot = max(self.slots, default=0) + 1
        self.slots[slot] = SlotHealth()
        return slot

    def remove_slot(self) -> int:
        """Remove the highest slot; its worker is the caller's to stop."""
        slot = max(self.slots)
        del self.slots[slot]
        return slot
