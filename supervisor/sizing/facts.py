"""What the machine lets this process use, as plain data: `host` reads it, `budgets` decides."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MIB = 1024**2
GIB = 1024**3

Found = tuple[float, str]  # (value, where it came from)


@dataclass(frozen=True)
class HostFacts:
    """What the machine lets this process use; ``None`` means no limit was found."""

    cpu_quota: float | None
    cpu_quota_source: str
    cpuset_cpus: int | None
    cpuset_source: str
    affinity_cpus: int | None
    host_cpus: int
    memory_limit: int | None
    memory_limit_source: str
    host_memory: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "notes": list(self.notes)}
